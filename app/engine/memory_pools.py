"""Memory reserved once, at start-up: the prefix KV cache's page pool, and the check every start-up
reservation makes first (the row KV cache's too). Torch only.

Allocating as traffic arrives makes resident memory climb while a cache fills, so a real leak
cannot be told from it; and on a CPU host the allocator's pages, freed and taken again in other
sizes, stay resident besides. A pool taken whole at start-up (written once, so every page is
resident) leaves the process's memory flat under any load, as vLLM's KV pool does. A pool that
does not fit in the memory the device has free is refused at once, with the figures, instead of
failing a request (or waking the kernel's OOM killer) later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MiB = 1024 * 1024


class PoolReservationError(RuntimeError):
    """A start-up reservation does not fit; the message is one line saying what to lower."""


def free_memory(device: torch.device) -> int:
    """What the device can still hand out: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(needed: int, device: torch.device, what: str, lower: str) -> None:
    """A PoolReservationError naming ``what`` and the setting to ``lower`` when the device has not
    ``needed`` bytes free."""
    free = free_memory(device)
    if needed > free:
        raise PoolReservationError(_refusal(what, needed, free, device, lower))


def zeros_reserved(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, what: str, lower: str
) -> torch.Tensor:
    """A zero-filled tensor (every page written, so resident from now on), or a PoolReservationError
    naming ``what`` and the setting to ``lower`` when the device cannot hold it."""
    needed = _numel(shape) * torch.empty((), dtype=dtype).element_size()
    check_fits(needed, device, what, lower)
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:  # the CPU allocator raises RuntimeError
        raise PoolReservationError(_refusal(what, needed, free_memory(device), device, lower)) from error


def _refusal(what: str, needed: int, free: int, device: torch.device, lower: str) -> str:
    return f"{what} needs {needed / MiB:.0f} MiB on {device} and only {free / MiB:.0f} MiB is free: lower {lower}"


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@dataclass(frozen=True, slots=True)
class PageShape:
    """One page: one layer's keys and values for one block of positions."""

    kv_heads: int
    block_tokens: int
    head_dim: int

    def numel(self) -> int:
        return 2 * self.kv_heads * self.block_tokens * self.head_dim


class PagePool:
    """``pages`` pages of ``[2, kv_heads, block_tokens, head_dim]`` in one tensor, allocated now;
    taken and given back by index, never allocated again. The prefix cache's one owner of them."""

    def __init__(self, shape: PageShape, max_bytes: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        self.page_bytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        self.pages = max_bytes // self.page_bytes
        size = (self.pages, 2, shape.kv_heads, shape.block_tokens, shape.head_dim)
        self._storage = zeros_reserved(size, dtype, device, "the prefix KV cache's pool", "--prefix-cache-mb")
        self._free = list(range(self.pages - 1, -1, -1))  # a stack: the lowest index is taken first

    @property
    def reserved_bytes(self) -> int:
        return self.pages * self.page_bytes

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.pages - len(self._free)

    def take(self, count: int) -> tuple[int, ...]:
        if count > len(self._free):
            raise ValueError(f"{count} pages asked of a pool with {len(self._free)} free")
        return tuple(self._free.pop() for _ in range(count))

    def give(self, pages: tuple[int, ...]) -> None:
        self._free.extend(reversed(pages))

    @torch.inference_mode()
    def write(self, pages: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """One layer's keys and values [heads, len(pages) * B, head_dim] into ``pages``, a block each."""
        index = torch.tensor(pages, device=self._storage.device)
        block = self.shape.block_tokens
        for part, states in ((0, keys), (1, values)):
            # [heads, n * B, d] -> [n, heads, B, d]: block i goes to page pages[i].
            source = states.unflatten(1, (len(pages), block)).transpose(0, 1)
            self._storage[:, part].index_copy_(0, index, source.to(self._storage.dtype))

    def read(self, pages: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values of ``pages``, in order: [heads, len(pages) * B, head_dim] each."""
        index = torch.tensor(pages, device=self._storage.device)
        picked = self._storage.index_select(0, index)  # [n, 2, heads, B, d]
        heads, block, dim = self.shape.kv_heads, self.shape.block_tokens, self.shape.head_dim
        keys = picked[:, 0].transpose(0, 1).reshape(heads, len(pages) * block, dim)
        values = picked[:, 1].transpose(0, 1).reshape(heads, len(pages) * block, dim)
        return keys, values

"""A CPU stand-in for CUDA graph capture, strict in the ways that matter to the static decode path.

``FrozenCapture`` records every aten operation one run of a step makes (through a dispatch mode)
and returns a replay that re-executes exactly those operations: Python runs once, at capture, and
is not consulted again. So, as with a real CUDA graph,
- every scalar the Python code computed is frozen at its capture-time value, and tensors made
  before the capture (weights, the cache, the input buffers) are read and written in place, while
  tensors made during the step are made afresh on each replay;
- an operation that would break a capture on a GPU fails the capture here too: reading a value
  back to Python (``.item()``, ``.tolist()``, ``nonzero``: a device synchronisation) or making a
  tensor from Python data inside the step (``torch.tensor(...)``: a host-to-device copy on a GPU).

A step whose per-call inputs do not all flow through the static buffers replays with stale values,
which the token-for-token comparisons with generate() then catch. What it cannot see: copies that
exist only on a GPU (``.to(device)`` of a tensor made on the host inside the step is a no-op
here), and kernels that refuse capture; those are for a run of ``python -m tools.gpu_check`` on a
GPU to find. It lives with the GPU check, whose ``--cpu-smoke`` run captures with it; the tests use
it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

# Operations that read device data back to the host, or copy host data in: not capturable.
NOT_CAPTURABLE = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.item",
        "aten.is_nonzero",
        "aten.nonzero",
        "aten.masked_select",
        "aten.equal",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.lift_fresh",
        "aten.lift_fresh_copy",
    }
)


class CaptureError(RuntimeError):
    """The step did something a CUDA graph cannot capture."""


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]] = []
        self.refused: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if str(func.overloadpacket) in NOT_CAPTURABLE:
            self.refused.append(str(func))
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


@dataclass
class FrozenCapture:
    """Use as a ``StepGraphs`` capture; counts captures and replays for the tests."""

    captures: int = 0
    replays: int = 0

    def __call__(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        recorder = _Recorder()
        with recorder:
            output = step()
        if recorder.refused:
            raise CaptureError(f"not capturable inside a decode step: {sorted(set(recorder.refused))}")
        self.captures += 1

        def replay() -> torch.Tensor:
            self.replays += 1
            fresh: dict[int, torch.Tensor] = {}

            def current(value: Any) -> Any:
                return fresh.get(id(value), value) if isinstance(value, torch.Tensor) else value

            for func, args, kwargs, out in recorder.ops:
                result = func(*tree_map(current, args), **tree_map(current, kwargs))
                for old, new in zip(tree_leaves(out), tree_leaves(result), strict=True):
                    if isinstance(old, torch.Tensor):
                        fresh[id(old)] = new
            replayed: torch.Tensor = current(output)
            return replayed

        return replay

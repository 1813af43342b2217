"""Additive 4D attention masks for row decode steps and packed prefills.

Passing ready masks makes transformers skip its own mask builder, which knows nothing of our
row cache. A window of ``None`` is full causal attention; a sliding layer of window ``w`` sees the
last ``w`` positions, itself included (transformers' convention for ``sliding_window``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from app.engine.kv_cache import Segment


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The dtype's minimum rather than -inf: a fully masked row (padding) then gives no NaN.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def decode_mask(positions: torch.Tensor, kv_length: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, 1, kv_length]: row r's query at ``positions[r]`` sees its own keys up to there."""
    key_pos = torch.arange(kv_length, device=positions.device)[None, :]
    query_pos = positions[:, None]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return _additive(allowed, dtype)[:, None, None, :]


def prefill_mask(
    segments: Sequence[Segment], window: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[1, 1, new_tokens, keys]: each segment sees its row's cached prefix and, causally, its new tokens.

    Keys are laid out as the cache returns them: per segment, positions 0..start+length-1.
    """
    query_seg, query_pos, key_seg, key_pos = [], [], [], []
    for index, seg in enumerate(segments):
        end = seg.start + seg.length
        query_seg.append(torch.full((seg.length,), index, device=device))
        query_pos.append(torch.arange(seg.start, end, device=device))
        key_seg.append(torch.full((end,), index, device=device))
        key_pos.append(torch.arange(end, device=device))
    q_seg, q_pos = torch.cat(query_seg)[:, None], torch.cat(query_pos)[:, None]
    k_seg, k_pos = torch.cat(key_seg)[None, :], torch.cat(key_pos)[None, :]
    allowed = (q_seg == k_seg) & (k_pos <= q_pos)
    if window is not None:
        allowed &= k_pos > q_pos - window
    return _additive(allowed, dtype)[None, None]


class MaskShapes:
    """Which masks a model wants: one per attention layer type, or a single tensor."""

    def __init__(self, layer_windows: Mapping[str, int | None] | None, plain_window: int | None = None) -> None:
        # layer_windows None: the model takes one plain 4D tensor (no per-layer-type mapping).
        self.layer_windows = dict(layer_windows) if layer_windows is not None else None
        self.plain_window = plain_window

    @classmethod
    def for_config(cls, config: object) -> MaskShapes:
        layer_types = getattr(config, "layer_types", None)
        if not layer_types:
            # Models such as Mistral slide every layer and say so only with sliding_window.
            return cls(None, getattr(config, "sliding_window", None))
        windows: dict[str, int | None] = {}
        for layer_type in set(layer_types):
            if layer_type == "full_attention":
                windows[layer_type] = None
            elif layer_type == "sliding_attention":
                windows[layer_type] = getattr(config, "sliding_window", None)
            else:
                raise ValueError(f"attention layer type {layer_type!r} is not supported by this server")
        return cls(windows)

    def decode(
        self, positions: torch.Tensor, kv_length: int, dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.layer_windows is None:
            return decode_mask(positions, kv_length, self.plain_window, dtype)
        return {name: decode_mask(positions, kv_length, w, dtype) for name, w in self.layer_windows.items()}

    def prefill(
        self, segments: Sequence[Segment], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.layer_windows is None:
            return prefill_mask(segments, self.plain_window, dtype, device)
        return {name: prefill_mask(segments, w, dtype, device) for name, w in self.layer_windows.items()}

"""StaticModelRunner: the runner behind ``--cuda-graphs``. Torch only; nothing async here.

Same interface and behaviour as ``ModelRunner`` (the scheduler cannot tell them apart), different
memory: a slot cache allocated once at start-up (``max_batch_size`` slots of ``max_context``
positions) instead of a row cache that grows and compacts. Sequences join by taking the lowest
free slot and leave by freeing theirs; nothing is copied. Prefill is the shared packed, chunked
prefill (eager); decode is ``StaticDecoder``'s fixed-shape step, replayed from CUDA graphs on a
GPU and run eagerly elsewhere. A mixed step (decode rows and a prompt chunk in one forward) is the
shared packed forward too, eager: its shapes change with every chunk and each decode row's keys
are gathered for it, so it cannot be one of the captured buckets. The captured graphs stay
decode-only and serve every step in which no prompt waits.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import structlog
import torch
from transformers import PreTrainedModel

from app.engine.cuda_graphs import StepGraphs
from app.engine.runner import BaseRunner, SequenceState
from app.engine.slot_cache import SlotKVCache, SlotShape
from app.engine.static_decode import SMALLEST_KV_BUCKET, DecodeRow, StaticDecoder

log = structlog.get_logger("engine.static_runner")


class StaticModelRunner(BaseRunner):
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_batch_size: int,
        max_context: int,
        stop_token_ids: Iterable[int],
        cuda_graphs: bool = True,
        graphs: StepGraphs | None = None,
        smallest_kv_bucket: int = SMALLEST_KV_BUCKET,
        prefix_cache_bytes: int = 0,
    ) -> None:
        """``cuda_graphs``: capture decode steps when the model is on CUDA (``graphs`` overrides:
        a capture of the caller's, such as a stand-in off CUDA). ``smallest_kv_bucket``: the
        shortest attention span a decode step uses."""
        shape = SlotShape.for_model(model)
        self._slots = SlotKVCache(shape, max_batch_size, max_context, dtype=model.dtype, device=model.device)
        super().__init__(
            model,
            self._slots,
            max_batch_size=max_batch_size,
            max_context=max_context,
            stop_token_ids=stop_token_ids,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        self.graphs = graphs if graphs is not None else StepGraphs.for_device(model.device, cuda_graphs)
        self._decoder = StaticDecoder(
            model, self._slots, self._masks, self._cache_arg, self.graphs, smallest_kv_bucket=smallest_kv_bucket
        )

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return self._decoder.batch_buckets

    @property
    def kv_buckets(self) -> tuple[int, ...]:
        return self._decoder.kv_buckets

    def _claim_row(self) -> int:
        return self._slots.take_slot()

    def release(self, seq_id: str) -> None:
        """Free the sequence's slot (idempotent). Nothing moves: the other slots keep their keys."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self._leave(seq)
            self._slots.free_slot(seq.row)

    def _copy_keys(self, source_row: int, target_row: int, length: int) -> None:
        self._slots.copy_slot(source_row, target_row, length)

    def _decode_logits(self, wanted: Sequence[SequenceState]) -> torch.Tensor:
        return self._decoder.run([DecodeRow(seq.row, seq.last_token, seq.num_computed) for seq in wanted])

    @torch.inference_mode()
    def capture_graphs(self, up_to_positions: int) -> int:
        """Capture every batch bucket for the kv buckets up to ``up_to_positions`` now, so the first
        requests do not wait for captures. Returns the number of graphs held."""
        if not self.graphs.enabled:
            return self.graphs.captured
        started = time.perf_counter()
        for length in self.kv_buckets:
            if length > max(up_to_positions, self.kv_buckets[0]):
                break
            for size in self.batch_buckets:
                if self.graphs.enabled and not self.graphs.has((size, length)):
                    self._decoder.run([], batch=size, kv_length=length)
        log.info(
            "cuda_graphs_captured",
            graphs=self.graphs.captured,
            seconds=round(time.perf_counter() - started, 2),
            failure=self.graphs.failure,
        )
        return self.graphs.captured

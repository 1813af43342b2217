"""ModelRunner: one model, one row cache, one forward at a time. Torch only; nothing async here.

The scheduler owns the policy (who joins, what each step does); the runner owns the tensors.
Between steps sequences are added and released; a step is either a packed prefill of prompt
chunks or one decode token for every sequence that has finished its prompt.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from app.engine.attention_masks import MaskShapes
from app.engine.errors import StepOutOfMemory
from app.engine.kv_cache import RowKVCache, Segment
from app.engine.params import SamplingParams
from app.engine.sampling import choose_tokens, seeded_generator


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    seq_id: str
    tokens: int  # how many of the sequence's pending prompt tokens to prefill now


@dataclass(frozen=True, slots=True)
class StepResult:
    tokens: dict[str, int]  # seq_id -> the token chosen this step (prefills that finished, decodes)
    kind: str  # "prefill" | "decode" | "idle"
    batch: int
    new_tokens: int  # tokens that went through the model
    seconds: float
    failed: dict[str, str] = field(default_factory=dict)  # seq_id -> why it got no token (NaN logits...)


@dataclass(slots=True)
class _Sequence:
    seq_id: str
    row: int
    params: SamplingParams
    suppress_until_min: tuple[int, ...]
    generator: torch.Generator | None
    pending: list[int]  # prompt tokens not yet in the cache
    length: int = 0  # tokens in the cache
    last_token: int = -1  # the newest token, not yet in the cache
    generated: int = 0
    prompt_length: int = field(default=0)


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_batch_size: int,
        max_context: int,
        stop_token_ids: Iterable[int],
    ) -> None:
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.stop_token_ids = tuple(sorted(set(stop_token_ids)))
        config = model.config.get_text_config()
        self._masks = MaskShapes.for_config(config)
        self._cache = RowKVCache(config.num_hidden_layers, max_batch_size, max_context)
        self._seqs: dict[str, _Sequence] = {}
        self._by_row: list[_Sequence] = []

    # -- membership ----------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return self.max_batch_size - len(self._by_row)

    @property
    def kv_cache_bytes(self) -> int:
        return self._cache.allocated_bytes

    def sequence_ids(self) -> list[str]:
        return [seq.seq_id for seq in self._by_row]

    def add(
        self,
        seq_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Iterable[int] | None = None,
    ) -> None:
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already in the runner")
        if not self.free_rows:
            raise RuntimeError("no free row: the scheduler admitted more than max_batch_size")
        if not prompt:
            raise ValueError("empty prompt")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = None if params.greedy else seeded_generator(seed, self.device)
        stops = self.stop_token_ids if stop_token_ids is None else tuple(sorted(stop_token_ids))
        # Below min_tokens the stop tokens are masked out, so the request cannot end early.
        suppress = () if params.ignore_eos or params.min_tokens == 0 else stops
        seq = _Sequence(seq_id, len(self._by_row), params, suppress, generator, list(prompt))
        seq.prompt_length = len(prompt)
        self._seqs[seq_id] = seq
        self._by_row.append(seq)

    @torch.inference_mode()
    def release(self, seq_id: str) -> None:
        """Free a sequence's row at once (idempotent); the last row moves into the hole."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        last = self._by_row.pop()
        if last is not seq:
            self._cache.move_row(last.row, seq.row, last.length)
            last.row = seq.row
            self._by_row[seq.row] = last
        if not self._by_row:
            self._cache.release()

    def pending_prompt(self, seq_id: str) -> int:
        return len(self._seqs[seq_id].pending)

    # -- steps -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]) -> StepResult:
        started = time.perf_counter()
        segments: list[Segment] = []
        input_ids: list[int] = []
        positions: list[int] = []
        finishing: list[tuple[_Sequence, int]] = []  # (sequence, index of its last new token)
        for chunk in chunks:
            seq = self._seqs[chunk.seq_id]
            take = seq.pending[: chunk.tokens]
            if not take:
                raise ValueError(f"sequence {chunk.seq_id} has no prompt left to prefill")
            segments.append(Segment(seq.row, seq.length, len(take)))
            input_ids.extend(take)
            positions.extend(range(seq.length, seq.length + len(take)))
            if len(take) == len(seq.pending):
                finishing.append((seq, len(input_ids) - 1))
        self._cache.reserve(len(self._by_row), max(s.start + s.length for s in segments) + 1)
        self._cache.plan_prefill(tuple(segments))
        keep = torch.tensor([index for _, index in finishing] or [len(input_ids) - 1], device=self.device)
        try:
            logits = self.model(
                input_ids=torch.tensor([input_ids], device=self.device),
                position_ids=torch.tensor([positions], device=self.device),
                attention_mask=self._masks.prefill(segments, self.dtype, self.device),
                cache=self._cache,
                use_cache=True,
                logits_to_keep=keep,
            ).logits[0]
        except torch.cuda.OutOfMemoryError as error:
            raise StepOutOfMemory(str(error)) from error
        finally:
            self._cache.clear_plan()
        for chunk, seg in zip(chunks, segments, strict=True):
            seq = self._seqs[chunk.seq_id]
            del seq.pending[: seg.length]
            seq.length += seg.length
        tokens, failed = self._choose([seq for seq, _ in finishing], logits) if finishing else ({}, {})
        return StepResult(tokens, "prefill", len(chunks), len(input_ids), time.perf_counter() - started, failed)

    @torch.inference_mode()
    def decode(self, seq_ids: Iterable[str]) -> StepResult:
        started = time.perf_counter()
        wanted = [self._seqs[seq_id] for seq_id in seq_ids]
        if not wanted:
            return StepResult({}, "idle", 0, 0, 0.0)
        for seq in wanted:
            if seq.pending or seq.last_token < 0:
                raise ValueError(f"sequence {seq.seq_id} has not finished its prefill")
        # The rows from the first to the last wanted one take part: a plain slice of the cache. A
        # row in between that is not decoding writes a throwaway key at its next free position,
        # which its next write overwrites, and its output is ignored.
        first = min(seq.row for seq in wanted)
        rows = self._by_row[first : max(seq.row for seq in wanted) + 1]
        positions = torch.tensor([seq.length for seq in rows], device=self.device)
        kv_length = int(max(seq.length for seq in rows)) + 1
        self._cache.reserve(len(self._by_row), kv_length)
        self._cache.plan_decode(positions, kv_length, first_row=first)
        last = [max(seq.last_token, 0) for seq in rows]
        try:
            logits = self.model(
                input_ids=torch.tensor(last, device=self.device)[:, None],
                position_ids=positions[:, None],
                attention_mask=self._masks.decode(positions, kv_length, self.dtype),
                cache=self._cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        except torch.cuda.OutOfMemoryError as error:
            raise StepOutOfMemory(str(error)) from error
        finally:
            self._cache.clear_plan()
        for seq in wanted:
            seq.length += 1
        tokens, failed = self._choose(wanted, logits[[seq.row - first for seq in wanted]])
        return StepResult(tokens, "decode", len(wanted), len(wanted), time.perf_counter() - started, failed)

    def split(self, seq_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Two halves by row, so each half decodes over (about) half the rows."""
        ordered = sorted(seq_ids, key=lambda seq_id: self._seqs[seq_id].row)
        middle = len(ordered) // 2
        return ordered[:middle], ordered[middle:]

    def free_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _choose(self, seqs: Sequence[_Sequence], logits: torch.Tensor) -> tuple[dict[str, int], dict[str, str]]:
        """The next token of each sequence; a sequence whose logits hold NaN (or +inf) fails alone."""
        broken = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1).tolist()
        failed = {
            seq.seq_id: "the model's logits were not finite" for seq, bad in zip(seqs, broken, strict=True) if bad
        }
        if failed:
            keep = [i for i, bad in enumerate(broken) if not bad]
            seqs, logits = [seqs[i] for i in keep], logits[keep]
        if not seqs:
            return {}, failed
        suppress = [seq.suppress_until_min if seq.generated < seq.params.min_tokens else () for seq in seqs]
        chosen = choose_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs], suppress)
        for seq, token in zip(seqs, chosen, strict=True):
            seq.last_token = token
            seq.generated += 1
        return {seq.seq_id: token for seq, token in zip(seqs, chosen, strict=True)}, failed

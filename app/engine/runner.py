"""Model runners: one model, one KV cache, one forward at a time. Torch only; nothing async here.

The scheduler owns the policy (who joins, what each step does, when a request may end); the
runner owns the tensors. It implements app.contract.step.StepBackend: between steps sequences are
added and released; a step (a ``StepPlan``) is a packed prefill of prompt chunks, one decode token
for every sequence that has finished its prompt, or both in one packed forward (a mixed step).
Each step reports where it left every sequence it ran (``RowOutput``): the scheduler's only
source for its progress.

``ModelRunner`` is the dynamic path (a row cache that grows and stays compact, any shapes);
``app.engine.static_runner.StaticModelRunner`` is the static path behind ``--cuda-graphs``. Both
share ``BaseRunner``: the sequence table, the packed prefill and the token choice.
"""

from __future__ import annotations

import inspect
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog
import torch
from transformers import PreTrainedModel

from app.contract.failures import FailureCode
from app.contract.model import MemoryPool
from app.contract.sampling import SamplingParams
from app.contract.step import (
    PrefillChunk,
    PrefixCacheStats,
    RowOutput,
    StepOutOfMemory,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from app.engine.attention_masks import MaskShapes
from app.engine.grammar import GrammarCompiler, GrammarMasks, SequenceGrammar
from app.engine.kv_cache import RowKVCache, Segment
from app.engine.logprobs import RawLogprobs
from app.engine.memory_pools import PagePool, PageShape
from app.engine.prefix_cache import DEFAULT_BLOCK_TOKENS, LayerLayout, PrefixKVCache, PrefixMatch
from app.engine.sampling import TokenHistory, choose_tokens, seeded_generator
from app.engine.slot_cache import SlotShape
from app.engine.tool_call_grammar import ToolCallGrammar

log = structlog.get_logger("engine.runner")


@dataclass(slots=True)
class SequenceState:
    """What the runner keeps of a sequence: where its keys are, and what sampling needs."""

    seq_id: str
    row: int
    params: SamplingParams
    stop_token_ids: tuple[int, ...]  # masked while the scheduler says the sequence must continue
    generator: torch.Generator | None
    prompt: tuple[int, ...]
    # Tokens whose keys are in its row (prompt, then generated): what each step reports of it.
    num_computed: int = 0
    last_token: int = -1  # the newest token, not yet in the cache
    history: TokenHistory | None = None  # kept only when the request has penalties
    grammar: SequenceGrammar | ToolCallGrammar | None = None  # when the request constrains its output
    generated: list[int] = field(default_factory=list)  # its tokens, for the prefix cache to key
    # The prefix cache: the blocks this sequence matched (pinned until it leaves), the first
    # position whose sliding-window keys in its row are real (before it: whatever the row held,
    # hidden by the mask), and whether a failure makes its keys unfit to keep.
    prefix_blocks: tuple[bytes, ...] = ()
    sliding_from: int = 0
    unfit: bool = False

    @property
    def pending(self) -> tuple[int, ...]:
        """Prompt tokens not yet in the cache."""
        return self.prompt[self.num_computed :]


class PrefillCache(Protocol):
    """What the shared prefill needs of a cache (RowKVCache, SlotKVCache)."""

    @property
    def allocated_bytes(self) -> int: ...

    def reserve(self, rows: int, positions: int) -> None: ...

    def plan_prefill(self, segments: tuple[Segment, ...]) -> None: ...

    def clear_plan(self) -> None: ...

    def read_keys(self, row: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def write_keys(self, row: int, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None: ...


def cache_argument(model: PreTrainedModel) -> str:
    """The name a model's forward takes its cache by: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before the rename (a wrong name would be swallowed by ``**kwargs``)."""
    parameters = inspect.signature(type(model).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes no cache argument")


class BaseRunner(ABC):
    """What every runner shares: the sequence table, packed chunked prefill, and token choice.

    Subclasses own where a sequence's keys live (``_claim_row``/``release``) and the forward of a
    decode step (``_decode_logits``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cache: PrefillCache,
        *,
        max_batch_size: int,
        max_context: int,
        stop_token_ids: Iterable[int],
        prefix_cache_bytes: int = 0,
    ) -> None:
        """``prefix_cache_bytes``: the prefix KV cache's pool, reserved now (0: no prefix cache)."""
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.stop_token_ids = tuple(sorted(set(stop_token_ids)))
        self._masks = MaskShapes.for_config(model.config.get_text_config())
        self.vocab_size = int(model.config.get_text_config().vocab_size)  # the logits' width
        self._cache = cache
        self._cache_arg = cache_argument(model)
        self._seqs: dict[str, SequenceState] = {}
        # Structured outputs: the loader sets it once it knows the vocabulary (the logits' width).
        self.grammars: GrammarCompiler | None = None
        self._grammar_masks: GrammarMasks | None = None
        self.prefix_cache = None
        if prefix_cache_bytes > 0:
            shape = SlotShape.for_model(model)
            page = PageShape(shape.kv_heads, DEFAULT_BLOCK_TOKENS, shape.head_dim)
            pool = PagePool(page, prefix_cache_bytes, self.dtype, self.device)
            self.prefix_cache = PrefixKVCache(LayerLayout.for_config(model.config.get_text_config()), pool)

    # -- membership ----------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return self.max_batch_size - len(self._seqs)

    @property
    def kv_cache_bytes(self) -> int:
        return self._cache.allocated_bytes

    def memory_pools(self) -> tuple[MemoryPool, ...]:
        """What this runner holds for its whole life (reserved at start-up): /health and /stats."""
        pools = [self._kv_pool()]
        if self.prefix_cache is not None:
            pool = self.prefix_cache.pool
            figures = (
                ("pages", pool.pages),
                ("page_bytes", pool.page_bytes),
                ("block_tokens", self.prefix_cache.block_tokens),
            )
            pools.append(MemoryPool("prefix_cache", pool.reserved_bytes, figures))
        if self._grammar_masks is not None:
            pools.append(MemoryPool("grammar_masks", self._grammar_masks.nbytes, (("rows", self.max_batch_size),)))
        return tuple(pools)

    def _kv_pool(self) -> MemoryPool:
        return MemoryPool("kv_cache", self._cache.allocated_bytes, (("rows", self.max_batch_size),))

    def reserve_grammar_masks(self) -> None:
        """The grammar engine's bitmask for every row, now rather than at the first constrained step."""
        if self._grammar_masks is None:
            self._grammar_masks = GrammarMasks(self.max_batch_size, self.vocab_size, self.device)

    def sequence_ids(self) -> list[str]:
        return [seq.seq_id for seq in sorted(self._seqs.values(), key=lambda seq: seq.row)]

    @abstractmethod
    def _claim_row(self) -> int:
        """The row (or slot) of the cache a new sequence gets."""

    @abstractmethod
    def release(self, seq_id: str) -> None:
        """Free a sequence's row at once (idempotent)."""

    @abstractmethod
    def _decode_logits(self, wanted: Sequence[SequenceState]) -> torch.Tensor:
        """One forward of a decode step: logits [len(wanted), vocab], in ``wanted``'s order."""

    @abstractmethod
    def _copy_keys(self, source_row: int, target_row: int, length: int) -> None:
        """Copy the first ``length`` positions of one row's keys and values into another's."""

    def add(
        self,
        seq_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Iterable[int] | None = None,
        fork_from: str | None = None,
    ) -> int:
        """A new sequence; with ``fork_from`` (a prefilled sequence with the same prompt) it starts
        with that one's keys for all but its last prompt token, which its own prefill computes;
        otherwise with the longest prefix the prefix cache holds of its prompt, if any. Returns the
        prompt tokens it starts with (its prefill is the rest)."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already in the runner")
        if not self.free_rows:
            raise RuntimeError("no free row: the scheduler admitted more than max_batch_size")
        if not prompt:
            raise ValueError("empty prompt")
        parent = None if fork_from is None else self._seqs[fork_from]
        if parent is not None and (parent.prompt != tuple(prompt) or parent.pending):
            raise ValueError(f"sequence {seq_id} cannot fork from {fork_from}: another prompt, or not prefilled")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        # Any int64 seed (a negative one too) is a generator state: torch takes it modulo 2**64.
        generator = None if params.greedy else seeded_generator(seed % 2**64, self.device)
        stops = self.stop_token_ids if stop_token_ids is None else tuple(sorted(stop_token_ids))
        seq = SequenceState(seq_id, self._claim_row(), params, stops, generator, tuple(prompt))
        if params.penalized:
            seq.history = TokenHistory(prompt, self.vocab_size, self.device)
        if params.grammar is not None:
            if self.grammars is None:
                raise ValueError("this runner has no grammar engine")
            seq.grammar = self.grammars.sequence_grammar(params.grammar)
        self._seqs[seq_id] = seq
        if parent is not None:
            # Its first len - 1 positions hold the prompt's keys, whatever it has generated since.
            self._copy_keys(parent.row, seq.row, len(prompt) - 1)
            seq.num_computed = len(prompt) - 1
            seq.sliding_from = parent.sliding_from
        elif self.prefix_cache is not None:
            self._start_from_prefix(seq, self.prefix_cache.lookup(seq.prompt, seq.params.prefix_salt))
        return seq.num_computed

    def _start_from_prefix(self, seq: SequenceState, match: PrefixMatch) -> None:
        if not match.blocks or self.prefix_cache is None:
            return
        try:
            seq.sliding_from = self.prefix_cache.load(match, self._cache, seq.row)
        except Exception:  # the sequence just prefills its whole prompt
            log.exception("prefix_cache_load_failed", request_id=seq.seq_id)
            return
        self.prefix_cache.pin(match.blocks)
        seq.prefix_blocks = match.blocks
        seq.num_computed = match.length

    def _leave(self, seq: SequenceState) -> None:
        """A sequence is leaving (before its row is freed): what is in its row goes to the prefix
        cache, and the blocks it matched are unpinned."""
        if self.prefix_cache is None:
            return
        self.prefix_cache.unpin(seq.prefix_blocks)
        seq.prefix_blocks = ()
        if not seq.unfit:
            self._keep_prefix(seq, seq.num_computed)

    def _keep_prefix(self, seq: SequenceState, end: int) -> None:
        """Its first ``end`` positions into the prefix cache (those really in its row)."""
        if self.prefix_cache is None:
            return
        tokens = (*seq.prompt, *seq.generated)[:end]
        try:
            salt = seq.params.prefix_salt
            self.prefix_cache.store(tokens, min(end, seq.num_computed), self._cache, seq.row, seq.sliding_from, salt)
        except Exception:  # a cache that cannot keep this prefix must not fail the request
            log.exception("prefix_cache_store_failed", request_id=seq.seq_id)

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return None if self.prefix_cache is None else self.prefix_cache.stats()

    def pending_prompt(self, seq_id: str) -> int:
        return len(self._seqs[seq_id].pending)

    # -- steps -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, plan: StepPlan, must_continue: Collection[str] = ()) -> StepResult:
        """The plan's forward: a decode step when it holds no prompt chunk, else one packed forward
        in which each decode row is a segment of one token (its last one, at its next position),
        so a new prompt's chunk rides along with the running streams instead of stalling them."""
        if plan.chunks:
            return self._packed_step(plan.decode, plan.chunks, must_continue)
        return self.decode(plan.decode, must_continue)

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk], must_continue: Collection[str] = ()) -> StepResult:
        """A step of prompt chunks alone (the warm-up's and the engine tests' shorthand)."""
        return self._packed_step((), chunks, must_continue)

    def _packed_step(
        self, decode_ids: Sequence[str], chunks: Sequence[PrefillChunk], must_continue: Collection[str]
    ) -> StepResult:
        """A packed forward over decode rows (segments of one token) and prompt chunks; logits are
        kept for every decode row and for each chunk that ends its prompt, and one ``_choose``
        picks all of their tokens."""
        started = time.perf_counter()
        segments: list[Segment] = []
        input_ids: list[int] = []
        positions: list[int] = []
        producing: list[tuple[SequenceState, int]] = []  # (sequence, index of its last new token)
        for seq_id in decode_ids:
            seq = self._seqs[seq_id]
            if seq.pending or seq.last_token < 0:
                raise ValueError(f"sequence {seq_id} has not finished its prefill")
            segments.append(Segment(seq.row, seq.num_computed, 1))
            input_ids.append(seq.last_token)
            positions.append(seq.num_computed)
            producing.append((seq, len(input_ids) - 1))
        for chunk in chunks:
            seq = self._seqs[chunk.seq_id]
            take = seq.pending[: chunk.tokens]
            if not take:
                raise ValueError(f"sequence {chunk.seq_id} has no prompt left to prefill")
            segments.append(Segment(seq.row, seq.num_computed, len(take)))
            input_ids.extend(take)
            positions.extend(range(seq.num_computed, seq.num_computed + len(take)))
            if len(take) == len(seq.pending):
                producing.append((seq, len(input_ids) - 1))
        if not segments:
            return StepResult({}, "idle", 0, 0, 0.0)
        keep = torch.tensor([index for _, index in producing] or [len(input_ids) - 1], device=self.device)
        try:
            # Growing the cache for this step can run out of memory too: the same split-and-retry.
            self._cache.reserve(len(self._seqs), max(s.start + s.length for s in segments) + 1)
            self._cache.plan_prefill(tuple(segments))
            logits = self.model(
                input_ids=torch.tensor([input_ids], device=self.device),
                position_ids=torch.tensor([positions], device=self.device),
                attention_mask=self._masks.prefill(segments, self.dtype, self.device),
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_arg: self._cache},
            ).logits[0]
        except torch.cuda.OutOfMemoryError as error:
            raise StepOutOfMemory(str(error)) from error
        finally:
            self._cache.clear_plan()
        for seg, seq_id in zip(segments, [*decode_ids, *(chunk.seq_id for chunk in chunks)], strict=True):
            self._seqs[seq_id].num_computed += seg.length
        chosen = [seq for seq, _ in producing]
        tokens, failed, logprobs = self._choose(chosen, logits, must_continue) if producing else ({}, {}, {})
        for seq in chosen[len(decode_ids) :]:  # the prompts now in: for requests that start the same way
            if not seq.unfit:
                self._keep_prefix(seq, len(seq.prompt))
        seconds = time.perf_counter() - started
        prompt_tokens = len(input_ids) - len(decode_ids)
        kind = "mixed" if decode_ids else "prefill"
        stepped = [*decode_ids, *(chunk.seq_id for chunk in chunks)]
        rows = self._rows_after(stepped, tokens, failed, logprobs)
        return StepResult(rows, kind, len(segments), len(input_ids), seconds, failed, prompt_tokens=prompt_tokens)

    @torch.inference_mode()
    def decode(self, seq_ids: Iterable[str], must_continue: Collection[str] = ()) -> StepResult:
        """One token for each of ``seq_ids``, whose prompts are all in the cache."""
        started = time.perf_counter()
        wanted = [self._seqs[seq_id] for seq_id in seq_ids]
        if not wanted:
            return StepResult({}, "idle", 0, 0, 0.0)
        for seq in wanted:
            if seq.pending or seq.last_token < 0:
                raise ValueError(f"sequence {seq.seq_id} has not finished its prefill")
        try:
            logits = self._decode_logits(wanted)
        except torch.cuda.OutOfMemoryError as error:
            raise StepOutOfMemory(str(error)) from error
        for seq in wanted:
            seq.num_computed += 1
        tokens, failed, logprobs = self._choose(wanted, logits, must_continue)
        seconds = time.perf_counter() - started
        rows = self._rows_after([seq.seq_id for seq in wanted], tokens, failed, logprobs)
        return StepResult(rows, "decode", len(wanted), len(wanted), seconds, failed)

    def _rows_after(
        self,
        stepped: Sequence[str],
        tokens: dict[str, int],
        failed: dict[str, FailureCode],
        logprobs: dict[str, TokenLogprobs],
    ) -> dict[str, RowOutput]:
        """Where the step left each sequence it ran (those that failed are in ``failed`` only)."""
        rows = {}
        for seq_id in stepped:
            if seq_id in failed:
                continue
            token = tokens.get(seq_id)
            entry = logprobs.get(seq_id)
            got = () if token is None else (token,)
            rows[seq_id] = RowOutput(self._seqs[seq_id].num_computed, got, () if entry is None else (entry,))
        return rows

    def split(self, seq_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Two halves by row, so that each half decodes over (about) half the rows."""
        ordered = sorted(seq_ids, key=lambda seq_id: self._seqs[seq_id].row)
        middle = len(ordered) // 2
        return ordered[:middle], ordered[middle:]

    def free_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _choose(
        self, seqs: Sequence[SequenceState], logits: torch.Tensor, must_continue: Collection[str]
    ) -> tuple[dict[str, int], dict[str, FailureCode], dict[str, TokenLogprobs]]:
        """The next token of each sequence (those in ``must_continue`` may not pick a stop token),
        and the raw logprobs of those that asked; a sequence whose logits hold NaN (or +inf), or
        whose sampling fails, fails alone."""
        # A row's maximum is NaN if any of its logits is, and +inf if one is: one pass, not three.
        broken = (~torch.isfinite(logits.amax(dim=-1))).tolist()
        failed: dict[str, FailureCode] = {
            seq.seq_id: "non_finite_logits" for seq, bad in zip(seqs, broken, strict=True) if bad
        }
        for seq in seqs:
            if seq.seq_id in failed:
                seq.unfit = True  # its keys may hold what made its logits non-finite
        if failed:
            keep = [i for i, bad in enumerate(broken) if not bad]
            seqs, logits = [seqs[i] for i in keep], logits[keep]
        if not seqs:
            return {}, failed, {}
        raw = RawLogprobs(logits, [s.params.logprobs for s in seqs])  # before anything edits the logits
        # A constrained Harmony answer may not end before its final channel has opened.
        suppress = [
            seq.stop_token_ids if seq.seq_id in must_continue or (seq.grammar and not seq.grammar.active) else ()
            for seq in seqs
        ]
        grammars = [seq.grammar for seq in seqs]
        chosen = choose_tokens(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            suppress,
            [s.history for s in seqs],
            constrain=self._constrainer(grammars),
        )
        tokens = {}
        for seq, token in zip(seqs, chosen, strict=True):
            if token is None:
                failed[seq.seq_id] = "sampling_failed"
                continue
            if seq.grammar is not None and not self._advance_grammar(seq, token):
                failed[seq.seq_id] = "grammar_failed"
                continue
            seq.last_token = token
            seq.generated.append(token)
            if seq.history is not None:
                seq.history.add(token)
            tokens[seq.seq_id] = token
        logprobs = {seqs[i].seq_id: entry for i, entry in raw.chosen(chosen).items() if seqs[i].seq_id in tokens}
        return tokens, failed, logprobs

    def _constrainer(
        self, grammars: Sequence[SequenceGrammar | ToolCallGrammar | None]
    ) -> Callable[[torch.Tensor], None] | None:
        """What masks this step's constrained rows (None when no row is constrained now)."""
        if not any(g is not None and (g.constrains or isinstance(g, ToolCallGrammar)) for g in grammars):
            return None
        self.reserve_grammar_masks()
        masks = self._grammar_masks
        assert masks is not None
        return lambda logits: masks.apply(logits, grammars)

    def _advance_grammar(self, seq: SequenceState, token: int) -> bool:
        """The grammar follows the chosen token; a fault in it fails this sequence alone."""
        assert seq.grammar is not None
        try:
            return seq.grammar.accept(token)
        except Exception:
            log.exception("grammar_failed", request_id=seq.seq_id)
            return False


class ModelRunner(BaseRunner):
    """The dynamic path: a row cache that stays compact (rows 0..n-1), reserved at start-up for
    ``reserve_positions`` positions per row (0: none, it grows on demand and is dropped when idle)."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_batch_size: int,
        max_context: int,
        stop_token_ids: Iterable[int],
        prefix_cache_bytes: int = 0,
        reserve_positions: int = 0,
    ) -> None:
        layers = model.config.get_text_config().num_hidden_layers
        self._rows = RowKVCache(layers, max_batch_size, max_context)
        if reserve_positions > 0:
            shape = SlotShape.for_model(model)
            self._rows.reserve_at_start(shape.kv_heads, shape.head_dim, reserve_positions, model.dtype, model.device)
        super().__init__(
            model,
            self._rows,
            max_batch_size=max_batch_size,
            max_context=max_context,
            stop_token_ids=stop_token_ids,
            prefix_cache_bytes=prefix_cache_bytes,
        )

    def _kv_pool(self) -> MemoryPool:
        figures = (("rows", self.max_batch_size), ("positions", self._rows.reserved_positions))
        return MemoryPool("kv_cache", self._rows.allocated_bytes, (*figures, ("max_positions", self.max_context)))

    def _in_row_order(self) -> list[SequenceState]:
        return sorted(self._seqs.values(), key=lambda seq: seq.row)

    def _claim_row(self) -> int:
        return len(self._seqs)  # rows in use are always 0..n-1

    @torch.inference_mode()
    def release(self, seq_id: str) -> None:
        """Free a sequence's row at once (idempotent); the last row moves into the hole."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self._leave(seq)
        last_row = len(self._seqs)
        if seq.row != last_row:
            last = next(other for other in self._seqs.values() if other.row == last_row)
            self._rows.move_row(last.row, seq.row, last.num_computed)
            last.row = seq.row
        if not self._seqs:
            self._rows.release()

    def _copy_keys(self, source_row: int, target_row: int, length: int) -> None:
        self._rows.copy_row(source_row, target_row, length)

    def _decode_logits(self, wanted: Sequence[SequenceState]) -> torch.Tensor:
        # The rows from the first to the last wanted one take part: a plain slice of the cache (a
        # split batch really uses less memory). A row in between that is not decoding writes a
        # throwaway key at its next free position, which its next write overwrites, and its
        # output is ignored.
        first = min(seq.row for seq in wanted)
        rows = self._in_row_order()[first : max(seq.row for seq in wanted) + 1]
        positions = torch.tensor([seq.num_computed for seq in rows], device=self.device)
        kv_length = int(max(seq.num_computed for seq in rows)) + 1
        self._rows.reserve(len(self._seqs), kv_length)
        self._rows.plan_decode(positions, kv_length, first_row=first)
        last = [max(seq.last_token, 0) for seq in rows]
        try:
            logits = self.model(
                input_ids=torch.tensor(last, device=self.device)[:, None],
                position_ids=positions[:, None],
                attention_mask=self._masks.decode(positions, kv_length, self.dtype),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: self._rows},
            ).logits[:, -1]
        finally:
            self._rows.clear_plan()
        return logits[[seq.row - first for seq in wanted]]

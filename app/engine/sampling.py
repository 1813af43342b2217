"""Next-token choice for a batch of rows, each with its own parameters and random generator.

Rows are processed one by one: a row's draw depends only on its own logits and generator, so a
seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog
import torch

from app.contract.sampling import SamplingParams

log = structlog.get_logger("engine.sampling")


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class TokenHistory:
    """What the penalties look at, kept over the vocabulary on the logits' device: which tokens the
    prompt or the output holds, and how often each came in the output. A new token is one indexed
    write; applying the penalties needs no host-side work however long the prompt is."""

    def __init__(self, prompt: Sequence[int], vocab_size: int, device: torch.device) -> None:
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def add(self, token: int) -> None:
        self.seen[token] = True
        self.output_counts[token] += 1


def apply_penalties(row: torch.Tensor, params: SamplingParams, history: TokenHistory) -> None:
    """Penalise one row of float logits in place (vLLM's order: repetition, then frequency and presence)."""
    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty
        row.copy_(torch.where(history.seen, torch.where(row > 0, row / penalty, row * penalty), row))
    if params.presence_penalty or params.frequency_penalty:
        counts = history.output_counts
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def _filtered_logits(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The row's logits after temperature, with the tokens that min-p, top-k and top-p rule out at
    -inf (each filter judges the temperature-scaled distribution, as vLLM's do)."""
    row = row / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(row, dim=-1)
        row = row.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if 0 < params.top_k < row.shape[-1]:
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first is always kept.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop_sorted[0] = False  # kept even when top_p is below what float32 holds
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        row = row.masked_fill(drop, float("-inf"))
    return row


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    suppress: Sequence[Sequence[int]],
    histories: Sequence[TokenHistory | None] | None = None,
    constrain: Callable[[torch.Tensor], None] | None = None,
) -> list[int | None]:
    """One token id per row of ``logits`` [rows, vocab]; ``suppress[i]`` are ids row i may not pick,
    ``histories[i]`` what row i's penalties look at (None: the row has none), ``constrain`` masks
    the grammar-constrained rows in place (last, after logit_bias and penalties). A row whose
    choice fails (its penalties or its sampling raise) gets None, and is logged: the others go on."""
    logits = logits.float()
    penalized = (
        [] if histories is None else [(i, h) for i, h in enumerate(histories) if h is not None and params[i].penalized]
    )
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    failed: set[int] = set()
    if any(suppress) or penalized or biased or constrain is not None:
        logits = logits.clone()  # .float() of a float tensor is the tensor itself: never edit the model's
        for i in biased:
            bias = params[i].logit_bias
            biased_ids = [token for token, _ in bias]
            values = torch.tensor([value for _, value in bias], dtype=logits.dtype, device=logits.device)
            logits[i, biased_ids] += values
        for i, ids in enumerate(suppress):
            if ids:
                logits[i, list(ids)] = float("-inf")
        for i, history in penalized:
            try:
                apply_penalties(logits[i], params[i], history)
            except Exception:
                log.exception("sampling_failed", row=i, stage="penalties")
                failed.add(i)
        if constrain is not None:
            constrain(logits)
    chosen: list[int | None] = [None] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy and i not in failed]
    if greedy:
        # One argmax for all greedy rows: a row's result does not depend on the others.
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, torch.argmax(rows, dim=-1).tolist(), strict=True):
            chosen[i] = int(token)
    for i, p in enumerate(params):
        if not p.greedy and i not in failed:
            try:
                probs = torch.softmax(_filtered_logits(logits[i], p), dim=-1)
                chosen[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
            except Exception:
                log.exception("sampling_failed", row=i, stage="sampling")
    return chosen

"""Next-token choice for a batch of rows, each with its own parameters and random generator.

Rows are processed one by one: a row's draw depends only on its own logits and generator, so a
seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from app.engine.params import SamplingParams


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(slots=True)
class TokenHistory:
    """What the penalties look at: the prompt's distinct tokens and how often each output token came."""

    prompt_ids: frozenset[int]
    output_counts: Counter[int] = field(default_factory=Counter)

    def add(self, token: int) -> None:
        self.output_counts[token] += 1


def apply_penalties(row: torch.Tensor, params: SamplingParams, history: TokenHistory) -> None:
    """Penalise one row of float logits in place (vLLM's order: repetition, then frequency and presence)."""
    if params.repetition_penalty != 1.0:
        seen = history.prompt_ids.union(history.output_counts)
        if seen:
            ids = torch.tensor(sorted(seen), device=row.device)
            picked = row[ids]
            row[ids] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and history.output_counts:
        ids = torch.tensor(list(history.output_counts), device=row.device)
        counts = torch.tensor(list(history.output_counts.values()), dtype=row.dtype, device=row.device)
        row[ids] -= params.frequency_penalty * counts + params.presence_penalty


def _filtered_logits(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    row = row / params.temperature
    if 0 < params.top_k < row.shape[-1]:
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first is always kept.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        row = row.masked_fill(drop, float("-inf"))
    return row


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    suppress: Sequence[Sequence[int]],
    histories: Sequence[TokenHistory | None] | None = None,
) -> list[int]:
    """One token id per row of ``logits`` [rows, vocab]; ``suppress[i]`` are ids row i may not pick,
    ``histories[i]`` what row i's penalties look at (None: the row has none)."""
    logits = logits.float()
    penalized = (
        [] if histories is None else [(i, h) for i, h in enumerate(histories) if h is not None and params[i].penalized]
    )
    if any(suppress) or penalized:
        logits = logits.clone()  # .float() of a float tensor is the tensor itself: never edit the model's
        for i, ids in enumerate(suppress):
            if ids:
                logits[i, list(ids)] = float("-inf")
        for i, history in penalized:
            apply_penalties(logits[i], params[i], history)
    chosen = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        # One argmax for all greedy rows: a row's result does not depend on the others.
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, torch.argmax(rows, dim=-1).tolist(), strict=True):
            chosen[i] = int(token)
    for i, p in enumerate(params):
        if not p.greedy:
            probs = torch.softmax(_filtered_logits(logits[i], p), dim=-1)
            chosen[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return chosen

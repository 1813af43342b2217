"""Logprobs of the chosen tokens, from the model's raw logits (vLLM's default, "raw logprobs").

They are read before temperature, penalties, logit_bias, stop-token suppression and any grammar
mask: what the model itself thinks of each token, whatever the sampler then did with it. Only the
rows that asked are touched, in one batched ``log_softmax``; a step where no row asked does no
work here at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.contract.step import TokenLogprobs


class RawLogprobs:
    """The log-softmax of the rows that asked, taken when made: later edits to the logits (which
    the sampler and a grammar make in place) cannot change it."""

    def __init__(self, logits: torch.Tensor, counts: Sequence[int | None]) -> None:
        """``counts[i]``: how many alternatives row i wants besides its chosen token (None: none)."""
        self._counts = list(counts)
        self._rows = [i for i, k in enumerate(counts) if k is not None]
        # Indexing with a list copies the rows; float32 whatever the model's dtype, as vLLM's are.
        self._logprobs = torch.log_softmax(logits[self._rows].float(), dim=-1) if self._rows else None

    def chosen(self, tokens: Sequence[int | None]) -> dict[int, TokenLogprobs]:
        """Row index -> its chosen token's logprob and its likeliest alternatives (rows whose
        choice failed, ``tokens[i]`` None, get nothing)."""
        if self._logprobs is None:
            return {}
        picked = [(j, i) for j, i in enumerate(self._rows) if tokens[i] is not None]
        if not picked:
            return {}
        logprobs = self._logprobs[[j for j, _ in picked]]
        ids = torch.tensor([tokens[i] for _, i in picked], dtype=torch.long, device=logprobs.device)
        own = logprobs.gather(1, ids[:, None])
        widest = max(self._counts[i] or 0 for _, i in picked)
        # One topk for every row at the widest k (sorted, likeliest first); each row keeps its own k.
        top = torch.topk(logprobs, widest, dim=-1) if widest else None
        values = (own if top is None else torch.cat([own, top.values], dim=1)).tolist()  # one copy to the host
        top_ids = top.indices.tolist() if top is not None else [[] for _ in picked]
        out = {}
        for (_, i), row, row_ids in zip(picked, values, top_ids, strict=True):
            k = self._counts[i] or 0
            out[i] = TokenLogprobs(row[0], tuple(zip(row_ids[:k], row[1 : k + 1], strict=True)))
        return out

"""What a request asks of generation: sampling and stopping. Plain data, no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from app.contract.grammar import GrammarSpec


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest one (vLLM's); 0: off
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenised text by the relay
    # OpenAI's penalties on the tokens generated so far (vLLM's reading): each logit loses
    # presence_penalty once if its token has appeared and frequency_penalty per appearance.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and transformers' extension, over the prompt and the output: a seen token's logit is
    # divided by it when positive and multiplied by it when negative. 1.0 leaves logits alone.
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: (token id, bias added to its logit), sorted by id; ids are in the vocabulary.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no logprobs; k (0..20): each token's logprob and its k likeliest alternatives.
    logprobs: int | None = None
    grammar: GrammarSpec | None = None  # constrained decoding (structured outputs)
    # The prefix KV cache's namespace: a hash of the tenant and the request's cache_salt (made by
    # the HTTP layer, never a client's text), the parent of the first block's key, so prefixes are
    # shared only within it. b"": no API key and no salt, the one shared namespace.
    prefix_salt: bytes = b""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def deterministic(self) -> bool:
        """The same request gives the same tokens: greedy, or sampled from a fixed seed."""
        return self.greedy or self.seed is not None


# What a float field is when neither the request nor a default sets it: it changes nothing.
NEUTRAL_FLOATS = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """What a request that leaves a sampling field out gets (a request's own fields always win):
    the model's recommended sampling (its card in the registry, its generation_config.json, or
    --generation-config's folder) and the server's --max-tokens-default. None: the neutral value
    (temperature 1, top_p 1, no top-k or min-p, no repetition penalty; max_tokens: the rest of
    the context)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    source: str = "neutral"  # where the sampling defaults came from, as /health says

    def pick(self, name: str, requested: float | None) -> float:
        """A float field's value: the request's own always wins, then this default, then neutral."""
        if requested is not None:
            return requested
        default: float | None = getattr(self, name)
        return NEUTRAL_FLOATS[name] if default is None else default

    def shown(self) -> dict[str, object]:
        """The defaults in force, for /health: the fields set, and where they came from."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}

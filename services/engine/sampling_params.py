"""Per-request sampling parameters, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.structured_output.spec import StructuredOutputSpec

MAX_N = 16
"""Most choices one request may ask for (each is a sequence in the batch)."""
MAX_LOGIT_BIAS = 300
"""Most entries of ``logit_bias`` (OpenAI's limit)."""
LOGIT_BIAS_RANGE = 100.0


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop (field names as in vLLM).

    ``temperature == 0`` means greedy. Filters apply in the order penalties →
    temperature → top-k → top-p → min-p.
    """

    max_tokens: int = 16
    """Most tokens to generate; generation also stops at the model window."""
    temperature: float = 1.0
    """0 for greedy; otherwise logits are divided by it. Must be ≥ 0."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1) keeps all."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set whose probability reaches top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is under min_p × the top token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens seen in prompt or output (HF/CTRL style), must be > 0."""
    presence_penalty: float = 0.0
    """Subtracted once from each token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence of each token already generated, in [-2, 2]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is batched."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the matched string is not part of the output text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation (the token itself is kept in token_ids)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""
    logprobs: int | None = None
    """When set, return the sampled token's log-probability and this many top alternatives."""
    prompt_logprobs: int | None = None
    """When set, return each prompt token's log-probability given the tokens before it (the
    first token has none) and this many top alternatives. Such a prompt is computed whole:
    logits of cached prefix blocks were never kept, so the prefix cache is not used for it."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    min_tokens: int = 0
    """Do not stop on EOS or stop token ids before this many tokens."""
    n: int = 1
    """Choices generated from the prompt; the prompt is prefilled once and its KV blocks shared."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id → bias in [-100, 100] added to its logit before penalties and sampling.
    The ids are checked against the vocabulary where it is known (the input processor)."""

    speculative: bool = True
    """Let the engine speculate for this request (when it runs with a speculative_config):
    the output distribution is the same either way; off trades its speed-up for no verify
    width (say, for a request known not to repeat its input)."""

    # ---- structured output ----
    structured_output: StructuredOutputSpec | None = None
    """Constrain the output to a JSON object or schema, a regex, a choice or an EBNF grammar:
    the sampler masks every token the grammar does not allow next, and the request stops
    once the grammar is complete."""

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise InvalidRequestError(f"{name} must be a list, got {getattr(self, name)!r}", field=name)
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is None:
            self.logit_bias = {}
        if not isinstance(self.logit_bias, dict):
            raise InvalidRequestError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}",
                                      field="logit_bias")
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {why}, got {getattr(self, name)!r}", field=name)

        def finite(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise bad(name, "must be a finite number")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer ≥ 1")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            finite(name)
        if self.temperature < 0:
            raise bad("temperature", "must be ≥ 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad("top_k", "must be an integer ≥ 0 (0 or -1 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", "must be an integer")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= 20
        ):
            raise bad("logprobs", "must be an integer in [0, 20]")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or isinstance(self.prompt_logprobs, bool)
            or not 0 <= self.prompt_logprobs <= 20
        ):
            raise bad("prompt_logprobs", "must be an integer in [0, 20]")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer ≥ 0")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} "
                                      "are allowed", field="logit_bias")
        for t, b in self.logit_bias.items():
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids ≥ 0, got {t!r}", field="logit_bias")
            if (not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b)
                    or not -LOGIT_BIAS_RANGE <= b <= LOGIT_BIAS_RANGE):
                raise InvalidRequestError(f"logit_bias[{t}] must be a number in [-100, 100], got {b!r}",
                                          field="logit_bias")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}", field="stop")
        if not isinstance(self.speculative, bool):
            raise bad("speculative", "must be true or false")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputSpec):
            raise InvalidRequestError("structured_output must be a StructuredOutputSpec", field="structured_output")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidRequestError(
                    f"stop_token_ids must be non-negative integers, got {t!r}", field="stop_token_ids"
                )

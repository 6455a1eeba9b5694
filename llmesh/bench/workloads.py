"""The requests a benchmark sends, as token ids, rebuilt identically from a seed.

Prompts are random token ids rather than text: a gateway and a bare engine then receive
exactly the same tokens (no tokenizer or chat template in between), and compute does not
depend on which tokens they are. ``content_seed`` changes the tokens but not the lengths
or arrival times, so two legs of one comparison can run the same shapes without the
second hitting the prefix cache the first one filled.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

from llmesh.engine.errors import InvalidRequestError

KINDS = ("fixed", "lognormal", "shared-prefix", "chat")

# The chat-like mix: (share, mean input tokens, mean output tokens) of short questions,
# ordinary turns and long-context asks, with lognormal spread around each mean.
CHAT_MIX = ((0.6, 64, 48), (0.3, 256, 128), (0.1, 768, 64))
_CHAT_EDGES = tuple(itertools.accumulate(share for share, _, _ in CHAT_MIX))


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """One request: its prompt and how many tokens it asks for."""

    prompt_token_ids: list[int]
    max_tokens: int
    group: str = ""
    """Which part of the workload it belongs to (system prompt index, chat class)."""


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """What to send; every field is recorded in the result file."""

    kind: str = "fixed"
    num_requests: int = 32
    input_len: int = 128
    output_len: int = 64
    sigma: float = 0.5
    """Spread of lognormal lengths (the normal's standard deviation)."""
    num_prefixes: int = 4
    """shared-prefix: how many distinct system prompts."""
    prefix_len: int = 256
    """shared-prefix: tokens in each system prompt; ``input_len`` is then the question's."""
    vocab_size: int = 512
    """Token ids are drawn from [10, vocab_size)."""
    max_model_len: int = 2048
    """Prompt + output of every request is clipped to fit this window."""
    ignore_eos: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"workload kind must be one of {', '.join(KINDS)}, got {self.kind!r}",
                                      field="kind")
        for name in ("num_requests", "input_len", "output_len", "num_prefixes", "vocab_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if self.vocab_size <= 10:
            raise InvalidRequestError(f"vocab_size must be > 10, got {self.vocab_size}", field="vocab_size")
        if self.sigma < 0:
            raise InvalidRequestError(f"sigma must be >= 0, got {self.sigma}", field="sigma")
        if self.prefix_len < 0:
            raise InvalidRequestError(f"prefix_len must be >= 0, got {self.prefix_len}", field="prefix_len")

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    """A lognormal draw whose mean is ``mean`` (mu chosen so E[x] = mean)."""
    if sigma == 0:
        return max(1, round(mean))
    mu = math.log(mean) - sigma * sigma / 2
    return max(1, round(rng.lognormvariate(mu, sigma)))


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def _fit(cfg: WorkloadConfig, prompt_len: int, out_len: int) -> tuple[int, int]:
    """Clip lengths so prompt + output fits the window (output first keeps >= 1 token)."""
    out_len = min(out_len, cfg.max_model_len - 1)
    return min(prompt_len, cfg.max_model_len - out_len), out_len


def build_requests(cfg: WorkloadConfig, content_seed: int | None = None) -> list[RequestSpec]:
    """The workload's requests in send order. Lengths come from ``cfg.seed``, token ids
    from ``content_seed`` (default: the same seed)."""
    shape = random.Random(cfg.seed)
    content = random.Random(cfg.seed if content_seed is None else (content_seed << 20) ^ 0x5EED)
    out: list[RequestSpec] = []
    if cfg.kind == "shared-prefix":
        prefixes = [_tokens(content, cfg.prefix_len, cfg.vocab_size) for _ in range(cfg.num_prefixes)]
    for i in range(cfg.num_requests):
        if cfg.kind == "fixed":
            n_in, n_out, group = cfg.input_len, cfg.output_len, "fixed"
        elif cfg.kind == "lognormal":
            n_in, n_out = _lognormal(shape, cfg.input_len, cfg.sigma), _lognormal(shape, cfg.output_len, cfg.sigma)
            group = "lognormal"
        elif cfg.kind == "shared-prefix":
            p = i % cfg.num_prefixes  # N system prompts × M questions, interleaved
            n_in, n_out, group = cfg.input_len, cfg.output_len, f"prefix-{p}"
        else:
            u = shape.random()
            c = next((k for k, edge in enumerate(_CHAT_EDGES) if u < edge), len(CHAT_MIX) - 1)
            _, mean_in, mean_out = CHAT_MIX[c]
            n_in, n_out = _lognormal(shape, mean_in, cfg.sigma), _lognormal(shape, mean_out, cfg.sigma)
            group = f"chat-{c}"
        if cfg.kind == "shared-prefix":
            n_q, n_out = _fit(cfg, cfg.prefix_len + n_in, n_out)
            prompt = (prefixes[p] + _tokens(content, n_in, cfg.vocab_size))[:n_q]
        else:
            n_in, n_out = _fit(cfg, n_in, n_out)
            prompt = _tokens(content, n_in, cfg.vocab_size)
        out.append(RequestSpec(prompt, n_out, group))
    return out


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process at ``rate`` requests/s
    (exponential gaps), or all at 0 when the rate is infinite."""
    if rate <= 0:
        raise InvalidRequestError(f"request rate must be > 0 (or inf), got {rate}", field="rate")
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed ^ 0xA771), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out

"""Model choice: the requested model, the default one, or the "auto" policy's pick.

``auto`` chooses between the models file's two size classes, ``small`` and ``large``.
Rules, first match wins — capability rules first (a request the small model would do
badly goes to the large one whatever the tier), then cost rules:

1. only one class is configured → that class (``auto_single_class``);
2. the prompt has more than ``long_prompt_tokens`` tokens → large (``auto_long_prompt``);
3. prompt + max_tokens does not fit the small model's window → large (``auto_window``);
4. the prompt text looks like code, a proof / step-by-step reasoning, or math → large
   (``auto_hint_code``, ``auto_hint_reasoning``, ``auto_hint_math``);
5. the caller's tier is ``batch`` → small (``auto_batch_tier``);
6. otherwise → small (``auto_default``).

Within a class the first model of the models file with a healthy replica is used; when
the chosen class has none but the other has, the other is used and the reason gets the
suffix ``_fallback`` (an answer from the other model beats no answer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from llmesh.errors import invalid_argument, not_found
from llmesh.models_file import ModelsFile
from llmesh.v1 import common_pb2, engine_pb2, router_pb2

AUTO = "auto"
DEFAULT_MAX_TOKENS = 16
"""The engine's default ``max_tokens`` (common.proto), for the window rule."""

TASK_HINTS: dict[str, re.Pattern[str]] = {
    "code": re.compile(
        r"```|\bdef \w+\s*\(|\bfunction\b|\bclass \w+\s*[:({]|#include\s*<|\bimport \w+|\bfn \w+\s*\(|"
        r"\bpublic static\b|\bconsole\.log\b|\bSELECT\b[\s\S]{1,200}\bFROM\b|\b(python|javascript|typescript|"
        r"rust|golang|java|c\+\+|sql|regex|bash) (code|script|function|program|query)\b",
        re.IGNORECASE),
    "reasoning": re.compile(
        r"\bprove\b|\bproof\b|\btheorem\b|\blemma\b|step[- ]by[- ]step|\bderive\b|\bjustify your\b|"
        r"\bthink carefully\b|\bchain of thought\b",
        re.IGNORECASE),
    "math": re.compile(
        r"[∑∫√≤≥≠∀∃∂∞±÷∈⊂]|\\(frac|sum|int|sqrt|cdot|leq|geq)\b|\$[^$\n]{1,200}\$|\b\d+\s*\^\s*\d+|"
        r"\b(integral|derivative|eigenvalues?|polynomial|differential equation|matrix inverse)\b",
        re.IGNORECASE),
}


@dataclasses.dataclass(frozen=True)
class Decision:
    """The model a request goes to, and why (a metric label and a span attribute)."""

    model: str
    reason: str


@dataclasses.dataclass(frozen=True)
class AutoPolicy:
    """The knobs of the "auto" rules (RouterConfig.auto_*)."""

    long_prompt_tokens: int = 1024
    task_hints: bool = True
    batch_tier_small: bool = True


def task_hint(text: str) -> str | None:
    """The first task kind whose pattern matches ``text`` (code, reasoning, math), if any."""
    for kind, pattern in TASK_HINTS.items():
        if pattern.search(text):
            return kind
    return None


class ModelPolicy:
    """Decides the model of each request. ``healthy(model)`` counts a model's healthy
    replicas and ``window(model)`` gives its max_model_len (0 when not known yet)."""

    def __init__(self, models: ModelsFile, auto: AutoPolicy, healthy: Callable[[str], int],
                 window: Callable[[str], int]) -> None:
        self.models = models
        self.auto = auto
        self.healthy = healthy
        self.window = window
        self.by_class = {c: [m.name for m in models.models if m.size_class == c] for c in ("small", "large")}

    def decide(self, request: router_pb2.RouteRequest) -> Decision:
        name = request.model
        if not name:
            return Decision(self.models.default_model, "default")
        if name == AUTO:
            return self._auto(request)
        if self.models.get(name) is None:
            raise not_found(f"model {name!r} is not served here; available models: "
                            f"{', '.join(self.models.names)} (or {AUTO!r} to let the router choose)")
        return Decision(name, "explicit")

    def _auto(self, request: router_pb2.RouteRequest) -> Decision:
        small, large = self.by_class["small"], self.by_class["large"]
        if not small or not large:
            return self._in_class("small" if small else "large", "auto_single_class")
        small_model = self._in_class("small", "").model
        n = len(prompt_tokens(request, small_model, strict=False))
        max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        window = self.window(small_model)
        if n > self.auto.long_prompt_tokens:
            return self._in_class("large", "auto_long_prompt")
        if window and n + max_tokens > window:
            return self._in_class("large", "auto_window")
        if self.auto.task_hints and request.prompt_text:
            kind = task_hint(request.prompt_text)
            if kind is not None:
                return self._in_class("large", f"auto_hint_{kind}")
        if self.auto.batch_tier_small and request.tier.lower() == "batch":
            return self._in_class("small", "auto_batch_tier")
        return self._in_class("small", "auto_default")

    def _in_class(self, size_class: str, reason: str) -> Decision:
        names = self.by_class[size_class]
        for name in names:
            if self.healthy(name):
                return Decision(name, reason)
        other = self.by_class["large" if size_class == "small" else "small"]
        for name in other:
            if self.healthy(name):
                return Decision(name, f"{reason}_fallback")
        return Decision(names[0], reason)


def prompt_tokens(request: router_pb2.RouteRequest, model: str, *, strict: bool = True) -> list[int]:
    """The prompt tokens for ``model``: its entry in prompt_token_ids_by_model, else
    prompt_token_ids. With ``strict`` an empty prompt is INVALID_ARGUMENT."""
    if model in request.prompt_token_ids_by_model:
        ids = list(request.prompt_token_ids_by_model[model].ids)
    elif request.prompt_token_ids:
        ids = list(request.prompt_token_ids)
    else:
        ids = max((list(t.ids) for t in request.prompt_token_ids_by_model.values()), key=len, default=[])
        if ids and strict:
            raise invalid_argument(f"no prompt tokens for model {model!r}: prompt_token_ids is empty and "
                                   f"prompt_token_ids_by_model has only {sorted(request.prompt_token_ids_by_model)}")
    if strict and not ids:
        raise invalid_argument("the prompt is empty: set prompt_token_ids (or prompt_token_ids_by_model)")
    return ids


def engine_request(request: router_pb2.RouteRequest, request_id: str, model: str,
                   sampling: common_pb2.SamplingParams | None = None) -> engine_pb2.EngineGenerateRequest:
    """The engine request of ``request`` for ``model``: what the router streams, what ``Route``
    hands the gateway, and what the gateway builds itself for a reused route (one builder, so the
    three cannot drift). ``sampling`` replaces the caller's (escalation's judged sampling)."""
    return engine_pb2.EngineGenerateRequest(
        request_id=request_id, prompt_token_ids=prompt_tokens(request, model),
        sampling=request.sampling if sampling is None else sampling,
        priority=request.priority, cache_salt=request.cache_salt)

"""The model policy: explicit names, the default, and the documented "auto" rules."""

from __future__ import annotations

import grpc
import pytest

from llmesh.errors import ServiceError
from llmesh.models_file import parse_models
from llmesh.router.policy import AutoPolicy, Decision, ModelPolicy, prompt_tokens, task_hint
from llmesh.v1 import common_pb2, router_pb2

MODELS = parse_models({"default_model": "small-a", "models": [
    {"name": "small-a", "path": "x", "size_class": "small"},
    {"name": "small-b", "path": "x", "size_class": "small"},
    {"name": "large-a", "path": "x", "size_class": "large"},
]})


def policy(healthy=None, windows=None, **auto) -> ModelPolicy:
    healthy = {"small-a": 1, "small-b": 1, "large-a": 1} if healthy is None else healthy
    windows = windows or {}
    return ModelPolicy(MODELS, AutoPolicy(**{"long_prompt_tokens": 100, **auto}),
                       healthy=lambda m: healthy.get(m, 0), window=lambda m: windows.get(m, 0))


def req(model="auto", n=10, text="", tier="", max_tokens=None, **kw) -> router_pb2.RouteRequest:
    sampling = common_pb2.SamplingParams()
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    return router_pb2.RouteRequest(model=model, prompt_token_ids=list(range(n)), prompt_text=text, tier=tier,
                                   sampling=sampling, **kw)


def test_explicit_and_default_models():
    p = policy()
    assert p.decide(req("large-a")) == Decision("large-a", "explicit")
    assert p.decide(req("")) == Decision("small-a", "default")


def test_unknown_model_is_not_found_and_lists_the_models():
    with pytest.raises(ServiceError) as e:
        policy().decide(req("gpt-9"))
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    for name in ("gpt-9", "small-a", "small-b", "large-a", "auto"):
        assert name in e.value.message


@pytest.mark.parametrize(("request_kw", "expected"), [
    (dict(n=10), Decision("small-a", "auto_default")),
    (dict(n=101), Decision("large-a", "auto_long_prompt")),
    (dict(text="Write a python function that sorts a list"), Decision("large-a", "auto_hint_code")),
    (dict(text="```\nprint(1)\n```\nwhat does it print?"), Decision("large-a", "auto_hint_code")),
    (dict(text="def f(x):\n    return x"), Decision("large-a", "auto_hint_code")),
    (dict(text="Prove that there are infinitely many primes"), Decision("large-a", "auto_hint_reasoning")),
    (dict(text="Explain it step by step"), Decision("large-a", "auto_hint_reasoning")),
    (dict(text="Compute ∫ x dx from 0 to 1"), Decision("large-a", "auto_hint_math")),
    (dict(text="what is 2^10?"), Decision("large-a", "auto_hint_math")),
    (dict(text="Say hello to my friend"), Decision("small-a", "auto_default")),
    (dict(tier="batch"), Decision("small-a", "auto_batch_tier")),
    (dict(tier="batch", n=500), Decision("large-a", "auto_long_prompt")),
])
def test_auto_rules(request_kw, expected):
    assert policy().decide(req(**request_kw)) == expected


def test_auto_window_rule_uses_the_small_models_window():
    p = policy(windows={"small-a": 64})
    assert p.decide(req(n=40, max_tokens=20)) == Decision("small-a", "auto_default")
    assert p.decide(req(n=40, max_tokens=30)) == Decision("large-a", "auto_window")
    assert p.decide(req(n=50)) == Decision("large-a", "auto_window")  # default max_tokens 16


def test_auto_knobs_turn_rules_off():
    p = policy(task_hints=False, batch_tier_small=False)
    assert p.decide(req(text="prove it")) == Decision("small-a", "auto_default")
    assert p.decide(req(tier="batch")) == Decision("small-a", "auto_default")


def test_auto_prefers_healthy_models_and_falls_back_to_the_other_class():
    assert policy(healthy={"small-b": 1, "large-a": 1}).decide(req()) == Decision("small-b", "auto_default")
    assert policy(healthy={"large-a": 1}).decide(req()) == Decision("large-a", "auto_default_fallback")
    assert policy(healthy={"small-a": 1}).decide(req(n=200)) == Decision("small-a", "auto_long_prompt_fallback")
    assert policy(healthy={}).decide(req()) == Decision("small-a", "auto_default")


def test_auto_counts_the_small_models_tokens():
    r = router_pb2.RouteRequest(model="auto")
    r.prompt_token_ids_by_model["small-a"].ids.extend(range(50))
    r.prompt_token_ids_by_model["large-a"].ids.extend(range(150))
    assert policy().decide(r) == Decision("small-a", "auto_default")
    assert prompt_tokens(r, "large-a") == list(range(150))


def test_single_class_mesh():
    models = parse_models({"models": [{"name": "only", "path": "x", "size_class": "large"}]})
    p = ModelPolicy(models, AutoPolicy(), healthy=lambda m: 1, window=lambda m: 0)
    assert p.decide(req(n=5000)) == Decision("only", "auto_single_class")


def test_prompt_tokens_errors_are_actionable():
    with pytest.raises(ServiceError) as e:
        prompt_tokens(router_pb2.RouteRequest(model="small-a"), "small-a")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.value.message
    r = router_pb2.RouteRequest(model="auto")
    r.prompt_token_ids_by_model["small-a"].ids.extend([1, 2])
    with pytest.raises(ServiceError) as e:
        prompt_tokens(r, "large-a")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "large-a" in e.value.message


def test_task_hint_is_quiet_on_plain_text():
    for text in ("Tell me a story about a cat.", "Translate 'good morning' to French.", "Summarise this email"):
        assert task_hint(text) is None

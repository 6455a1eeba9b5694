"""Router flags: the replica-choice policy and the escalation knobs."""

from __future__ import annotations

import pytest

from llmesh.config import load_config
from llmesh.router.config import RouterConfig


def test_defaults():
    c = load_config(RouterConfig, [], service="router")
    assert (c.policy, c.escalation_tokens, c.escalation_threshold) == ("cache_aware", 8, -2.5)


def test_flags():
    c = load_config(RouterConfig, ["--policy", "round_robin", "--escalation-tokens", "0",
                                   "--escalation-threshold=-4"], service="router")
    assert (c.policy, c.escalation_tokens, c.escalation_threshold) == ("round_robin", 0, -4.0)


@pytest.mark.parametrize("argv, message", [
    (["--policy", "random"], "policy must be one of cache_aware, round_robin"),
    (["--escalation-tokens", "-1"], "escalation_tokens must be >= 0"),
    (["--escalation-threshold", "nan"], "escalation_threshold must be a number"),
])
def test_bad_values_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_config(RouterConfig, argv, service="router")
    assert message in capsys.readouterr().err

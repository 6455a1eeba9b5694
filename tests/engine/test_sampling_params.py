"""SamplingParams validation: every bad value is an InvalidRequestError naming its field."""

from __future__ import annotations

import math

import pytest

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.sampling_params import SamplingParams

INVALID = [  # (field, value)
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "0.5"),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.2),
    ("top_p", math.nan),
    ("top_p", True),
    ("min_p", 2.0),
    ("min_p", -0.1),
    ("min_p", math.nan),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 3.0),
    ("max_tokens", True),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", True),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", -math.inf),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", math.nan),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", True),
    ("logprobs", 21),
    ("logprobs", -1),
    ("logprobs", 2.0),
    ("logprobs", True),
    ("min_tokens", -1),
    ("min_tokens", 1.0),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_names_its_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize("stop", [[""], ["ok", ""], [3], ""])
def test_invalid_stop_strings(stop):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop=stop)
    assert info.value.field == "stop"
    assert "stop" in str(info.value)


@pytest.mark.parametrize("ids", [[-1], [5, -3], [True], [1.0], ["7"]])
def test_invalid_stop_token_ids(ids):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop_token_ids=ids)
    assert info.value.field == "stop_token_ids"
    assert "stop_token_ids" in str(info.value)


def test_invalid_request_error_is_a_value_error():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)


def test_defaults_are_valid():
    sp = SamplingParams()
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.top_p, sp.min_p) == (16, 1.0, 0, 1.0, 0.0)
    assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty) == (1.0, 0.0, 0.0)
    assert sp.seed is None and sp.logprobs is None and sp.stop == [] and sp.stop_token_ids == []
    assert not sp.greedy


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0),
    dict(temperature=0),
    dict(top_k=-1),
    dict(top_k=1),
    dict(top_p=1.0),
    dict(top_p=1e-6),
    dict(min_p=0.0),
    dict(min_p=1.0),
    dict(max_tokens=1),
    dict(repetition_penalty=1e-3),
    dict(presence_penalty=-2.0, frequency_penalty=2.0),
    dict(seed=0),
    dict(seed=-7),
    dict(logprobs=0),
    dict(logprobs=20),
    dict(stop_token_ids=[0, 2]),
])
def test_boundary_values_are_valid(kwargs):
    SamplingParams(**kwargs)


def test_greedy_flag_and_stop_normalisation():
    assert SamplingParams(temperature=0.0).greedy
    sp = SamplingParams(stop="###", stop_token_ids=(1, 2))
    assert sp.stop == ["###"] and sp.stop_token_ids == [1, 2]


@pytest.mark.parametrize("kwargs,field", [
    ({"min_tokens": True}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"skip_special_tokens": 1}, "skip_special_tokens"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": "3"}, "stop_token_ids"),
])
def test_more_invalid_fields_are_named(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)


def test_none_stop_lists_mean_empty():
    sp = SamplingParams(stop=None, stop_token_ids=None)
    assert sp.stop == [] and sp.stop_token_ids == []

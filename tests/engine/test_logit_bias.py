"""logit_bias: added to the biased row's logits only, before sampling, validated by field."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.request import Request
from llmesh.engine.sampler import Sampler
from llmesh.engine.sampling_params import MAX_LOGIT_BIAS, SamplingParams


def req(rid: str, **params) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(**params))


def logits(rows: int, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3)) * 3


def test_positive_bias_forces_the_token_in_a_greedy_row_and_leaves_neighbours_alone():
    x = logits(3)
    plain = x.argmax(dim=-1).tolist()
    target = (plain[1] + 7) % 50
    rows = [req("a", temperature=0.0), req("b", temperature=0.0, logit_bias={target: 100.0}),
            req("c", temperature=0.0)]
    out = Sampler()(x, rows)
    assert out.token_ids == [plain[0], target, plain[2]]


def test_negative_bias_bans_the_argmax_so_the_runner_up_wins():
    x = logits(2)
    best = x[0].argmax().item()
    runner_up = x[0].topk(2).indices[1].item()
    out = Sampler()(x, [req("a", temperature=0.0, logit_bias={best: -100.0}), req("b", temperature=0.0)])
    assert out.token_ids == [runner_up, x[1].argmax().item()]


def test_bias_applies_to_random_rows_with_a_seed_in_a_mixed_batch():
    x = logits(2)
    banned = set(x[0].topk(45).indices.tolist())  # only five tokens left unbiased
    bias = {t: -100.0 for t in banned}
    for seed in range(20):
        out = Sampler()(x, [req("r", temperature=1.0, seed=seed, logit_bias=bias), req("g", temperature=0.0)])
        assert out.token_ids[0] not in banned
        assert out.token_ids[1] == x[1].argmax().item()


def test_logprobs_stay_those_of_the_raw_distribution():
    x = logits(1)
    target = (x[0].argmax().item() + 1) % 50
    out = Sampler()(x, [req("a", temperature=0.0, logprobs=0, logit_bias={target: 100.0})])
    assert out.token_ids == [target]
    assert out.logprobs[0].logprob == pytest.approx(x[0].log_softmax(-1)[target].item(), abs=1e-5)


@pytest.mark.parametrize("bias", [{3: 100.5}, {3: -101}, {3: float("nan")}, {-1: 1.0},
                                  {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}])
def test_bad_bias_is_refused_naming_the_field(bias):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.field == "logit_bias"

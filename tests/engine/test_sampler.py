"""Sampler tests: each rule against a plain per-row reference, seeds, distribution, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from llmesh.engine.request import Request
from llmesh.engine.sampler import Sampler
from llmesh.engine.sampling_ops import apply_penalties, count_tokens, filter_keep_mask
from llmesh.engine.sampling_params import SamplingParams


def req(rid: str = "r", prompt=(1, 2, 3), output=(), **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params))
    r.output_token_ids = list(output)
    return r


def rand_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- plain per-row references -------------------------------------------------------------
def ref_keep(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Tokens surviving top-k → top-p → min-p for one row of scaled logits, in float64."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    if top_k > 0:
        order = order[:top_k]
    z = sum(math.exp(row[i] - row[order[0]]) for i in order)
    probs = {i: math.exp(row[i] - row[order[0]]) / z for i in order}
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if top_p < 1.0 and mass >= top_p:
            break
    best = max(probs[i] for i in kept)
    return {i for i in kept if probs[i] >= min_p * best}


def ref_penalise(row: list[float], prompt, output, rep: float, pres: float, freq: float) -> list[float]:
    out = list(row)
    for tok in set(prompt) | set(output):
        out[tok] = out[tok] / rep if out[tok] > 0 else out[tok] * rep
    for tok, count in Counter(output).items():
        out[tok] -= freq * count + pres
    return out


# ---- greedy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = rand_logits(8, 50).to(dtype)
    out = Sampler()(logits, [req(f"r{i}", temperature=0.0) for i in range(8)])
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_16_bit_logits_sample_as_their_float32_copy():
    """The model hands its logits over in its own dtype (compute_logits no longer widens them):
    every rule (penalties, bias, filters, seeded sampling, logprobs) must see what it saw in the
    float32 copy of the same values, and ties among 16-bit values stay ties."""
    logits = (rand_logits(5, 64, seed=3) * 4).round().bfloat16()  # coarse: many ties

    def batch():
        return [req("g", temperature=0.0), req("p", output=(4, 4, 9), temperature=0.0, repetition_penalty=1.3,
                                                  frequency_penalty=0.2, logprobs=3),
                req("s", temperature=0.8, top_k=5, seed=7, logprobs=2), req("b", temperature=0.0, logit_bias={1: 5.0}),
                req("m", temperature=1.1, top_p=0.7, min_p=0.05, seed=11)]

    half, full = Sampler()(logits, batch()), Sampler()(logits.float(), batch())
    assert half.token_ids == full.token_ids
    assert half.logprobs == full.logprobs


def test_greedy_ties_pick_lowest_id():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    out = Sampler()(logits, [req("a", temperature=0.0, logprobs=2), req("b", temperature=0.0)])
    assert out.token_ids == [1, 0]
    assert out.logprobs[0].rank == 1  # a tie with the best is still rank 1


def test_tiny_temperature_behaves_like_greedy_without_nan():
    logits = rand_logits(4, 40, scale=50.0)
    out = Sampler()(logits, [req(f"r{i}", temperature=1e-30) for i in range(4)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_empty_batch_and_shape_mismatch():
    assert Sampler()(torch.zeros(0, 10), []).token_ids == []
    with pytest.raises(ValueError, match="N = 1"):
        Sampler()(torch.zeros(2, 10), [req()])


# ---- filters ---------------------------------------------------------------------------------
FILTER_ROWS = [  # (top_k, top_p, min_p); the top-p rows send the batch through the sort
    (0, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (37, 1.0, 0.0), (-1, 1.0, 0.0),
    (0, 0.3, 0.0), (0, 0.9, 0.0), (0, 0.999, 0.0), (0, 1.0, 0.05), (0, 1.0, 0.5),
    (0, 1.0, 1.0), (10, 0.8, 0.0), (10, 0.95, 0.1), (0, 0.7, 0.2), (3, 0.5, 0.3),
]
TOP_K_ONLY_ROWS = [  # no top-p: the sort-free path
    (0, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (37, 1.0, 0.0), (-1, 1.0, 0.0), (64, 1.0, 0.0),
    (100, 1.0, 0.0), (0, 1.0, 0.05), (0, 1.0, 1.0), (10, 1.0, 0.1), (3, 1.0, 0.3),
]


def _filter(rows, scaled: torch.Tensor) -> torch.Tensor:
    keep = filter_keep_mask(scaled, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return torch.ones_like(scaled, dtype=torch.bool) if keep is None else keep


@pytest.mark.parametrize("rows", [FILTER_ROWS, TOP_K_ONLY_ROWS], ids=["sorted", "top_k_only"])
def test_filters_match_per_row_reference(rows):
    scaled = rand_logits(len(rows), 64, seed=1)
    keep = _filter(rows, scaled)
    for i, (k, p, m) in enumerate(rows):
        got = set(keep[i].nonzero().flatten().tolist())
        assert got == ref_keep(scaled[i].tolist(), k, p, m), (k, p, m)


@pytest.mark.parametrize("rows", [FILTER_ROWS, TOP_K_ONLY_ROWS], ids=["sorted", "top_k_only"])
def test_top_k_keeps_exactly_k_most_likely(rows):
    scaled = rand_logits(len(rows), 64, seed=1)
    keep = _filter(rows, scaled)
    for i, (k, p, m) in enumerate(rows):
        if p == 1.0 and m == 0.0:
            expect = k if 0 < k < 64 else 64
            assert int(keep[i].sum()) == expect
            assert set(scaled[i].topk(expect).indices.tolist()) == set(keep[i].nonzero().flatten().tolist())


def test_top_k_ties_go_to_lower_ids_on_both_paths():
    scaled = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0]])
    for top_p in (1.0, 0.9999):  # sort-free path, then the sorted one
        keep = filter_keep_mask(scaled, [3], [top_p], [0.0])
        assert keep[0].nonzero().flatten().tolist() == [1, 2, 3]


def test_top_p_keeps_smallest_set_reaching_p():
    scaled = rand_logits(len(FILTER_ROWS), 64, seed=1)
    keep = _filter(FILTER_ROWS, scaled)
    probs = scaled.double().softmax(dim=-1)
    for i, (k, p, m) in enumerate(FILTER_ROWS):
        if k <= 0 and m == 0.0 and p < 1.0:
            kept = probs[i][keep[i]]
            assert kept.sum() >= p
            assert kept.sum() - kept.min() < p  # dropping the least likely kept falls short


def test_min_p_threshold():
    scaled = rand_logits(len(FILTER_ROWS), 64, seed=1)
    keep = _filter(FILTER_ROWS, scaled)
    probs = scaled.softmax(dim=-1)
    for i, (k, p, m) in enumerate(FILTER_ROWS):
        if k <= 0 and p == 1.0:
            assert torch.equal(keep[i], probs[i] >= m * probs[i].max())


def test_no_filter_returns_none():
    assert filter_keep_mask(rand_logits(2, 10), [0, -1], [1.0, 1.0], [0.0, 0.0]) is None


def test_sampled_tokens_stay_inside_filtered_set():
    vocab = 64
    requests = [req(f"r{i}", temperature=0.9, top_k=k, top_p=p, min_p=m)
                for i, (k, p, m) in enumerate(FILTER_ROWS)]
    logits = rand_logits(len(requests), vocab, seed=2)
    allowed = [ref_keep((logits[i] / 0.9).tolist(), k, p, m) for i, (k, p, m) in enumerate(FILTER_ROWS)]
    sampler = Sampler(seed=3)
    for _ in range(100):
        for i, tok in enumerate(sampler(logits, requests).token_ids):
            assert tok in allowed[i]


# ---- penalties ---------------------------------------------------------------------------------
PENALTY_ROWS = [  # (prompt, output, repetition, presence, frequency)
    ([1, 2, 3, 3], [4, 4, 4, 5], 1.3, 0.0, 0.0),
    ([7, 8], [8, 9, 9], 1.0, 0.5, 0.0),
    ([7, 8], [8, 9, 9, 9], 1.0, 0.0, 0.7),
    ([0, 1, 2], [2, 3, 3, 10, 11], 0.8, -1.0, 1.5),
    ([5] * 30, [], 2.0, 2.0, 2.0),
    ([1, 2, 3], [1, 2], 1.0, 0.0, 0.0),
]


def test_penalties_match_per_token_reference():
    logits = rand_logits(len(PENALTY_ROWS), 16, seed=4)
    got = apply_penalties(
        logits,
        [torch.tensor(r[0]) for r in PENALTY_ROWS], count_tokens([r[1] for r in PENALTY_ROWS], 16, logits.device),
        torch.tensor([r[2] for r in PENALTY_ROWS]),
        torch.tensor([r[3] for r in PENALTY_ROWS]),
        torch.tensor([r[4] for r in PENALTY_ROWS]),
    )
    for i, (prompt, output, rep, pres, freq) in enumerate(PENALTY_ROWS):
        expect = ref_penalise(logits[i].tolist(), prompt, output, rep, pres, freq)
        torch.testing.assert_close(got[i], torch.tensor(expect))


def test_greedy_after_penalties_in_mixed_batch_and_input_untouched():
    vocab = 16
    logits = rand_logits(len(PENALTY_ROWS) + 1, vocab, seed=5, scale=1.0)
    logits[:, 4] = 10.0  # every row's favourite, until penalised
    before = logits.clone()
    requests = [req(f"p{i}", prompt=pr, output=out, temperature=0.0, repetition_penalty=rep,
                    presence_penalty=pres, frequency_penalty=freq)
                for i, (pr, out, rep, pres, freq) in enumerate(PENALTY_ROWS)]
    requests.append(req("plain", prompt=[4], output=[4, 4], temperature=0.0))
    sampler = Sampler()
    got = sampler(logits, requests).token_ids
    assert sampler(logits, requests).token_ids == got  # again, from the cached prompts
    for i, (prompt, output, rep, pres, freq) in enumerate(PENALTY_ROWS):
        row = ref_penalise(logits[i].tolist(), prompt, output, rep, pres, freq)
        assert got[i] == max(range(vocab), key=lambda t: (row[t], -t))
    assert got[-1] == 4  # a row without penalties is not penalised by its neighbours'
    assert torch.equal(logits, before)


def test_penalties_ignore_token_ids_outside_vocabulary():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    r = req(prompt=[0, 99], output=[-1, 2], temperature=0.0, repetition_penalty=2.0)
    got = apply_penalties(logits, [torch.tensor(r.prompt_token_ids)], count_tokens([r.output_token_ids], 3, logits.device),
                          torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    torch.testing.assert_close(got, torch.tensor([[0.5, 2.0, 1.5]]))


# ---- seeds -------------------------------------------------------------------------------------
def _seeded_run(position: int, neighbours: list[Request], steps: int = 20) -> list[int]:
    """Tokens of one seeded request sampled over ``steps`` steps inside a given batch."""
    target = req("target", temperature=0.8, top_k=20, min_p=0.02, seed=1234)
    batch = neighbours[:position] + [target] + neighbours[position:]
    sampler = Sampler(seed=len(neighbours) * 31 + position)
    tokens = []
    for step in range(steps):
        logits = rand_logits(len(batch), 32, seed=100 + step * 7 + len(batch), scale=1.0)
        logits[position] = rand_logits(1, 32, seed=step, scale=1.0)[0]  # the target's own logits
        tokens.append(sampler(logits, batch).token_ids[position])
    return tokens


def test_seeded_request_ignores_batch_composition_and_position():
    alone = _seeded_run(0, [])
    others = [req("a", temperature=1.0, top_p=0.9), req("b", temperature=0.0),
              req("c", temperature=0.5, top_k=3, seed=99), req("d", temperature=1.3, min_p=0.1)]
    assert len(set(alone)) > 3  # it really samples
    for position in (0, 2, 4):
        assert _seeded_run(position, [req(r.request_id, **vars(r.sampling_params)) for r in others]) == alone


def test_seeded_generator_lives_in_sampler_state_and_seeds_differ():
    a, b = req("a", seed=5), req("b", seed=6)
    logits = torch.zeros(2, 1000)
    Sampler()(logits, [a, b])
    assert isinstance(a.sampler_state, torch.Generator)
    assert a.sampler_state.initial_seed() == 5
    runs = [[Sampler()(logits[:1], [r]).token_ids[0] for _ in range(10)] for r in (req(seed=5), req(seed=6))]
    assert runs[0] != runs[1]


def test_huge_and_negative_seeds_are_accepted():
    out = Sampler()(torch.zeros(2, 50), [req("a", seed=2**70), req("b", seed=-3)])
    assert all(0 <= t < 50 for t in out.token_ids)


def test_unseeded_rows_are_deterministic_given_engine_seed():
    def run(seed: int) -> list[int]:
        sampler = Sampler(seed=seed)
        batch = [req(f"r{i}", temperature=1.0, top_k=20) for i in range(4)]
        return [t for step in range(10)
                for t in sampler(rand_logits(4, 100, seed=step, scale=0.5), batch).token_ids]

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---- distribution --------------------------------------------------------------------------------
def _total_variation(tokens: list[int], expect: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=expect.numel()).double()
    return 0.5 * float((counts / counts.sum() - expect.double()).abs().sum())


def test_empirical_distribution_matches_softmax():
    row = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0])
    n = 20_000
    out = Sampler(seed=11)(row.expand(n, -1), [req(f"r{i}", temperature=0.7) for i in range(n)])
    assert _total_variation(out.token_ids, (row / 0.7).softmax(-1)) < 0.02


def test_empirical_distribution_seeded_rows_with_filters():
    row = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0])
    n = 20_000
    # top_k=4 keeps ids {3, 0, 1, 4}; min_p=0.2 of the best then drops id 4 at T=1.2.
    requests = [req(f"r{i}", temperature=1.2, top_k=4, min_p=0.2, seed=i) for i in range(n)]
    out = Sampler()(row.expand(n, -1), requests)
    scaled = row / 1.2
    allowed = ref_keep(scaled.tolist(), 4, 1.0, 0.2)
    assert allowed == {0, 1, 3}
    mask = torch.full_like(scaled, float("-inf"))
    mask[list(allowed)] = 0.0
    assert _total_variation(out.token_ids, (scaled + mask).softmax(-1)) < 0.02


# ---- logprobs --------------------------------------------------------------------------------------
def test_logprobs_values_ranks_and_top_n():
    logits = rand_logits(5, 40, seed=9)
    requests = [
        req("a", temperature=0.0, logprobs=3),
        req("b", temperature=1.0, logprobs=20, repetition_penalty=1.5),  # raw logits, not penalised
        req("c", temperature=1.0),
        req("d", temperature=0.5, logprobs=0, seed=3),
        req("e", temperature=2.0, logprobs=1, top_k=10),
    ]
    out = Sampler(seed=1)(logits, requests)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i, r in enumerate(requests):
        lp = out.logprobs[i]
        if lp is None:
            continue
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(ref[i, tok]), abs=1e-6)
        assert lp.rank == 1 + int((ref[i] > ref[i, tok]).sum())
        n = r.sampling_params.logprobs
        top = ref[i].topk(n) if n else None
        assert [t for t, _ in lp.top] == ([] if top is None else top.indices.tolist())
        assert [v for _, v in lp.top] == pytest.approx([] if top is None else top.values.tolist(), abs=1e-6)
    assert out.logprobs[0].rank == 1
    assert out.logprobs[0].top[0] == (out.token_ids[0], pytest.approx(out.logprobs[0].logprob))
    assert isinstance(out.token_ids[0], int) and isinstance(out.logprobs[1].rank, int)


def test_logprobs_top_n_capped_at_vocabulary():
    logits = torch.tensor([[0.5, 2.0, -1.0]])
    lp = Sampler()(logits, [req(temperature=0.0, logprobs=20)]).logprobs[0]
    assert [t for t, _ in lp.top] == [1, 0, 2]

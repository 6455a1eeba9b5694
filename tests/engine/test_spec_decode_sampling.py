"""Rejection sampling keeps the target distribution: the verify rule against exact
distributions on a small vocabulary, and the engine's sampled outputs with speculation on
and off (fixed seeds, so these tests cannot flake)."""

from __future__ import annotations

import collections
import random

import torch

from llmesh.engine import LLMEngine, SamplingParams, build_engine_config
from llmesh.engine.request import Request
from llmesh.engine.sampler import Sampler
from llmesh.engine.spec_decode.verify import accept_deterministic, rejection_sample

V = 6


def _tv(counts: collections.Counter, probs: torch.Tensor, n: int) -> float:
    return 0.5 * sum(abs(counts.get(i, 0) / n - float(probs[i])) for i in range(len(probs)))


def _logits(seed: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 1.5


def test_deterministic_drafts_keep_the_distribution_exactly():
    """accept d iff the target's sample equals d: each emitted token is distributed as the
    target's p (first position), and the second position is p1 given the first accepted."""
    logits = _logits(0, 3)  # 2 drafts → 3 verify positions
    p = logits.softmax(-1)
    sampler = Sampler(seed=1)
    n = 6000
    for drafts in [(int(p[0].argmax()), int(p[1].argmax())), (int(p[0].argmin()), 3)]:
        req = Request("r", [1, 2], SamplingParams(temperature=1.0, max_tokens=8))
        first, second, n_second = collections.Counter(), collections.Counter(), 0
        for _ in range(n):
            rows = sampler.sample(logits, [req], [drafts]).to_host().token_ids
            out = accept_deterministic(drafts, rows)
            first[out[0]] += 1
            if len(out) > 1:
                second[out[1]] += 1
                n_second += 1
        assert _tv(first, p[0], n) < 0.03
        assert abs(n_second / n - float(p[0, drafts[0]])) < 0.02  # accepted with probability p(d)
        if n_second > 1000:
            assert _tv(second, p[1], n_second) < 0.05


def test_rejection_sample_with_a_real_draft_distribution():
    """min(1, p/q) acceptance and the max(0, p − q) residual give exactly p."""
    g = torch.Generator().manual_seed(2)
    target = _logits(3, 2).softmax(-1)  # 1 draft
    q = _logits(4, 1).softmax(-1)
    n = 6000
    counts = collections.Counter()
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        u = torch.rand(1, generator=g)
        noise = torch.empty(2, V).exponential_(generator=g)
        counts[rejection_sample(target, q, [d], u, noise)[0]] += 1
    assert _tv(counts, target[0], n) < 0.03
    # q == p: every draft is accepted
    out = rejection_sample(target, target[:1], [1], torch.tensor([0.999]), torch.ones(2, V))
    assert out[0] == 1 and len(out) == 2


def test_penalties_at_a_verify_position_count_the_drafts_before_it():
    """Row j of a verify chunk is sampled as if drafts[:j] were output: a frequency penalty
    there must equal a plain step's after appending them."""
    logits = _logits(5, 3)
    sp = SamplingParams(temperature=0.0, max_tokens=8, frequency_penalty=2.0, presence_penalty=0.5)
    drafts = (int(logits[0].argmax()), int(logits[1].argmax()))
    sampler = Sampler(seed=0)
    req = Request("r", [1], sp, output_token_ids=[4])
    verify = sampler.sample(logits, [req], [drafts]).to_host().token_ids
    for j in range(3):
        plain = Request("p", [1], sp, output_token_ids=[4, *drafts[:j]])
        assert verify[j] == sampler.sample(logits[j:j + 1], [plain]).to_host().token_ids[0]


def test_engine_sampled_outputs_keep_their_distribution(tiny_model_dirs):
    """The first tokens of many seeded requests, with and without speculation: the two
    empirical distributions agree (total variation), while drafts were really checked."""
    path = tiny_model_dirs["qwen3"]
    rng = random.Random(1)
    base = [rng.randrange(3, 512) for _ in range(6)]
    prompt = base * 4
    # the bias keeps the output among the prompt's tokens, so the n-gram proposer always has
    # drafts, and the model's logits still decide between them
    bias = {t: 12.0 for t in base}
    n = 160

    def run(spec: dict | None):
        kw = dict(dtype="float32", device="cpu", max_num_seqs=n, max_num_batched_tokens=4096)
        if spec:
            kw["speculative_config"] = spec
        engine = LLMEngine(build_engine_config(path, **kw))
        for s in range(n):
            engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=s, ignore_eos=True,
                                                       logit_bias=bias),
                               request_id=f"r{s}")
        outs: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for d in engine.step():
                outs.setdefault(d.request_id, []).extend(d.token_ids)
        return [tuple(outs[f"r{s}"]) for s in range(n)], engine

    off, _ = run(None)
    on, engine = run({"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": n})
    stats = engine.core.spec_stats
    assert stats.proposed > n and 0 < stats.accepted < stats.proposed
    for pos in (1, 2):
        a = collections.Counter(t[pos] for t in off)
        b = collections.Counter(t[pos] for t in on)
        tv = 0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / n
        assert tv < 0.2, f"position {pos}: TV {tv:.3f} between speculation off and on"

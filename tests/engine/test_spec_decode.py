"""Speculative decoding (n-gram) in the engine: greedy output equals speculation off and
Hugging Face transformers token for token, across the engine's paths; acceptance is
accounted; no KV block leaks.

The fidelity suite's tiny models rarely repeat themselves, so the scenarios that rely on
accepted drafts use a narrower random model (hidden size 32) that does, and assert it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llmesh.engine import LLMEngine, SamplingParams, StructuredOutputSpec, build_engine_config
from llmesh.engine.spec_decode.ngram import ngram_lookup
from tests.engine.hf_reference import hf_greedy, load_hf
from tests.fixtures.tiny_models import build_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


@pytest.fixture(scope="session")
def repetitive_model(tmp_path_factory) -> str:
    """A random Llama whose greedy output revisits its own n-grams (n-gram drafts get accepted)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("repetitive")), "llama", hidden_size=32,
                            intermediate_size=64)


@pytest.fixture(scope="session")
def repetitive_model_d16(tmp_path_factory) -> str:
    """The repetitive model's shape with head_dim 16, the smallest the Triton kernels take."""
    return build_tiny_model(str(tmp_path_factory.mktemp("repetitive16")), "llama", hidden_size=32,
                            intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


def _prompts(n: int, seed: int, lo: int = 5, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _engine(path: str, spec: dict | None, **kw) -> LLMEngine:
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    if spec:
        kw["speculative_config"] = spec
    return LLMEngine(build_engine_config(path, **kw))


def _run(engine: LLMEngine, prompts, params, arrive_at=None):
    arrive_at = arrive_at or [0] * len(prompts)
    params = params if isinstance(params, list) else [params] * len(prompts)
    added, outs, step = set(), {}, 0
    while len(added) < len(prompts) or engine.has_unfinished_requests():
        for i, p in enumerate(prompts):
            if i not in added and arrive_at[i] <= step:
                engine.add_request(p, params[i], request_id=f"r{i}")
                added.add(i)
        for d in engine.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
        step += 1
        assert step < 10_000, "engine did not drain"
    return [outs.get(f"r{i}", []) for i in range(len(prompts))]


GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def _check_drained(engine: LLMEngine) -> None:
    assert engine.kv.num_free_blocks == engine.kv.num_total_blocks, "KV blocks leaked"


# ---- the proposer ---------------------------------------------------------------------
def test_ngram_lookup_takes_the_longest_most_recent_match():
    t = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], dtype=np.int64)
    # suffix [2, 3] occurs at 1 and 5: the most recent (5) is followed by 7, 8, 5
    assert ngram_lookup(t, 1, 4, 3).tolist() == [7, 8, 5]
    # a longer suffix that recurs wins over a more recent shorter one
    t = np.array([4, 2, 3, 6, 6, 9, 3, 0, 4, 2, 3], dtype=np.int64)
    assert ngram_lookup(t, 1, 4, 2).tolist() == [6, 6]
    assert ngram_lookup(t, 4, 4, 2).tolist() == []                 # no 4-gram recurs
    assert ngram_lookup(np.array([5, 5], dtype=np.int64), 1, 3, 4).tolist() == [5]  # cut at the end
    assert ngram_lookup(np.array([7], dtype=np.int64), 1, 3, 4).tolist() == []


# ---- greedy fidelity --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_hf_with_staggered_arrivals(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    base = _prompts(4, seed=2)
    prompts = base + [p + p for p in base[:2]]  # prompts that repeat themselves get drafts
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine = _engine(path, NGRAM)
    tokens = _run(engine, prompts, params, arrive_at=[0, 0, 1, 3, 4, 6])
    hf = load_hf(path)
    assert tokens == [hf_greedy(hf, p, 24)[0] for p in prompts]
    assert engine.core.spec_stats.verify_steps > 0
    _check_drained(engine)


SCENARIOS = {
    "staggered": (dict(), [0, 1, 2, 5, 8, 13]),
    "chunked_prefill_budget_7": (dict(max_num_batched_tokens=7), [0, 1, 4, 9, 9, 9]),
    "preemption": (dict(block_size=16, num_kv_blocks=14, enable_prefix_caching=False), None),
    "async_scheduling": (dict(async_scheduling=True), [0, 0, 2, 2, 3, 3]),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_equals_speculation_off(repetitive_model, scenario):
    kw, arrive_at = SCENARIOS[scenario]
    prompts = _prompts(6, seed=5, lo=20, hi=40)
    ref = _run(_engine(repetitive_model, None, **kw), prompts, GREEDY, arrive_at)
    engine = _engine(repetitive_model, NGRAM, **kw)
    assert _run(engine, prompts, GREEDY, arrive_at) == ref
    stats = engine.core.spec_stats
    assert stats.accepted > 0, "the scenario was meant to accept drafts"
    assert stats.emitted == stats.accepted + stats.verify_steps  # no stop cut any verify step
    if scenario == "preemption":
        assert engine.core.scheduler.num_preemptions_total > 0
    _check_drained(engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_triton_backend_verifies_like_the_torch_backend(repetitive_model_d16, async_scheduling):
    """Verify steps (several tokens per request, CUDA graphs or eager on a GPU; Triton's
    interpreter on the CPU) give the torch backend's tokens with speculation off."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = _prompts(3, seed=11, lo=12, hi=30)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = _run(_engine(repetitive_model_d16, None), prompts, params, arrive_at=[0, 1, 3])
    engine = _engine(repetitive_model_d16, NGRAM, backend="triton", device=device, block_size=16, num_kv_blocks=32,
                     max_model_len=128, async_scheduling=async_scheduling)
    assert _run(engine, prompts, params, arrive_at=[0, 1, 3]) == ref
    assert engine.core.spec_stats.accepted > 0, "the scenario was meant to accept drafts"
    _check_drained(engine)


def test_greedy_equals_hf_on_the_repetitive_model(repetitive_model):
    prompts = _prompts(3, seed=6)
    engine = _engine(repetitive_model, NGRAM)
    tokens = _run(engine, prompts, GREEDY)
    hf = load_hf(repetitive_model)
    assert tokens == [hf_greedy(hf, p, GREEDY.max_tokens)[0] for p in prompts]
    assert engine.core.spec_stats.accepted > 0


def test_prefix_cache_hit_after_speculation(repetitive_model):
    """Blocks registered while speculating hold only accepted tokens' KV: a later request
    that hits them decodes exactly as without the cache."""
    rng = random.Random(4)
    first = [rng.randrange(3, 512) for _ in range(21)]
    engine = _engine(repetitive_model, NGRAM, block_size=4)
    (out,) = _run(engine, [first], GREEDY)
    second = first + out[:40]  # covers blocks written by verify chunks
    tokens = _run(engine, [second], GREEDY)
    assert engine.core.scheduler.prefix_cache_hits_total >= 56
    ref = _run(_engine(repetitive_model, None, enable_prefix_caching=False), [second], GREEDY)
    assert tokens == ref
    assert engine.core.spec_stats.accepted > 0


def test_parallel_sampling_and_per_request_opt_out(repetitive_model):
    """n = 2 choices share the prompt's blocks (forked in the core) and both speculate; a
    request that opts out decodes plainly beside them."""
    from llmesh.engine.core.messages import EngineCoreRequest

    prompts = _prompts(2, seed=7, lo=20, hi=30)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine = _engine(repetitive_model, NGRAM)
    core = engine.core
    for rid, fork in (("a0", None), ("a1", "a0")):
        core.add_request(EngineCoreRequest(rid, prompts[0], params, frozenset(), fork_of=fork))
    opt_out = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, speculative=False)
    core.add_request(EngineCoreRequest("b", prompts[1], opt_out, frozenset()))
    outs: dict[str, list[int]] = {}
    while core.has_unfinished_requests():
        for o in core.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    hf = load_hf(repetitive_model)
    want = [hf_greedy(hf, p, 40)[0] for p in prompts]
    assert outs == {"a0": want[0], "a1": want[0], "b": want[1]}
    assert core.spec_stats.accepted > 0
    _check_drained(engine)


def test_speculation_off_for_a_request_proposes_nothing(repetitive_model):
    engine = _engine(repetitive_model, NGRAM)
    _run(engine, _prompts(2, seed=8), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                      speculative=False))
    assert engine.core.spec_stats.verify_steps == 0


def test_large_batches_do_not_speculate(repetitive_model):
    engine = _engine(repetitive_model, {**NGRAM, "disable_by_batch_size": 2})
    _run(engine, _prompts(4, seed=9), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert engine.core.spec_stats.verify_steps == 0


# ---- stops inside accepted tokens ---------------------------------------------------------
def test_stops_in_the_middle_of_accepted_tokens(repetitive_model):
    """max_tokens, a stop token id and EOS that fall inside a verify chunk cut it there."""
    prompts = _prompts(4, seed=10, lo=20, hi=40)
    full = _run(_engine(repetitive_model, None), prompts, GREEDY)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (7, 13, 21, 30)]
    engine = _engine(repetitive_model, NGRAM)
    got = _run(engine, prompts, params)
    assert got == [f[:p.max_tokens] for f, p in zip(full, params)]
    stop_at = [f[len(f) // 2] for f in full]
    params = [SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, stop_token_ids=[t]) for t in stop_at]
    got = _run(engine, prompts, params)
    assert got == [f[: f.index(t) + 1] for f, t in zip(full, stop_at)]
    stats = engine.core.spec_stats
    assert stats.emitted <= stats.accepted + stats.verify_steps
    _check_drained(engine)


def test_stop_string_in_the_middle_of_accepted_tokens(repetitive_model):
    """Text mode: the tokens after the one completing a stop string are never emitted."""
    prompt = "the cat sat on the mat and the cat sat on the mat"
    from llmesh.engine import LLM

    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    llm_off = LLM(repetitive_model, dtype="float32", device="cpu")
    (off,) = llm_off.generate([prompt], params)
    stop = off.text[len(off.text) // 2: len(off.text) // 2 + 3]
    assert stop.strip(), "the text was meant to have a stop string in its middle"
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    (want,) = llm_off.generate([prompt], sp)
    llm_on = LLM(repetitive_model, dtype="float32", device="cpu", speculative_config=NGRAM)
    (got,) = llm_on.generate([prompt], sp)
    assert (got.text, got.token_ids, str(got.finish_reason)) == (want.text, want.token_ids, str(want.finish_reason))
    assert str(got.finish_reason) == "stop"
    assert llm_on.engine.core.spec_stats.verify_steps > 0


# ---- structured output ----------------------------------------------------------------------
def test_structured_output_with_speculation(repetitive_model):
    """Drafts are cut at the first token the grammar refuses and each verify position is
    masked with the grammar state after the drafts before it."""
    from llmesh.engine import LLM

    specs = [StructuredOutputSpec("regex", "(ab|cd|the )+x"),
             StructuredOutputSpec("choice", choices=("the cat sat", "the mat", "on the mat"))]
    prompts = ["the cat sat on the mat " * 3, "abab cdcd abab cdcd"]
    params = [SamplingParams(max_tokens=40, temperature=0.0, structured_output=s) for s in specs]
    params += [SamplingParams(max_tokens=30, temperature=0.9, seed=3, structured_output=specs[0])]
    prompts += [prompts[0]]
    off = LLM(repetitive_model, dtype="float32", device="cpu").generate(prompts, params)
    llm = LLM(repetitive_model, dtype="float32", device="cpu", speculative_config=NGRAM)
    on = llm.generate(prompts, params)
    assert [o.token_ids for o in on[:2]] == [o.token_ids for o in off[:2]]
    import re

    complete = str(on[2].finish_reason) == "stop"
    assert re.fullmatch("(ab|cd|the )+x" if complete else "(ab|cd|the )*(a|c|t|th|the)?", on[2].text), on[2].text
    assert llm.engine.core.spec_stats.verify_steps > 0


def test_a_draft_that_ends_the_grammar_is_left_to_the_target(repetitive_model):
    """The prompt repeats the one allowed answer followed by EOS, so the n-gram drafts end
    with the stop token: verifying a row after it would ask a finished matcher for a mask
    (xgrammar refuses, which used to fail the whole core)."""
    engine = _engine(repetitive_model, NGRAM)
    answer = engine.input_processor.tokenizer.encode("the mat")
    eos = min(engine.input_processor.eos_token_ids)
    params = SamplingParams(max_tokens=20, temperature=0.0, logit_bias={t: 30.0 for t in answer},
                            structured_output=StructuredOutputSpec("choice", choices=("the mat",)))
    out = _run(engine, [(answer + [eos]) * 4], params)[0]
    assert out == answer + [eos]
    assert engine.core.spec_stats.verify_steps > 0
    _check_drained(engine)


def test_seeded_sampling_is_the_same_with_speculation_on_or_off_alone_or_batched(repetitive_model):
    """Rejected verify positions give their draws back, so a seeded request's tokens do not
    depend on how far it speculated (which depends on its neighbours)."""
    base = [11, 57, 203, 99, 141, 8]
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True,
                            logit_bias={t: 12.0 for t in base})
    other = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    results = []
    for spec in (None, dict(NGRAM, disable_by_batch_size=1)):
        for neighbour in (False, True):
            engine = _engine(repetitive_model, spec)
            prompts, params = [base * 4], [seeded]
            if neighbour:
                prompts, params = prompts + [[5, 6, 7, 8, 9]], params + [other]
            results.append(_run(engine, prompts, params)[0])
            if spec:
                assert engine.core.spec_stats.verify_steps > 0
    assert all(r == results[0] for r in results), results


# ---- aborts ---------------------------------------------------------------------------------------
def test_abort_mid_speculation_leaks_no_blocks(repetitive_model):
    engine = _engine(repetitive_model, NGRAM, block_size=4)
    prompts = _prompts(4, seed=11, lo=20, hi=40)
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, request_id=f"r{i}")
    aborted = set()
    for _ in range(200):
        engine.step()
        drafting = [r for r in engine.core.scheduler.running if r.spec_token_ids]
        if drafting and len(aborted) < 3:
            engine.abort_request(drafting[0].request_id)
            aborted.add(drafting[0].request_id)
        if not engine.has_unfinished_requests():
            break
    assert len(aborted) == 3
    assert engine.core.spec_stats.verify_steps > 0
    _check_drained(engine)

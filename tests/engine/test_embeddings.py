"""Embeddings of the engine equal Hugging Face transformers' final hidden states, pooled the
same way (``output_hidden_states=True``: the last entry is after the final norm).

Tiny random-weight Llama and Qwen3 models; each scenario takes a different engine path:
a plain batch, a prefix-cache hit, chunked prefill under a tiny budget, embedding and
greedy generation requests in the same steps, preemption, and the triton backend.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch

from llmesh.engine import LLM, InvalidRequestError, LLMEngine, SamplingParams, build_engine_config
from tests.engine.hf_reference import hf_greedy, load_hf

TOL = 1e-4


def _prompts(n: int, seed: int, lo: int = 5, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


@functools.lru_cache(maxsize=64)
def _hf_hidden(path: str, prompt: tuple[int, ...]) -> torch.Tensor:
    """[T, H] HF's last hidden states (after the final norm) of one prompt."""
    with torch.no_grad():
        out = load_hf(path)(torch.tensor([list(prompt)]), output_hidden_states=True)
    return out.hidden_states[-1][0].float()


def _reference(path: str, prompt: list[int], mode: str, normalize: bool, dimensions: int | None = None):
    h = _hf_hidden(path, tuple(prompt))
    v = h[-1] if mode == "last" else h.mean(dim=0)
    if dimensions:
        v = v[:dimensions]
    return torch.nn.functional.normalize(v, dim=-1) if normalize else v


def _assert_close(got, ref, what: str) -> None:
    err = float((torch.as_tensor(np.asarray(got, np.float32)) - ref).abs().max())
    assert err < TOL, f"{what}: max |engine - HF| = {err}"


def _engine(path: str, **kw) -> LLMEngine:
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    return LLMEngine(build_engine_config(path, **kw))


def _drain(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], dict]]]) -> dict[str, object]:
    """Add requests at their step (kwargs of add_request); returns id → final output (vector
    for embeddings, token ids for generations)."""
    out: dict[str, object] = {}
    step = 0
    while any(s >= step for s in arrivals) or engine.has_unfinished_requests():
        for rid, prompt, kw in arrivals.get(step, []):
            engine.add_request(prompt, request_id=rid, **kw)
        for d in engine.step():
            if d.embedding is not None:
                out[d.request_id] = d.embedding
            else:
                out.setdefault(d.request_id, []).extend(d.token_ids)
        step += 1
        assert step < 10_000, "engine did not drain"
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode,normalize", [("last", True), ("mean", True), ("last", False), ("mean", False)])
def test_embed_matches_hf(tiny_model_dirs, arch, mode, normalize):
    path = tiny_model_dirs[arch]
    prompts = _prompts(6, seed=1)
    llm = LLM(path, dtype="float32", device="cpu", pooling=mode, normalize=normalize)
    outs = llm.embed(prompts)
    assert [o.prompt_token_ids for o in outs] == prompts
    for p, o in zip(prompts, outs):
        assert len(o.embedding) == 128
        _assert_close(o.embedding, _reference(path, p, mode, normalize), f"{arch} {mode}")
        if normalize:
            assert abs(float(np.linalg.norm(o.embedding)) - 1.0) < 1e-5
    assert llm.engine.kv.num_used_blocks == 0, "embedding requests must give their KV blocks back"


def test_embed_text_prompts_use_the_tokenizer(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", device="cpu", pooling="last", normalize=True)
    text = "hello embeddings"
    [out] = llm.embed(text)
    assert out.prompt_token_ids == llm.get_tokenizer().encode(text)
    _assert_close(out.embedding, _reference(tiny_llama, out.prompt_token_ids, "last", True), "text prompt")


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_prefix_cache_hit(tiny_model_dirs, mode):
    """A prompt whose blocks are all cached (by an earlier embedding and by a generation)
    still gets its exact vector: last pooling recomputes the last token, mean pooling
    does not read the cache."""
    path = tiny_model_dirs["qwen3"]
    prompt = _prompts(1, seed=4, lo=33, hi=34)[0]  # 33 tokens: 8 full blocks of 4 and one token
    engine = _engine(path, block_size=4, pooling=mode, normalize=True)
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    pooling = engine.pooling_params()
    out = _drain(engine, {0: [("gen", prompt[:32], dict(params=greedy))],
                          5: [("e1", prompt, dict(pooling=pooling))],
                          9: [("e2", prompt, dict(pooling=pooling))]})
    reqs_cached = engine.scheduler.prefix_cache_hits_total
    ref = _reference(path, prompt, mode, True)
    _assert_close(out["e1"], ref, "after a generation cached its prefix")
    _assert_close(out["e2"], ref, "after an embedding cached the whole prompt")
    if mode == "last":
        assert reqs_cached >= 32 + 32, "the embeddings were meant to hit the prefix cache"
    else:
        assert reqs_cached == 0, "mean pooling must not read the prefix cache"
    assert engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_chunked_prefill_tiny_budget(tiny_model_dirs, mode):
    path = tiny_model_dirs["llama"]
    prompts = _prompts(4, seed=3, lo=20, hi=60)
    llm = LLM(path, dtype="float32", device="cpu", pooling=mode, normalize=False, max_num_batched_tokens=5)
    for p, o in zip(prompts, llm.embed(prompts)):
        _assert_close(o.embedding, _reference(path, p, mode, False), f"chunked {mode}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_batch_with_generation(tiny_model_dirs, arch):
    """Embedding and greedy generation requests share steps (a 16-token budget mixes prefill
    chunks of both with decodes): the vectors equal HF's, the tokens equal HF greedy."""
    path = tiny_model_dirs[arch]
    prompts = _prompts(8, seed=5, lo=5, hi=40)
    engine = _engine(path, pooling="mean", normalize=True, max_num_batched_tokens=16, block_size=8)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    pooling = engine.pooling_params()
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):
        kw = dict(pooling=pooling) if i % 2 else dict(params=greedy)
        arrivals.setdefault(i // 2, []).append((f"r{i}", p, kw))
    out = _drain(engine, arrivals)
    hf = load_hf(path)
    for i, p in enumerate(prompts):
        if i % 2:
            _assert_close(out[f"r{i}"], _reference(path, p, "mean", True), f"embedding r{i}")
        else:
            assert out[f"r{i}"] == hf_greedy(hf, p, 12)[0], f"generation r{i} differs from HF greedy"
    assert engine.kv.num_used_blocks == 0


def test_preempted_embeddings_recompute_exactly(tiny_model_dirs):
    """In a pool too small for everyone, mean requests are preempted mid-prompt and
    recomputed: their sums start afresh and the vectors stay exact."""
    path = tiny_model_dirs["llama"]
    prompts = _prompts(6, seed=6, lo=40, hi=60)
    engine = _engine(path, pooling="mean", block_size=16, num_kv_blocks=8, max_num_batched_tokens=24,
                     enable_prefix_caching=False)
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    pooling = engine.pooling_params()
    arrivals = {0: [(f"g{i}", p, dict(params=greedy)) for i, p in enumerate(prompts[:3])],
                2: [(f"e{i}", p, dict(pooling=pooling)) for i, p in enumerate(prompts[3:])]}
    out = _drain(engine, arrivals)
    assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    for i, p in enumerate(prompts[3:]):
        _assert_close(out[f"e{i}"], _reference(path, p, "mean", False), f"preempted e{i}")
    hf = load_hf(path)
    for i, p in enumerate(prompts[:3]):
        assert out[f"g{i}"] == hf_greedy(hf, p, 30)[0]


def test_matryoshka_dimensions(tiny_model_dirs):
    """A Matryoshka model's vector is truncated first, then normalized; a model not marked
    so refuses ``dimensions`` by name."""
    path = tiny_model_dirs["qwen3"]
    prompts = _prompts(2, seed=7)
    llm = LLM(path, dtype="float32", device="cpu", pooling="last", normalize=True, matryoshka=True)
    for p, o in zip(prompts, llm.embed(prompts, dimensions=32)):
        assert len(o.embedding) == 32
        _assert_close(o.embedding, _reference(path, p, "last", True, dimensions=32), "dimensions=32")
    with pytest.raises(InvalidRequestError, match=r"dimensions must be an integer in \[1, 128\]"):
        llm.embed(prompts, dimensions=129)
    plain = LLM(path, dtype="float32", device="cpu", pooling="last")
    with pytest.raises(InvalidRequestError, match="does not support `dimensions`"):
        plain.embed(prompts, dimensions=32)


def test_model_without_pooling_refuses_by_name(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", device="cpu", served_model_name="gen-only")
    with pytest.raises(InvalidRequestError, match="model 'gen-only' serves no embeddings"):
        llm.embed([[5, 6, 7]])


def test_abort_mid_prompt_frees_blocks(tiny_llama):
    engine = _engine(tiny_llama, pooling="mean", max_num_batched_tokens=8, block_size=4)
    engine.add_request(_prompts(1, seed=8, lo=40, hi=41)[0], request_id="e", pooling=engine.pooling_params())
    engine.step()
    assert engine.kv.num_used_blocks > 0
    assert engine.abort_request("e") > 0
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.request_id == "e"][-1] == "abort"
    assert engine.kv.num_used_blocks == 0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_triton_backend_embeddings(tiny_model_dirs, async_scheduling):
    """The triton backend pools the same hidden states (Triton's interpreter on the CPU)."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    path = tiny_model_dirs["llama"]
    prompts = _prompts(3, seed=9, lo=5, hi=30)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = _engine(path, backend="triton", device=device, pooling="last", normalize=True, block_size=16,
                     num_kv_blocks=32, max_model_len=128, max_num_batched_tokens=24, max_num_seqs=4,
                     async_scheduling=async_scheduling)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    pooling = engine.pooling_params()
    out = _drain(engine, {0: [("e0", prompts[0], dict(pooling=pooling)), ("g", prompts[1], dict(params=greedy))],
                          1: [("e2", prompts[2], dict(pooling=pooling))]})
    _assert_close(out["e0"], _reference(path, prompts[0], "last", True), "triton e0")
    _assert_close(out["e2"], _reference(path, prompts[2], "last", True), "triton e2")
    assert out["g"] == hf_greedy(load_hf(path), prompts[1], 4)[0]

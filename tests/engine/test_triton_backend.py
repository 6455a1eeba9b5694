"""The triton backend (Triton kernels; CUDA graphs on a GPU) gives the torch backend's greedy
tokens and logits. On the CPU it runs through Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package")

from llmesh.engine import LLMEngine, SamplingParams, build_engine_config  # noqa: E402
from llmesh.kernels.fa3 import fa3_runs_here  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(path, backend, prompts, arrive_at, **kw):
    engine = LLMEngine(build_engine_config(path, dtype="float32", device=DEVICE, backend=backend, **kw))
    logits: dict[str, list[torch.Tensor]] = {}
    engine.runner.logits_observer = lambda reqs, lg: [logits.setdefault(r.request_id, []).append(lg[i].cpu())
                                                      for i, r in enumerate(reqs)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    added, outs, step = set(), {}, 0
    while len(added) < len(prompts) or engine.has_unfinished_requests():
        for i, p in enumerate(prompts):
            if i not in added and arrive_at[i] <= step:
                engine.add_request(p, params, request_id=f"r{i}")
                added.add(i)
        for d in engine.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
        step += 1
    return [outs[f"r{i}"] for i in range(len(prompts))], logits


@pytest.mark.parametrize("arch,async_scheduling", [("llama", True), ("qwen3", False)])
def test_triton_backend_matches_torch_backend(tiny_model_dirs, arch, async_scheduling):
    path = tiny_model_dirs[arch]
    rng = random.Random(7)
    shared = [rng.randrange(3, 512) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(n)] for n in (3, 11, 1)]
    kw = dict(block_size=16, num_kv_blocks=32, max_model_len=128, max_num_batched_tokens=24, max_num_seqs=4)
    ref_tokens, ref_logits = _run(path, "torch", prompts, [0, 1, 3], **kw)
    tokens, logits = _run(path, "triton", prompts, [0, 1, 3], async_scheduling=async_scheduling, **kw)
    assert tokens == ref_tokens
    worst = max(float((a - b).abs().max()) for rid in ref_logits for a, b in zip(logits[rid], ref_logits[rid]))
    assert worst < 1e-3, f"max |triton - torch| logit = {worst}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_released_graphs_leave_eager_steps_with_the_same_tokens(tiny_llama):
    """release_graphs (what every tensor-parallel rank does before leaving its NCCL group)
    drops the captured graphs; the engine then runs eager with the same greedy tokens."""
    from llmesh.engine import LLM

    llm = LLM(tiny_llama, device="cuda", backend="triton", dtype="float32", max_num_seqs=4, num_kv_blocks=64)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    runner = llm.engine.runner
    before = [o.token_ids for o in llm.generate(prompts, params)]
    assert runner.stats.decode_graph_steps > 0
    runner.release_graphs()
    assert not runner.use_graphs and not runner.decode_graphs and not runner.mixed_graphs
    steps = runner.stats.decode_graph_steps + runner.stats.mixed_graph_steps
    assert [o.token_ids for o in llm.generate(prompts, params)] == before
    assert runner.stats.decode_graph_steps + runner.stats.mixed_graph_steps == steps
    runner.release_graphs()  # a second call is a no-op


@pytest.mark.gpu
@pytest.mark.skipif(not fa3_runs_here(), reason="FlashAttention-3 runs on a Hopper GPU with the fa3-fwd package")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_fa3_prefill_and_extend_paths_give_the_paged_kernels_tokens(tiny_llama, monkeypatch, kv_cache_dtype):
    """With the measured tables naming FA3 for every size, fresh prompts (dense attention; with
    an FP8 pool, extend attention over the dequantized pool) and prefix-cache hits and later
    chunks (extend attention over the gathered contexts) run through FA3, and the greedy tokens
    are those of the paged Triton kernels (bfloat16, eager steps)."""
    from llmesh.engine import LLM
    from llmesh.kernels import dense_causal_attention as dca
    from llmesh.kernels import extend_attention as ext
    from llmesh.kernels import fa3
    from llmesh.kernels.common import cuda_device_tag

    rng = random.Random(3)
    shared = [rng.randrange(3, 512) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(n)] for n in (30, 7, 52, 19)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def generate():
        llm = LLM(tiny_llama, device="cuda", backend="triton", dtype="bfloat16", max_num_seqs=4, num_kv_blocks=64,
                  cuda_graphs=False, max_num_batched_tokens=48, kv_cache_dtype=kv_cache_dtype)
        first = [o.token_ids for o in llm.generate(prompts[:1], params)]  # caches the shared prefix
        return first + [o.token_ids for o in llm.generate(prompts[1:], params)]

    want = generate()
    tag = cuda_device_tag(torch.device("cuda"))
    monkeypatch.setitem(dca.DENSE_CAUSAL_BACKEND, tag, {1 << 20: "fa3"})
    monkeypatch.setitem(ext.EXTEND_BACKEND, tag, {1 << 20: "fa3"})
    monkeypatch.setattr(dca, "LIBRARY_MIN_TOKENS", 1)
    monkeypatch.setattr(ext, "LIBRARY_MIN_TOKENS", 1)
    calls = []
    real = fa3.fa3_varlen
    monkeypatch.setattr(fa3, "fa3_varlen", lambda *a, **kw: calls.append(a[3] is a[4]) or real(*a, **kw))
    assert generate() == want
    assert False in calls  # extends (keys gathered out of the pool)
    assert (True in calls) == (kv_cache_dtype == "auto")  # dense calls (q offsets = k offsets): 16-bit pools only

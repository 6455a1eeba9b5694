"""Mixture-of-experts models: greedy output of the engine equals Hugging Face transformers',
token for token, on tiny random Mixtral, Qwen3-MoE and Qwen2-MoE models (the helpers and
scenarios of test_fidelity.py: staggered batching, chunked prefill under a tiny budget, a
prefix-cache hit, preemption by recompute)."""

from __future__ import annotations

import random

import pytest
import torch

from llmesh.engine.loader.hf_config import model_config_from_hf
from llmesh.engine.loader.hf_folder import read_config_json
from tests.engine.hf_reference import hf_greedy, load_hf
from tests.engine.test_fidelity import NEW_TOKENS, _engine, _prompts, _reference, _run
from tests.fixtures.tiny_models import MOE_ARCHS, build_tiny_model


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: build_tiny_model(str(root / arch), arch) for arch in MOE_ARCHS}


def test_config_fields(moe_dirs):
    mixtral = model_config_from_hf(read_config_json(moe_dirs["mixtral"]), "m")
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.norm_topk_prob) == (8, 2, True)
    assert mixtral.sparse_layers == [0, 1] and not mixtral.qk_norm
    q3 = model_config_from_hf(read_config_json(moe_dirs["qwen3_moe"]), "q3")
    assert (q3.num_experts, q3.num_experts_per_tok, q3.moe_intermediate_size) == (16, 4, 64)
    assert q3.sparse_layers == [1, 2] and q3.qk_norm and q3.norm_topk_prob
    q2 = model_config_from_hf(read_config_json(moe_dirs["qwen2_moe"]), "q2")
    assert q2.sparse_layers == [1, 3] and q2.shared_expert_intermediate_size == 96 and q2.attention_bias


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_single_request_tokens_and_logits(moe_dirs, arch):
    path = moe_dirs[arch]
    prompt = _prompts(1, seed=1)[0]
    ref_tokens, ref_logits = hf_greedy(load_hf(path), prompt, NEW_TOKENS)
    engine = _engine(path)
    seen: list[torch.Tensor] = []
    engine.runner.logits_observer = lambda reqs, logits: seen.append(logits[0].clone())
    tokens, _ = _run(engine, [prompt])
    assert tokens[0] == ref_tokens
    worst = max(float((a - b).abs().max()) for a, b in zip(seen, ref_logits))
    assert worst < 1e-4, f"max |logit - HF logit| = {worst}"
    counts = engine.runner.model.expert_tokens
    # Every token of every sparse layer went to top-k experts: prompt + generated (the last
    # generated token is never fed back).
    fed = len(prompt) + NEW_TOKENS - 1
    cfg = engine.runner.model.config
    assert counts.sum(dim=1).tolist() == [fed * cfg.num_experts_per_tok] * len(cfg.sparse_layers)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_staggered_batching(moe_dirs, arch):
    path = moe_dirs[arch]
    prompts = _prompts(6, seed=2)
    tokens, _ = _run(_engine(path), prompts, arrive_at=[0, 0, 1, 2, 3, 5])
    assert tokens == _reference(path, prompts)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_chunked_prefill_and_prefix_cache(moe_dirs, arch):
    path = moe_dirs[arch]
    rng = random.Random(4)
    shared = [rng.randrange(3, 512) for _ in range(2 * 16 + 5)]
    first = shared + [rng.randrange(3, 512) for _ in range(7)]
    second = shared + [rng.randrange(3, 512) for _ in range(11)]
    engine = _engine(path, block_size=16, max_num_batched_tokens=7)
    tokens_a, _ = _run(engine, [first])
    tokens_b, reqs = _run(engine, [second])
    assert reqs[0].num_cached_tokens == 32
    assert [tokens_a[0], tokens_b[0]] == _reference(path, [first, second])


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_forced_preemption(moe_dirs, arch):
    path = moe_dirs[arch]
    prompts = _prompts(6, seed=5, lo=20, hi=40)
    engine = _engine(path, block_size=16, num_kv_blocks=12, enable_prefix_caching=False)
    tokens, reqs = _run(engine, prompts)
    assert sum(r.num_preemptions for r in reqs) > 0, "the pool was meant to force preemption"
    assert tokens == _reference(path, prompts)
    assert engine.kv.num_free_blocks == engine.kv.num_total_blocks


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_triton_backend_matches_torch_backend(moe_dirs, arch):
    """The fused MoE kernel (through Triton's interpreter on the CPU) inside the engine."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    from tests.engine.test_triton_backend import _run as run_backend

    path = moe_dirs[arch]
    rng = random.Random(7)
    shared = [rng.randrange(3, 512) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(n)] for n in (3, 11, 1)]
    kw = dict(block_size=16, num_kv_blocks=32, max_model_len=128, max_num_batched_tokens=24, max_num_seqs=4)
    ref_tokens, ref_logits = run_backend(path, "torch", prompts, [0, 1, 3], **kw)
    tokens, logits = run_backend(path, "triton", prompts, [0, 1, 3], **kw)
    assert tokens == ref_tokens
    worst = max(float((a - b).abs().max()) for rid in ref_logits for a, b in zip(logits[rid], ref_logits[rid]))
    assert worst < 1e-3, f"max |triton - torch| logit = {worst}"


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_fused_norm_router_on_the_triton_backend_gives_the_torch_backends_tokens(moe_dirs, monkeypatch, arch):
    """The MoE entry as one kernel (moe_norm_router.py: the residual add and norm, the router's
    logits, the top-k) in every step of up to 24 tokens, prefill chunks included, inside the
    engine: the torch backend's tokens (Mixtral's float32 weights, Qwen2-MoE's shared expert
    reading the normalised row the kernel stored)."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    from llmesh.kernels import moe_norm_router
    from tests.engine.test_triton_backend import _run as run_backend

    real, used = moe_norm_router.norm_router, []

    def counting(x, *args, **kwargs):
        used.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(moe_norm_router, "norm_router", counting)
    monkeypatch.setattr(moe_norm_router, "NORM_ROUTER_MAX_TOKENS", 24)
    path = moe_dirs[arch]
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (9, 14, 5)]
    kw = dict(block_size=16, num_kv_blocks=32, max_model_len=128, max_num_batched_tokens=24, max_num_seqs=4)
    tokens, _ = run_backend(path, "triton", prompts, [0, 1, 6], **kw)
    assert 1 in used and max(used) > 3, used  # one-token decodes and prefill chunks both fused
    monkeypatch.undo()
    assert tokens == run_backend(path, "torch", prompts, [0, 1, 6], **kw)[0]


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_gemv_form_on_the_triton_backend_gives_the_torch_backends_tokens(moe_dirs, monkeypatch, quantization):
    """The fused MoE kernel's GEMV form (one pair a block, MoEConfig.block_m 1) where the tile
    table would pick it, at decode sizes: one-token steps (pair blocks, the down GEMM summing the
    k rows) and steps of two or three tokens (sorted blocks of one pair), inside the engine; float
    experts and INT4 ones (quantized on load, against the torch backend's INT4 reference)."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    from llmesh.kernels import fused_moe as fm
    from llmesh.kernels.fused_moe_config import MoEConfig
    from tests.engine.test_triton_backend import _run as run_backend

    real, used = fm.pick_config, []

    def gemv_at_decode(m, num_experts, n, k, top_k, device=None, weights="dense"):
        if m <= 3:
            used.append((m, weights))
            return MoEConfig(1, 8, 32, 4, 1) if weights == "dense" else MoEConfig(1, 32, 32, 4, 1)
        return real(m, num_experts, n, k, top_k, device, weights)

    monkeypatch.setattr(fm, "pick_config", gemv_at_decode)
    path = moe_dirs["qwen3_moe"]
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (9, 14, 5)]
    kw = dict(block_size=16, num_kv_blocks=32, max_model_len=128, max_num_batched_tokens=24, max_num_seqs=4)
    if quantization != "none":
        kw["quantization"] = quantization
    tokens, _ = run_backend(path, "triton", prompts, [0, 1, 6], **kw)
    fmt = "dense" if quantization == "none" else quantization
    assert (1, fmt) in used and {(2, fmt), (3, fmt)} & set(used), used
    monkeypatch.setattr(fm, "pick_config", real)
    assert tokens == run_backend(path, "torch", prompts, [0, 1, 6], **kw)[0]


@pytest.mark.parametrize("method,dtype", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn), ("int4", torch.uint8)])
def test_quantized_experts_triton_equals_torch(moe_dirs, method, dtype):
    """Quantize-on-load int8 / fp8: experts become codes with per-row scales; the fused kernel
    (dequant factored out of its K loop) gives the torch reference's tokens. int4: group-wise
    codes with zero points, widened inside the K loop."""
    from llmesh.engine import LLM, SamplingParams
    from llmesh.engine.model_runner import model_weight_bytes

    if method == "fp8" and not torch.cuda.is_available():
        pytest.skip("the triton backend's fp8 linears need an FP8 GPU (tests/kernels covers the fp8 experts)")
    path = moe_dirs["qwen3_moe"]
    prompts = _prompts(2, seed=6)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs, sizes = [], []
    for backend, quant in (("torch", method), ("triton", method), ("torch", "none")):
        llm = LLM(path, device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32", backend=backend, quantization=quant, num_kv_blocks=64,
                  max_num_seqs=4)
        model = llm.engine.runner.model
        if quant != "none":
            assert model.layers[1].moe.experts.w13.dtype == dtype
            assert model.layers[1].moe.experts.int4 == (method == "int4")
        outs.append([o.token_ids for o in llm.generate(prompts, greedy)])
        sizes.append(model_weight_bytes(model))
    assert outs[0] == outs[1]
    assert sizes[0] < sizes[2] / 2


def test_checkpoint_lacking_an_expert_is_named(moe_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from llmesh.engine.errors import ModelLoadError

    dest = tmp_path / "broken"
    shutil.copytree(moe_dirs["mixtral"], dest)
    tensors = load_file(str(dest / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"block_sparse_moe\.experts\.5\.w3"):
        _engine(str(dest))


def test_bad_expert_counts_are_refused():
    from llmesh.engine.errors import UnsupportedModelError

    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 300, "num_experts": 4,
           "num_experts_per_tok": 8, "moe_intermediate_size": 32}
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=8"):
        model_config_from_hf(cfg, "bad")
    mixtral = {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
               "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 300, "num_local_experts": 8,
               "num_experts_per_tok": 0}
    with pytest.raises(UnsupportedModelError, match=r"num_experts_per_tok \(0\) must be in 1\.\.8"):
        model_config_from_hf(mixtral, "bad")

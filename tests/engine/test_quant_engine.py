"""Serving quantized weights end to end: quantize-on-load (int8 / int4 / fp8 / w4a8), GGUF blocks
kept packed, AWQ / GPTQ checkpoints, and the errors for what cannot be served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmesh.engine import LLM, SamplingParams
from llmesh.engine.errors import UnsupportedModelError
from llmesh.engine.model.weights import FusedLinear
from llmesh.engine.quant.awq_gptq import pack_awq, pack_gptq
from llmesh.engine.quant.packed import Fp8Weight, Int4Weight, Int8Weight, W4A8Weight
from tests.fixtures.checkpoints import split_projections, write_checkpoint_pair

PROMPTS = [[5, 17, 99, 300, 42, 7], [400, 3, 3, 250], list(range(30, 70))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _generate(path: str, **kw) -> tuple[LLM, list[list[int]]]:
    llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=64, **kw)
    return llm, [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _linears(llm: LLM) -> dict[str, FusedLinear]:
    """The decoder's linear layers (q/k/v and gate/up fused: 4 per layer), LM head excluded."""
    return {name: m for name, m in llm.engine.runner.model.named_linears() if name != "lm_head"}


def _parts(w) -> list:
    """A fused weight's parts: itself, or the list of parts that could not share a kernel."""
    return w if isinstance(w, list) else [w]


def _first_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    llm.engine.runner.logits_observer = lambda reqs, logits: seen.append(logits[0].clone())
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    return seen[0]


@pytest.mark.parametrize("method,kind", [("int8", Int8Weight), ("int4", Int4Weight), ("fp8", Fp8Weight),
                                         ("w4a8", W4A8Weight)])
def test_quantize_on_load_keeps_weights_packed(tiny_llama, method, kind):
    """The quantized engine computes exactly what a float engine holding the dequantized
    weights computes (weight-only formats); FP8 and W4A8 also quantize activations, so they are
    only close."""
    from llmesh.engine.model_runner import model_weight_bytes

    # No prefix caching: the float engine's KV for the prompt must be recomputed after its
    # weights are swapped.
    quant, _ = _generate(tiny_llama, quantization=method, enable_prefix_caching=False)
    dense, _ = _generate(tiny_llama, quantization="none", enable_prefix_caching=False)
    assert quant.engine.quantization.name == method
    packed = _linears(quant)
    assert len(packed) == 4 * 2 and all(isinstance(m.weight, kind) for m in packed.values())
    assert model_weight_bytes(quant.engine.runner.model) < model_weight_bytes(dense.engine.runner.model)
    reference = _first_logits(dense, PROMPTS[2])
    dense_modules = _linears(dense)
    with torch.no_grad():
        for name, m in packed.items():
            dense_modules[name].weight.copy_(m.weight.dequantize().t())
    got, twin = _first_logits(quant, PROMPTS[2]), _first_logits(dense, PROMPTS[2])
    if method in ("fp8", "w4a8"):
        assert torch.corrcoef(torch.stack([got, twin]))[0, 1] > 0.99
    else:
        torch.testing.assert_close(got, twin, rtol=1e-4, atol=1e-4)
    assert (got - reference).norm() / reference.norm() < {"int8": 0.05, "int4": 0.6, "fp8": 0.4, "w4a8": 0.7}[method]


def test_demo_gguf_runs_as_q4_1_with_the_dequantized_models_tokens():
    from llmesh.demo_model import find_demo_model
    from llmesh.engine.errors import ModelLoadError
    from llmesh.engine.model_runner import model_weight_bytes

    try:
        path = find_demo_model()
    except ModelLoadError as exc:  # e.g. the GPU image, which has no demo wheel
        pytest.skip(str(exc))
    params = SamplingParams(max_tokens=16, temperature=0.0)
    msgs = [{"role": "user", "content": "Name three colors."}]
    # float32 on both so that, on a GPU too, the packed kernels and the dense matmuls round alike.
    kept = LLM(path, quantization="gguf", num_kv_blocks=32, dtype="float32")
    model = kept.engine.runner.model
    formats = {p.format for m in _linears(kept).values() for p in _parts(m.weight)}
    assert formats == {"q4_1"}
    embed = model.embed_tokens
    assert isinstance(embed, Int8Weight) and embed.format == "q8_0"
    kept_text = kept.chat(msgs, params)[0]
    kept_bytes = model_weight_bytes(model)
    del kept, model, embed
    dense = LLM(path, quantization="none", num_kv_blocks=32, dtype="float32")
    assert kept_bytes * 4 < model_weight_bytes(dense.engine.runner.model)
    assert kept_text.token_ids == dense.chat(msgs, params)[0].token_ids


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_triton_backend_quantized_matches_torch_backend(tiny_llama, method):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    outs = []
    for backend in ("torch", "triton"):
        llm = LLM(tiny_llama, device=device, dtype="float32", backend=backend, quantization=method,
                  num_kv_blocks=64, max_num_seqs=4)
        outs.append([o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY)])
    assert outs[0] == outs[1]


def _quantized_checkpoint(src: str, dest: Path, method: str, group: int = 64) -> Path:
    """``src`` (a float HF folder) as an AWQ / GPTQ checkpoint with codes fitted to its weights,
    and beside it (dest/float) a float twin holding exactly (q - z) * s."""
    gen = torch.Generator().manual_seed(3)
    kept, proj = split_projections(src)
    packed, twin = dict(kept), dict(kept)
    for name, w in proj.items():
        wt = w.t().float()                                               # [K, N]
        k, n = wt.shape
        if method == "gptq":  # act-order: rows of one group scattered over K
            g_idx = torch.arange(k, dtype=torch.int32)[torch.randperm(k, generator=gen)] // group
        else:
            g_idx = torch.arange(k, dtype=torch.int32) // group
        scales = torch.zeros(k // group, n)
        for g in range(k // group):
            scales[g] = wt[g_idx == g].abs().amax(0) / 7.5
        scales = scales.clamp_min(1e-4).half()
        zeros = torch.randint(7, 10, (k // group, n), generator=gen)
        s_rows, z_rows = scales.float()[g_idx.long()], zeros[g_idx.long()]
        q = (torch.round(wt / s_rows) + z_rows).clamp(0, 15).to(torch.int32)
        prefix = name.removesuffix(".weight")
        parts = (pack_awq(q, zeros, scales) if method == "awq"
                 else pack_gptq(q, zeros, scales, group, g_idx=g_idx, checkpoint_format="gptq"))
        packed.update({f"{prefix}.{part}": t for part, t in parts.items()})
        twin[name] = ((q - z_rows).float() * s_rows).t().contiguous()
    return write_checkpoint_pair(
        src, dest, packed, twin,
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
        if method == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False,
         "checkpoint_format": "gptq"})


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_awq_gptq_checkpoints_load_into_the_int4_path(tiny_llama, tmp_path, method):
    folder = _quantized_checkpoint(tiny_llama, tmp_path / method, method)
    llm, tokens = _generate(str(folder))
    assert llm.engine.quantization.name == method
    parts = [p for m in _linears(llm).values() for p in _parts(m.weight)]
    assert all(isinstance(p, Int4Weight) for p in parts)
    # q/k/v and gate/up fuse unless act-order gave each its own permutation (GPTQ here)
    assert len(parts) == (14 if method == "gptq" else 8)
    assert isinstance(llm.engine.runner.model.lm_head.weight, torch.Tensor)  # stored in float, kept so
    if method == "gptq":
        assert all(p.perm is not None for p in parts)
    _, twin_tokens = _generate(str(folder / "float"))
    assert tokens == twin_tokens


def test_unservable_quantizations_say_what_is_missing(tiny_llama, tmp_path):
    with pytest.raises(UnsupportedModelError, match="not a GGUF file"):
        LLM(tiny_llama, device="cpu", quantization="gguf", num_kv_blocks=8)
    with pytest.raises(UnsupportedModelError, match="needs a AWQ checkpoint|needs an? AWQ checkpoint"):
        LLM(tiny_llama, device="cpu", quantization="awq", num_kv_blocks=8)
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedModelError, match="compute capability 8.9"):
            LLM(tiny_llama, device="cpu", backend="triton", quantization="fp8", num_kv_blocks=8)
        with pytest.raises(UnsupportedModelError, match="w4a8.*FBGEMM.*--backend torch"):
            LLM(tiny_llama, device="cpu", backend="triton", quantization="w4a8", num_kv_blocks=8)
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(tiny_llama, device="cpu", quantization="nf4", num_kv_blocks=8)
    odd = tmp_path / "bnb"
    shutil.copytree(tiny_llama, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="bitsandbytes"):
        LLM(str(odd), device="cpu", num_kv_blocks=8)
    awq = _quantized_checkpoint(tiny_llama, tmp_path / "awq", "awq")
    with pytest.raises(UnsupportedModelError, match="AWQ checkpoint"):
        LLM(str(awq), device="cpu", quantization="int8", num_kv_blocks=8)


@pytest.mark.parametrize("rows", [3, 300])  # the fused kernels, and expand-then-cuBLAS from 256 rows
def test_linear_kernel_paths_match_the_reference(rows):
    from llmesh.engine.quant.linear import linear
    from llmesh.engine.quant.quantize import quantize_int4, quantize_int8

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(rows)
    dense = torch.randn(48, 160, generator=gen)                     # [N, K]
    x = torch.randn(rows, 160, generator=gen)
    int4 = quantize_int4(dense, group_size=32)
    perm = torch.randperm(160, generator=gen)                       # act-order: x's columns permuted
    shuffled = Int4Weight(int4.qweight, int4.scales, int4.mins, 32, 160, perm=perm)
    for w in (quantize_int8(dense), int4, shuffled):
        ref = linear(x, w, kernels=False)
        got = linear(x.to(device), w.to(device), kernels=True).cpu()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the measured table dispatches on CUDA only")
@pytest.mark.parametrize("kind", ["w4a16", "w8a16"])
def test_a_dequant_table_entry_expands_then_multiplies(monkeypatch, kind):
    """["dequant", []] at a measured M sends those rows through expand-then-cuBLAS (the default
    only from DEQUANT_GEMM_MIN_M rows), act-order weights included; M past the entry, the
    default path."""
    from llmesh.engine.quant import linear as linear_mod
    from llmesh.engine.quant.quantize import quantize_int4, quantize_int8
    from tests.engine.library_dispatch import count_calls, use_table

    gen = torch.Generator().manual_seed(7)
    dense = torch.randn(64, 256, generator=gen)
    w = quantize_int4(dense, group_size=64) if kind == "w4a16" else quantize_int8(dense)
    if kind == "w4a16":  # act-order: x's columns permuted before the expansion
        w = Int4Weight(w.qweight, w.scales, w.mins, 64, 256, perm=torch.randperm(256, generator=gen))
    w = w.to("cuda")
    use_table(monkeypatch, w, ["dequant", []], kind)
    calls = count_calls(monkeypatch, linear_mod, "dequant_matmul")
    x = torch.randn(1, 256, generator=gen)
    got = linear_mod.linear(x.cuda().bfloat16(), w).float().cpu()
    ref = linear_mod.linear(x.bfloat16(), w.to("cpu"), kernels=False).float()
    assert len(calls) == 1
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    linear_mod.linear(torch.randn(4, 256, device="cuda").bfloat16(), w)  # M = 4: past the entry
    assert len(calls) == 1

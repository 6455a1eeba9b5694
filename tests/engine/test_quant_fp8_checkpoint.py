"""FP8 checkpoints (compressed-tensors and the fp8 writers) served from their stored E4M3 weights:
configs parsed or refused with what is missing, tensors joined into packed weights, and whole
engines that compute what a float engine holding the same weights computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmesh.engine import LLM, SamplingParams
from llmesh.engine.errors import ModelLoadError, UnsupportedModelError
from llmesh.engine.model.shard import slice_in_features, slice_out_features
from llmesh.engine.quant.fp8_checkpoint import parse_fp8_config
from llmesh.engine.quant.packed import Fp8BlockWeight, Fp8Weight
from llmesh.engine.quant.quantize import quantize_fp8
from llmesh.kernels.block_fp8_gemm import quantize_fp8_blocks
from tests.fixtures.checkpoints import split_projections, write_checkpoint_pair
from tests.fixtures.tiny_models import build_tiny_model

PROMPTS = [[5, 17, 99, 300, 42, 7], [400, 3, 3, 250], list(range(30, 70))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
E4M3 = torch.float8_e4m3fn


def _ct_config(strategy: str, dynamic: bool = True, block=None) -> dict:
    """A compressed-tensors quantization_config as llm-compressor writes one (FP8_DYNAMIC / FP8 schemes)."""
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic,
            "strategy": "token" if dynamic else "tensor"}
    if block:
        acts.update(strategy="group", group_size=block[1])
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "block_structure": list(block) if block else None}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def _quantize(w: torch.Tensor, strategy: str, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes [N, K], scale) of a float weight as the writers compute them (absmax / 448)."""
    w = w.float()
    if strategy == "channel":
        q = quantize_fp8(w)
        return q.qweight, q.scales[:, None]
    if strategy == "tensor":
        s = w.abs().amax() / 448.0
        return (w / s).clamp(-448, 448).to(E4M3), s.reshape(())
    return quantize_fp8_blocks(w, block)


def _dequantize(q: torch.Tensor, s: torch.Tensor, strategy: str, block: tuple[int, int]) -> torch.Tensor:
    if strategy != "block":
        return q.float() * (s if s.dim() == 2 else s.reshape(1, 1))
    return Fp8BlockWeight(q, s, block).dequantize().t()


def _fp8_checkpoint(src: str, dest: Path, writer: str, strategy: str, block=(128, 128), static=False) -> Path:
    """``src`` (a float HF folder) as an FP8 checkpoint, and beside it (dest/float) a float twin
    holding exactly the dequantized weights."""
    kept, proj = split_projections(src)
    packed, twin = dict(kept), dict(kept)
    for name, w in proj.items():
        prefix = name.removesuffix(".weight")
        q, s = _quantize(w, strategy, block)
        packed[name] = q
        packed[f"{prefix}.weight_scale_inv" if (writer, strategy) == ("fp8", "block") else f"{prefix}.weight_scale"] = s
        if static:
            packed[f"{prefix}.input_scale"] = torch.tensor([0.02])
        twin[name] = _dequantize(q, s, strategy, block).to(w.dtype).contiguous()
    if writer == "fp8":
        config = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
                  **({"fmt": "e4m3", "weight_block_size": list(block)} if strategy == "block" else {})}
    else:
        config = _ct_config(strategy, not static, block if strategy == "block" else None)
    return write_checkpoint_pair(src, dest, packed, twin, config)


def _engine(path: str, **kw) -> LLM:
    return LLM(path, device="cpu", dtype="float32", backend="torch", num_kv_blocks=64, enable_prefix_caching=False,
               **kw)


def _linears(llm: LLM) -> dict:
    return {name: m for name, m in llm.engine.runner.model.named_linears() if name != "lm_head"}


def _first_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    llm.engine.runner.logits_observer = lambda reqs, logits: seen.append(logits[0].float().clone())
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    return seen[0]


# ---- configs ---------------------------------------------------------------------------------
def test_configs_of_both_writers_parse():
    c = parse_fp8_config(_ct_config("channel"))
    assert (c.writer, c.strategy, c.activations) == ("compressed-tensors", "channel", "dynamic")
    c = parse_fp8_config(_ct_config("tensor", dynamic=False))
    assert (c.strategy, c.activations) == ("tensor", "static")
    assert parse_fp8_config(_ct_config("block", block=(128, 128))).block == (128, 128)
    c = parse_fp8_config({"quant_method": "fp8", "activation_scheme": "static"})
    assert (c.writer, c.strategy, c.activations) == ("fp8", "tensor", "static")
    c = parse_fp8_config({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                          "weight_block_size": [128, 128]})
    assert (c.strategy, c.block) == ("block", (128, 128))


@pytest.mark.parametrize("config,match", [
    ({**_ct_config("channel"), "format": "pack-quantized"}, "float-quantized"),
    ({**_ct_config("channel"), "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int",
                                                                        "strategy": "group"}}}},
     "float-quantized|8-bit float"),
    ({**_ct_config("group")}, "strategy 'group'"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "E4M3"),
    ({"quant_method": "fp8", "weight_block_size": [128, 100]}, "block size"),
    ({"quant_method": "fp8", "activation_scheme": "per-head"}, "activation_scheme"),
])
def test_unservable_fp8_configs_say_what_is_wrong(config, match):
    with pytest.raises(UnsupportedModelError, match=match):
        parse_fp8_config(config)


# ---- whole engines ---------------------------------------------------------------------------
def test_a_per_channel_checkpoint_is_the_on_load_fp8_format(tiny_llama, tmp_path):
    """Per-channel codes with absmax / 448 scales are what quantization='fp8' makes on load, so
    the checkpoint's engine and an engine quantizing its float twin hold the same bytes and give
    the same logits and tokens."""
    folder = _fp8_checkpoint(tiny_llama, tmp_path / "ct", "compressed-tensors", "channel")
    stored, on_load = _engine(str(folder)), _engine(str(folder / "float"), quantization="fp8")
    assert stored.engine.quantization.name == "fp8"
    a, b = _linears(stored), _linears(on_load)
    assert len(a) == 8 and all(isinstance(m.weight, Fp8Weight) for m in a.values())  # q/k/v and gate/up fused
    for name, m in a.items():
        assert torch.equal(m.weight.qweight.view(torch.uint8), b[name].weight.qweight.view(torch.uint8)), name
        assert torch.equal(m.weight.scales, b[name].weight.scales), name
    assert torch.equal(_first_logits(stored, PROMPTS[2]), _first_logits(on_load, PROMPTS[2]))
    outs = [[o.token_ids for o in e.generate(PROMPTS, GREEDY)] for e in (stored, on_load)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("writer,strategy,block", [
    ("compressed-tensors", "tensor", (128, 128)),
    ("fp8", "tensor", (128, 128)),
    ("fp8", "block", (128, 128)),      # the checkpoints' block: k/v (64 rows) do not fuse with q
    ("compressed-tensors", "block", (32, 64)),
])
def test_fp8_checkpoints_serve_their_stored_weights(tiny_llama, tmp_path, writer, strategy, block):
    folder = _fp8_checkpoint(tiny_llama, tmp_path / "ckpt", writer, strategy, block, static=strategy == "tensor")
    llm = _engine(str(folder))
    assert llm.engine.quantization.name == "fp8"
    linears = _linears(llm)
    kind = Fp8BlockWeight if strategy == "block" else Fp8Weight
    parts = [p for m in linears.values() for p in (m.weight if isinstance(m.weight, list) else [m.weight])]
    assert all(isinstance(p, kind) for p in parts)
    # 128-row blocks cannot stack the 64-row k and v under q: q/k/v stay three GEMMs
    assert len(parts) == (12 if block[0] == 128 and strategy == "block" else 8)
    assert isinstance(llm.engine.runner.model.lm_head.weight, torch.Tensor)  # "ignore": stored in float
    tensors = load_file(str(folder / "model.safetensors"))
    qkv = linears["model.layers.0.self_attn.qkv_proj"].weight
    q_part = qkv[0] if isinstance(qkv, list) else qkv
    stored = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q_part.qweight[: stored.shape[0]].view(torch.uint8), stored.view(torch.uint8))
    # The same weights in float: only the activations' FP8 rounding separates the two engines.
    twin = _engine(str(folder / "float"))
    got, ref = _first_logits(llm, PROMPTS[2]), _first_logits(twin, PROMPTS[2])
    assert torch.corrcoef(torch.stack([got, ref]))[0, 1] > 0.995
    assert llm.generate(PROMPTS, GREEDY)[0].token_ids  # decodes with the packed weights throughout


@pytest.mark.parametrize("writer,strategy", [("compressed-tensors", "channel"), ("compressed-tensors", "tensor"),
                                             ("compressed-tensors", "block"), ("fp8", "block")])
def test_the_formats_own_readers_take_the_test_checkpoints(tiny_llama, tmp_path, writer, strategy):
    """The checkpoints these tests write are read back by the format's own library through
    transformers (compressed-tensors; transformers' fine-grained FP8), dequantized to float, and
    give the float twin's logits exactly: the layout and scale meaning llmesh reads are theirs.
    (AutoFP8's per-tensor "fp8" layout has no reader in transformers; vLLM's Fp8Config reads it.)"""
    import transformers

    if writer == "compressed-tensors":
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is a test dependency (pyproject)")
        config = transformers.CompressedTensorsConfig(dequantize=True)
    else:
        config = transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=(32, 32))
    folder = _fp8_checkpoint(tiny_llama, tmp_path / "ckpt", writer, strategy, (32, 32))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                               quantization_config=config)
    twin = transformers.AutoModelForCausalLM.from_pretrained(str(folder / "float"), dtype=torch.float32)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, twin(ids).logits)


def test_fp8_checkpoint_errors_name_the_layer_and_the_fix(tiny_llama, tmp_path):
    folder = _fp8_checkpoint(tiny_llama, tmp_path / "ct", "compressed-tensors", "channel")
    with pytest.raises(UnsupportedModelError, match="FP8 checkpoint; it is served as quantization='fp8'"):
        _engine(str(folder), quantization="int4")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedModelError, match="FP8 checkpoint: .*compute capability 8.9"):
            LLM(str(folder), device="cpu", backend="triton", num_kv_blocks=8)
    tensors = load_file(str(folder / "model.safetensors"))
    bad = dict(tensors)
    bad["model.layers.1.mlp.down_proj.weight_scale"] = torch.ones(3, 1)
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.down_proj.*scale \(3, 1\)"):
        _engine(str(folder))
    del bad["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.down_proj\.weight.*no weight scale"):
        _engine(str(folder))


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])  # qwen2_moe: a shared expert too
def test_a_per_channel_moe_checkpoint_fills_the_fp8_experts(tmp_path, arch):
    """Every expert's stored codes and row scales land in the stacked FP8 experts as they are, so
    the engine equals one quantizing the float twin on load (which rounds to the same codes)."""
    src = build_tiny_model(str(tmp_path / "src"), arch)
    folder = _fp8_checkpoint(src, tmp_path / "ckpt", "compressed-tensors", "channel")
    stored, on_load = _engine(str(folder)), _engine(str(folder / "float"), quantization="fp8")
    experts, layer = _first_experts(stored)
    tensors = load_file(str(folder / "model.safetensors"))
    i = experts.w2.shape[2]
    code = tensors[f"model.layers.{layer}.mlp.experts.1.up_proj.weight"]
    assert torch.equal(experts.w13[1, i:].view(torch.uint8), code.view(torch.uint8))
    scale = tensors[f"model.layers.{layer}.mlp.experts.1.up_proj.weight_scale"]
    assert torch.equal(experts.w13_scale[1, i:], scale[:, 0].float())
    assert torch.equal(_first_logits(stored, PROMPTS[2]), _first_logits(on_load, PROMPTS[2]))
    outs = [[o.token_ids for o in e.generate(PROMPTS, GREEDY)] for e in (stored, on_load)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_a_block_moe_checkpoint_keeps_its_expert_blocks(tmp_path, arch):
    """A Qwen3-*-FP8-style checkpoint of an MoE model: the experts keep their codes and block
    scales (the fused MoE kernel scales each K step). The experts run weight-only, so the routed
    experts equal the float twin's to float32 rounding; the whole engine also rounds attention's
    activations to FP8, which can flip a router's choice, so it only tracks the twin."""
    src = build_tiny_model(str(tmp_path / "src"), arch)
    folder = _fp8_checkpoint(src, tmp_path / "ckpt", "fp8", "block", (32, 32))
    llm, twin = _engine(str(folder)), _engine(str(folder / "float"))
    experts, layer = _first_experts(llm)
    assert experts.block == (32, 32) and experts.w13.dtype == torch.float8_e4m3fn
    tensors = load_file(str(folder / "model.safetensors"))
    i = experts.w2.shape[2]
    scale = tensors[f"model.layers.{layer}.mlp.experts.2.up_proj.weight_scale_inv"]
    assert torch.equal(experts.w13_scale[2, i // 32:], scale)
    down = tensors[f"model.layers.{layer}.mlp.experts.2.down_proj.weight"]
    assert torch.equal(experts.w2[2].view(torch.uint8), down.view(torch.uint8))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, experts.w2.shape[1], generator=gen)
    ids = torch.stack([torch.randperm(experts.w13.shape[0], generator=gen)[:4] for _ in range(7)])
    weights = torch.softmax(torch.randn(7, 4, generator=gen), dim=-1)
    routed = [e.engine.runner.model.ops.moe(x, e.engine.runner.model.layers[layer].moe.experts, weights, ids)
              for e in (llm, twin)]
    torch.testing.assert_close(routed[0], routed[1], rtol=1e-5, atol=1e-5)
    got, ref = _first_logits(llm, PROMPTS[2]), _first_logits(twin, PROMPTS[2])
    assert torch.corrcoef(torch.stack([got, ref]))[0, 1] > 0.95
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in llm.generate(PROMPTS, GREEDY))


def _first_experts(llm: LLM):
    """(the stacked experts of the first sparse layer, its index)."""
    layer = next(i for i, lyr in enumerate(llm.engine.runner.model.layers) if lyr.moe is not None)
    return llm.engine.runner.model.layers[layer].moe.experts, layer


def test_tp2_serves_a_block_checkpoint_with_tp1_tokens(tiny_llama, tmp_path):
    """Two gloo ranks cut every block weight on block boundaries (32-row, 32-column blocks: the
    64-row k/v parts halve into whole blocks) and give one process's greedy tokens."""
    folder = _fp8_checkpoint(tiny_llama, tmp_path / "ckpt", "fp8", "block", (32, 32))
    outs = []
    for tp in (2, 1):
        llm = LLM(str(folder), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64,
                  tensor_parallel_size=tp)
        try:
            outs.append([o.token_ids for o in llm.generate(PROMPTS, GREEDY)])
        finally:
            llm.engine.core.shutdown()
    assert outs[0] == outs[1]


def test_expert_parallel_serves_a_block_moe_checkpoint_with_one_ranks_tokens(tmp_path):
    """Two ranks with expert parallelism: each holds half the experts with their block scales
    (allocated for its own experts) and a tensor-parallel half of attention; one rank's tokens."""
    src = build_tiny_model(str(tmp_path / "src"), "qwen3_moe")
    folder = _fp8_checkpoint(src, tmp_path / "ckpt", "fp8", "block", (32, 32))
    outs = []
    for kw in (dict(tensor_parallel_size=2, enable_expert_parallel=True), {}):
        llm = LLM(str(folder), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64,
                  max_num_batched_tokens=16, **kw)
        try:
            outs.append([o.token_ids for o in llm.generate(PROMPTS, GREEDY)])
            experts, _ = _first_experts(llm)
            assert experts.block == (32, 32) and experts.w13_scale.shape[0] == experts.w13.shape[0]
        finally:
            llm.engine.core.shutdown()
    assert outs[0] == outs[1]


def test_block_weights_shard_on_block_boundaries():
    w = torch.randn(256, 384)
    q, s = _quantize(w, "block", (128, 128))
    bw = Fp8BlockWeight(q, s, (128, 128))
    top, right = slice_out_features(bw, 128, 256), slice_in_features(bw, 128, 384)
    torch.testing.assert_close(top.dequantize(), bw.dequantize()[:, 128:256], rtol=0, atol=0)
    torch.testing.assert_close(right.dequantize(), bw.dequantize()[128:384], rtol=0, atol=0)
    with pytest.raises(ValueError, match="output features in groups of 128"):
        slice_out_features(bw, 0, 64)
    with pytest.raises(ValueError, match="input features in groups of 128"):
        slice_in_features(bw, 64, 384)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the FP8 kernels need a CUDA GPU of compute capability 8.9 or newer")
@pytest.mark.parametrize("arch,strategy", [("llama", "channel"), ("llama", "block"), ("qwen3_moe", "block")])
def test_fp8_checkpoints_on_the_gpu_track_their_float_twin(tiny_llama, tmp_path, arch, strategy):
    """The triton backend's kernels (block_fp8_gemm for blocks, the fused MoE kernel on block-scaled
    experts, CUDA graphs on) against the float twin served in bfloat16 (an MoE model only
    loosely: FP8 activations in attention can flip a router's choice)."""
    src = tiny_llama if arch == "llama" else build_tiny_model(str(tmp_path / "src"), arch)
    folder = _fp8_checkpoint(src, tmp_path / "ckpt", "compressed-tensors", strategy, (32, 32))
    kw = dict(device="cuda", dtype="bfloat16", backend="triton", num_kv_blocks=64, enable_prefix_caching=False)
    llm, twin = LLM(str(folder), **kw), LLM(str(folder / "float"), **kw)
    assert llm.engine.quantization.name == "fp8"
    got, ref = _first_logits(llm, PROMPTS[2]), _first_logits(twin, PROMPTS[2])
    assert torch.corrcoef(torch.stack([got, ref]))[0, 1] > (0.99 if arch == "llama" else 0.95)
    outs = llm.generate(PROMPTS, GREEDY)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)

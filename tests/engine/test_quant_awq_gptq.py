"""AWQ / GPTQ checkpoint tensors → Int4Weight: packing round trips, the packing orders on
hand-made words, act-order permutations, v1 vs v2 zeros, real safetensors files, configs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmesh.engine.errors import UnsupportedModelError
from llmesh.engine.quant.awq_gptq import (
    awq_to_weight,
    gptq_to_weight,
    pack_awq,
    pack_gptq,
    parse_quant_config,
    storage_group_size,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
AWQ = parse_quant_config({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                          "version": "GEMM"})


def _gptq_cfg(group_size: int, fmt: str = "gptq", desc_act: bool = False):
    return parse_quant_config({"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": False,
                               "desc_act": desc_act, "checkpoint_format": fmt})


def _codes(k: int, n: int, groups: int, seed: int, zero_lo: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(zero_lo, 16, (groups, n), generator=gen)
    s = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    return q, z, s


def _fp16_ulp(v: torch.Tensor) -> torch.Tensor:
    """One float16 ulp at |v| (float32 result; subnormal spacing near zero)."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-14)))
    return torch.exp2(e - 10)


def _assert_dequant(w, q, z, s, g_idx):
    """w.dequantize() == (q - z[g]) * s[g] within one float16 ulp of |z * s| (mins rounding)."""
    zk, sk = z[g_idx].float(), s[g_idx].float()                           # [K, N]
    expected = (q.float() - zk) * sk
    got = w.dequantize().cpu()
    assert got.shape == expected.shape
    assert bool(((got - expected).abs() <= _fp16_ulp(zk * sk) + 1e-7).all())


def test_awq_word_order():
    """Columns 0..7 with codes 0..7 pack to 0x75316420: value i holds column [0,2,4,6,1,3,5,7][i]."""
    q = torch.arange(8)[None].expand(32, 8)
    packed = pack_awq(q, torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8))
    assert packed["qweight"].dtype == torch.int32 and int(packed["qweight"][0, 0]) == 0x75316420
    w = awq_to_weight(packed["qweight"], packed["qzeros"], packed["scales"], replace(AWQ, group_size=32))
    assert torch.equal(w.dequantize()[0], torch.arange(8.0))


def test_gptq_word_order():
    """Rows 0..7 with codes 0..7 pack to 0x76543210 (value i = row 8r + i); qzeros likewise along N,
    and v1 stores zero - 1."""
    q = torch.arange(8)[:, None].expand(8, 8)
    zeros = torch.arange(1, 9)[None] % 16                                 # [1, 8]: 1..8
    v2 = pack_gptq(q, zeros, torch.ones(1, 8), group_size=8, checkpoint_format="gptq_v2")
    v1 = pack_gptq(q, zeros, torch.ones(1, 8), group_size=8, checkpoint_format="gptq")
    assert int(v2["qweight"][0, 0]) == 0x76543210
    assert int(v2["qzeros"][0, 0]) == 0x87654321 - 2**32                  # sign bit set: int32 wraps
    assert int(v1["qzeros"][0, 0]) == 0x76543210
    w = gptq_to_weight(v1["qweight"], v1["qzeros"], v1["scales"], v1["g_idx"], _gptq_cfg(8))
    assert torch.equal(w.dequantize()[:, 0], torch.arange(8.0) - 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,n,group", [(64, 16, 32), (256, 40, 128), (96, 8, 32), (128, 24, -1)])
def test_awq_round_trip(device, k, n, group):
    g = k if group == -1 else group
    q, z, s = _codes(k, n, k // g, seed=k + n)
    t = {name: v.to(device) for name, v in pack_awq(q, z, s).items()}
    assert t["qweight"].shape == (k, n // 8) and t["qzeros"].shape == (k // g, n // 8)
    w = awq_to_weight(t["qweight"], t["qzeros"], t["scales"], replace(AWQ, group_size=group))
    assert w.format == "awq" and w.perm is None and w.in_features == k and w.out_features == n
    assert w.qweight.device.type == device
    _assert_dequant(w, q, z, s, torch.arange(k) // g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("k,n,group", [(64, 16, 32), (256, 40, 128), (160, 8, 64), (128, 24, -1)])
def test_gptq_round_trip(device, fmt, k, n, group):
    g = k if group == -1 else group
    groups = -(-k // g)
    q, z, s = _codes(k, n, groups, seed=k * n, zero_lo=1 if fmt == "gptq" else 0)
    t = {name: v.to(device) for name, v in pack_gptq(q, z, s, group, checkpoint_format=fmt).items()}
    assert t["qweight"].shape == (k // 8, n) and t["qzeros"].shape == (groups, n // 8)
    w = gptq_to_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], _gptq_cfg(group, fmt))
    assert w.format == "gptq" and w.perm is None and w.in_features == k
    _assert_dequant(w, q, z, s, torch.arange(k) // g)


def test_gptq_v1_and_v2_zeros():
    """The same zeros stored both ways read back equal; v1 tensors read as v2 are off by one zero."""
    q, z, s = _codes(64, 16, 2, seed=7, zero_lo=1)
    v1 = pack_gptq(q, z, s, 32, checkpoint_format="gptq")
    v2 = pack_gptq(q, z, s, 32, checkpoint_format="gptq_v2")
    assert torch.equal(v1["qweight"], v2["qweight"]) and not torch.equal(v1["qzeros"], v2["qzeros"])
    a = gptq_to_weight(v1["qweight"], v1["qzeros"], v1["scales"], None, _gptq_cfg(32, "gptq")).dequantize()
    b = gptq_to_weight(v2["qweight"], v2["qzeros"], v2["scales"], None, _gptq_cfg(32, "gptq_v2")).dequantize()
    wrong = gptq_to_weight(v1["qweight"], v1["qzeros"], v1["scales"], None, _gptq_cfg(32, "gptq_v2"))
    assert torch.equal(a, b)
    # off by exactly one scale, up to the float16 rounding of both mins (|z*s| < 0.35: ulp 2^-12)
    torch.testing.assert_close(wrong.dequantize() - a, s.float().repeat_interleave(32, 0),
                               rtol=0, atol=2.0**-11)
    with pytest.raises(ValueError, match="zeros"):
        pack_gptq(q, torch.zeros_like(z), s, 32, checkpoint_format="gptq")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,group", [(128, 32), (96, 64)])
def test_gptq_act_order(device, k, group):
    """desc_act: g_idx assigns channels to groups in a permuted order. Rows are sorted by group,
    perm makes dequantize() return x's order, and x[:, perm] @ sorted rows == x @ W."""
    n = 16
    groups = -(-k // group)
    gen = torch.Generator().manual_seed(k)
    order = torch.randperm(k, generator=gen)                             # quantization order
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[order] = torch.arange(k) // group
    q, z, s = _codes(k, n, groups, seed=k + 1, zero_lo=1)
    t = {name: v.to(device) for name, v in pack_gptq(q, z, s, group, g_idx=g_idx).items()}
    cfg = _gptq_cfg(group, desc_act=True)
    w = gptq_to_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg)
    assert w.perm is not None and w.perm.dtype == torch.int64 and w.perm.device.type == device
    assert torch.equal(t["g_idx"][w.perm].cpu().long(), torch.arange(k) // group)
    _assert_dequant(w, q, z, s, g_idx)
    x = torch.randn(3, k, generator=gen)
    sorted_rows = replace(w, perm=None).dequantize().cpu()
    torch.testing.assert_close(x[:, w.perm.cpu()] @ sorted_rows, x @ w.dequantize().cpu(),
                               rtol=1e-5, atol=1e-5)


def test_gptq_act_order_with_trivial_g_idx_has_no_perm():
    q, z, s = _codes(64, 8, 2, seed=3, zero_lo=1)
    t = pack_gptq(q, z, s, 32)
    w = gptq_to_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], _gptq_cfg(32, desc_act=True))
    assert w.perm is None


def test_gptq_g_idx_with_uneven_groups_is_rejected():
    q, z, s = _codes(64, 8, 2, seed=4, zero_lo=1)
    g_idx = torch.zeros(64, dtype=torch.long)
    g_idx[:8] = 1                                                         # 56 + 8 channels, not 32 + 32
    t = pack_gptq(q, z, s, 32, g_idx=g_idx)
    with pytest.raises(UnsupportedModelError, match="g_idx"):
        gptq_to_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], _gptq_cfg(32, desc_act=True))


def test_per_channel_storage_group():
    """group_size -1 is stored with a small group and repeated scales, so K is not padded."""
    assert storage_group_size(4096, 4096) == 128 and storage_group_size(4096, 128) == 128
    assert storage_group_size(96, 96) == 16 and storage_group_size(40, 40) == 40
    q, z, s = _codes(128, 8, 1, seed=5, zero_lo=1)
    t = pack_gptq(q, z, s, -1)
    w = gptq_to_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], _gptq_cfg(-1))
    assert w.group_size == 64 and w.padded_in_features == 128 and w.qweight.shape == (64, 8)


def test_mismatched_tensors_are_rejected():
    q, z, s = _codes(64, 16, 2, seed=6)
    t = pack_awq(q, z, s)
    with pytest.raises(UnsupportedModelError, match="qzeros"):
        awq_to_weight(t["qweight"], t["qzeros"][:1], t["scales"], AWQ)
    g = pack_gptq(q, z.clamp_min(1), s, 32)
    with pytest.raises(UnsupportedModelError, match="scales"):
        gptq_to_weight(g["qweight"], g["qzeros"], g["scales"][:, :8], None, _gptq_cfg(32))


def test_safetensors_checkpoint(tmp_path):
    """A tiny real checkpoint: names, dtypes and shapes as AutoAWQ / AutoGPTQ write them."""
    k, n, group = 64, 32, 32
    q, z, s = _codes(k, n, k // group, seed=11, zero_lo=1)
    prefix = "model.layers.0.self_attn.q_proj"
    for method, tensors, cfg_dict in [
        ("awq", pack_awq(q, z, s), {"quant_method": "awq", "bits": 4, "group_size": group,
                                    "zero_point": True, "version": "gemm"}),
        ("gptq", pack_gptq(q, z, s, group), {"quant_method": "gptq", "bits": 4, "group_size": group,
                                             "desc_act": False, "sym": False}),
    ]:
        folder = tmp_path / method
        folder.mkdir()
        save_file({f"{prefix}.{name}": v for name, v in tensors.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"quantization_config": cfg_dict}))
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            names = list(f.keys())
            loaded = {name.rsplit(".", 1)[1]: f.get_tensor(name) for name in names}
        cfg = parse_quant_config(json.loads((folder / "config.json").read_text())["quantization_config"])
        assert loaded["qweight"].dtype == loaded["qzeros"].dtype == torch.int32
        assert loaded["scales"].dtype == torch.float16 and loaded["scales"].shape == (k // group, n)
        assert loaded["qzeros"].shape == (k // group, n // 8)
        if method == "awq":
            assert set(loaded) == {"qweight", "qzeros", "scales"} and loaded["qweight"].shape == (k, n // 8)
            w = awq_to_weight(loaded["qweight"], loaded["qzeros"], loaded["scales"], cfg)
        else:
            assert loaded["qweight"].shape == (k // 8, n) and loaded["g_idx"].dtype == torch.int32
            assert cfg.zero_offset == 1
            w = gptq_to_weight(loaded["qweight"], loaded["qzeros"], loaded["scales"], loaded["g_idx"], cfg)
        _assert_dequant(w, q, z, s, torch.arange(k) // group)


def test_parse_configs():
    awq = parse_quant_config({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True,
                              "version": "gemm", "modules_to_not_convert": ["visual"]})
    assert (awq.method, awq.group_size, awq.zero_offset) == ("awq", 64, 0)
    assert awq.modules_to_not_convert == ("visual",)
    gptq = parse_quant_config({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True})
    assert (gptq.checkpoint_format, gptq.sym, gptq.desc_act, gptq.zero_offset) == ("gptq", True, True, 1)
    assert gptq.group_for(512) == 512
    v2 = parse_quant_config({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"})
    assert v2.zero_offset == 0 and v2.group_size == 128


@pytest.mark.parametrize("cfg,pattern", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits=8"),
    ({"quant_method": "awq", "bits": 3}, "bits=3"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "gemv"),
    ({"quant_method": "awq", "bits": 4, "version": "marlin"}, "marlin"),
    ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "marlin"),
    ({"quant_method": "gptq", "bits": 4, "is_marlin_format": True}, "marlin"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "awq, gptq"),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {"-:.*mlp.*": {}}}, "dynamic"),
])
def test_unsupported_configs(cfg, pattern):
    with pytest.raises(UnsupportedModelError, match=pattern):
        parse_quant_config(cfg)

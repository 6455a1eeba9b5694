"""W4A8 through the fragment-order kernel's W4A8 instance (llmesh/kernels/w4a8_mma.py).

On the CPU: the premise of the widening (float16 holds every product of a 4-bit code and an E4M3
scale up to 60, and 1032 times the scale) over every code and scale; the layouts round-trip; the
torch model of the kernel, from its layouts, equals linear.w4a8_matmul_ref (FBGEMM's arithmetic);
NVRTC compiles the instance for sm_90 with no local memory and the conversions and float16 MMAs
it is written for. On a GPU: the kernel against the reference for rows 1-40, K padded, split K,
register and bulk-copy loads, in a CUDA graph, and the measured table's ``w4a8`` entries
dispatching to it with its copy made before FBGEMM's in-place shuffle."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine.quant.linear import w4a8_matmul_ref
from llmesh.engine.quant.packed import W4A8Weight
from llmesh.engine.quant.quantize import quantize_w4a8
from llmesh.kernels.fp8_gemm import quantize_fp8_per_token_ref
from llmesh.kernels.w4a8_mma import (INT_ROUND_MAX_SCALE, MAX_GROUP_SCALE, OFFSET, emulate, int_rounding_exact,
                                     kernel_k, pack_w4a8_codes, pack_w4a8_scales, round_f16_bits, scales_fit, w4a8_mma)
from llmesh.kernels.w4a16_mma import MmaConfig, config_str, parse_config, plan_launch, unpack_codes, unpack_scales
from tests.kernels.nvrtc_check import compiled_report, global_loads, machine_code


def e4m3_values() -> torch.Tensor:
    """Every finite non-negative E4M3 value, as float32."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN
    return codes.view(torch.float8_e4m3fn).float()


def random_w4a8(k: int, n: int, gen: torch.Generator) -> W4A8Weight:
    return quantize_w4a8(torch.randn(n, k, generator=gen) * 0.02)


def layout(w: W4A8Weight):
    kp = kernel_k(w.in_features, w.group_size)
    return pack_w4a8_codes(w.codes(), kp), pack_w4a8_scales(w.group_scales, w.group_size, kp)


def test_float16_holds_every_widened_product_and_offset():
    """(1024 + u) g - 1032 g = q g is computed by one float16 FMA: exact only if float16 holds
    q g and 1032 g; so for every E4M3 scale up to MAX_GROUP_SCALE and every code, it does."""
    g = e4m3_values()
    g = g[g <= MAX_GROUP_SCALE]
    assert g.numel() > 100
    q = torch.arange(-8, 8, dtype=torch.float32)[:, None]
    assert torch.equal((q * g).half().float(), q * g)
    assert torch.equal((-OFFSET * g).half().float(), -OFFSET * g)
    # and one past the bound is not: the reason for it
    assert (OFFSET * 64.0) > torch.finfo(torch.float16).max


def test_the_integer_rounding_is_e4m3s_for_every_product_of_a_scale_up_to_56():
    """round 1 rounds the float16 product's bits instead of converting: for every code and every
    E4M3 scale (subnormals too) up to INT_ROUND_MAX_SCALE it gives E4M3's value (saturated as the
    conversion saturates); past it, products leave E4M3's range and it does not."""
    g = e4m3_values()
    q = torch.arange(-8, 8, dtype=torch.float32)[:, None]
    inside = g <= INT_ROUND_MAX_SCALE
    p = q * g[inside]
    torch.testing.assert_close(round_f16_bits(p), p.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float(),
                               rtol=0, atol=0)
    past = q * g[~inside & (g <= MAX_GROUP_SCALE)]
    assert not torch.equal(round_f16_bits(past), past.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float())
    assert int_rounding_exact(torch.tensor([0.0, 2.0 ** -9, 56.0])) and not int_rounding_exact(torch.tensor([60.0]))


def test_codes_and_scales_round_trip_through_the_layouts():
    gen = torch.Generator().manual_seed(0)
    w = random_w4a8(200, 128, gen)  # K 200: the weight pads to 256, the kernel's K to 256 (two groups)
    codes, scales = layout(w)
    kp = kernel_k(200, 128)
    u = unpack_codes(codes)
    assert u.shape == (kp, 128)
    want = torch.full((kp, 128), 8, dtype=torch.uint8)
    want[: w.padded_in_features] = (w.codes().t().to(torch.int16) + 8).to(torch.uint8)
    assert torch.equal(u, want)
    g, c = unpack_scales(scales)
    assert torch.equal(g.float()[: w.group_scales.shape[0]], w.group_scales.float())
    assert torch.equal(c.float(), -OFFSET * g.float())


@pytest.mark.parametrize("m,k,n,round_", [(1, 256, 128, 0), (3, 200, 192, 1), (16, 640, 64, 0), (9, 384, 128, 1)])
def test_the_kernels_arithmetic_matches_the_reference(m, k, n, round_):
    gen = torch.Generator().manual_seed(m + k + n)
    w = random_w4a8(k, n, gen)
    rows = quantize_fp8_per_token_ref(torch.randn(m, k, generator=gen).to(torch.bfloat16))
    codes, scales = layout(w)
    got = emulate(rows.xq, rows.scale, codes, scales, w.scales, w.group_size, round_)
    want = w4a8_matmul_ref(rows, w, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_scales_past_the_bound_are_not_laid_out():
    from llmesh.engine.quant import mma_weights

    gen = torch.Generator().manual_seed(1)
    w = random_w4a8(256, 128, gen)
    assert scales_fit(w.group_scales) and mma_weights.w4a8_can_lay_out(w)
    big = W4A8Weight(w.qweight, torch.full_like(w.group_scales, 64.0), w.scales, w.group_size, w.in_features)
    assert not scales_fit(big.group_scales) and not mma_weights.w4a8_can_lay_out(big)
    odd = random_w4a8(256, 96, gen)  # N not a multiple of 64
    assert not mma_weights.w4a8_can_lay_out(odd)


def test_the_launch_plan_names_the_w4a8_instance():
    plan = plan_launch(MmaConfig(1, 8, 4, 1), 1, 4096, 4096, 128, w4a8=True)
    assert plan.name == "w4a16_mma<1, 8, 4, 8, 0, 1, 1, 0, 0, 1>"
    assert plan_launch(MmaConfig(1, 8, 4, 1), 1, 4096, 4096, 128).name == "w4a16_mma<1, 8, 4, 8, 0, 1>"
    with pytest.raises(ValueError, match="W4A8"):
        plan_launch(MmaConfig(1, 8, 4, 1, 0, 0, 2), 1, 4096, 4096, 128, w4a8=True)
    with pytest.raises(ValueError, match="W4A8"):
        plan_launch(MmaConfig(1, 8, 4, 1), 1, 4096, 4096, 128, planes=2, w4a8=True)
    integer = MmaConfig(1, 8, 4, 1, round=1)
    assert plan_launch(integer, 1, 4096, 4096, 128, w4a8=True).name == "w4a16_mma<1, 8, 4, 8, 0, 1, 1, 0, 0, 2>"
    assert config_str(integer) == "1,8,4,1,0,0,0,1" and parse_config("1,8,4,1,0,0,0,1") == integer
    with pytest.raises(ValueError, match="round"):
        plan_launch(integer, 1, 4096, 4096, 128)


def test_nvrtc_compiles_the_w4a8_instance_for_hopper_without_local_memory(tmp_path):
    # registers, one and two n8 tiles, loads to registers and bulk copies, at 256 threads
    # and the same with the products rounded by integer operations (W4A8 = 2: no conversion back)
    for name, regs in (("w4a16_mma<1, 8, 4, 8, 0, 1, 1, 0, 0, 1>", 112), ("w4a16_mma<1, 8, 2, 8, 4, 1, 1, 0, 0, 1>", 112),
                       ("w4a16_mma<2, 4, 4, 8, 0, 2, 1, 0, 0, 1>", 168), ("w4a16_mma<2, 4, 2, 8, 8, 2, 1, 0, 0, 1>", 168),
                       ("w4a16_mma<1, 8, 4, 8, 0, 1, 1, 0, 0, 2>", 112), ("w4a16_mma<2, 4, 2, 8, 8, 2, 1, 0, 0, 2>", 168)):
        cubin, lowered, report = compiled_report("w4a16_mma.cu", name, tmp_path)
        assert lowered.startswith("_Z9w4a16_mma") and len(cubin) > 10_000
        assert report["LOCAL"] == 0 and report["STACK"] == 0, (name, report)
        assert report["REG"] <= regs, (name, report)
        listing = machine_code(cubin, tmp_path)
        # per 16-byte load of codes (32 weights): 16 paired FMAs, then 16 roundings to E4M3 and back
        # (W4A8 = 1) or integer operations only (W4A8 = 2; x's codes are still widened by conversion)
        assert ("F2FP.SATFINITE.E4M3.F16" in listing) == name.endswith(" 1>") and "HFMA2" in listing, name
        assert "HMMA.16816.F32 " in listing and "HMMA.16816.F32.BF16" not in listing, name  # float16 MMAs
        # x (E4M3 bytes, 8 at a time) and its row scales come by coherent loads: the kernel before
        # wrote them (cuda/common.cuh); the read-only path keeps to the weights and their scales
        # (two 16-byte loads a group, the first group's before the loop and each next one's a group ahead)
        loads = global_loads(listing)
        assert loads.get("LDG.E.64", 0) >= 1, (name, loads)
        assert loads.get("LDG.E.128.CONSTANT", 0) <= 4 and "LDG.E.64.CONSTANT" not in loads, (name, loads)


def _gpu_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("a CUDA kernel: needs a GPU")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the paired E4M3 conversions need sm_89 or newer")


@pytest.mark.parametrize("m,n,k,config", [
    (1, 128, 256, None),
    (3, 192, 200, MmaConfig(1, 2, 2, 1)),          # K pads to 256; x zero past K
    (8, 192, 1024, MmaConfig(1, 4, 8, 1)),         # a full n8 tile; eight steps in registers
    (5, 128, 1024, MmaConfig(2, 2, 1, 2)),         # one step ahead; split K
    (9, 192, 512, MmaConfig(1, 4, 4, 1)),          # two n8 tiles, the second one row
    (16, 256, 1280, MmaConfig(2, 2, 4, 2)),        # split K, the second split shorter
    (40, 64, 1024, MmaConfig(1, 8, 2, 1)),         # three row tiles
    (13, 192, 768, MmaConfig(1, 4, 2, 1, 4, 8)),   # bulk copies, two tiles of 8 rows
    (1, 128, 1024, MmaConfig(1, 4, 2, 1, 4)),      # bulk copies of 4 steps, two slots
    (1, 128, 1024, MmaConfig(1, 4, 4, 2, round=1)),         # products rounded by integer operations
    (13, 192, 768, MmaConfig(1, 4, 2, 1, 4, 8, round=1)),   # the same, bulk copies, two tiles of 8 rows
])
def test_kernel_matches_reference_on_gpu(m, n, k, config):
    _gpu_or_skip()
    if config is not None and config.bulk and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bulk copies need Hopper")
    gen = torch.Generator().manual_seed(m * 100 + n + k)
    w = random_w4a8(k, n, gen)
    rows = quantize_fp8_per_token_ref(torch.randn(m, k, generator=gen).to(torch.bfloat16))
    want = w4a8_matmul_ref(rows, w, torch.float32)
    codes, scales = (t.cuda() for t in layout(w))
    xq, xs, rs = rows.xq.cuda(), rows.scale.cuda(), w.scales.cuda()
    for _ in range(2):  # the second call finds the split counters reset by the first
        got = w4a8_mma(xq, xs, codes, scales, rs, w.group_size, config=config)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        torch.testing.assert_close(got.cpu().float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w4a8_mma(xq, xs, codes, scales, rs, w.group_size, out=out, config=config)
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out.cpu().float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_a_long_sum_of_one_sign_keeps_its_small_terms_on_gpu():
    """x equal to a row of w (every product positive, K = 4096): FBGEMM's FP8 tensor cores lost
    20% on that output on the H200 (docs/quantization.md); float32 sums lose nothing visible."""
    _gpu_or_skip()
    gen = torch.Generator().manual_seed(5)
    w = random_w4a8(4096, 128, gen)
    x = w.dequantize().t()[:1].to(torch.bfloat16)  # [1, K]: row 0 of W
    rows = quantize_fp8_per_token_ref(x)
    want = w4a8_matmul_ref(rows, w, torch.float32)
    codes, scales = (t.cuda() for t in layout(w))
    got = w4a8_mma(rows.xq.cuda(), rows.scale.cuda(), codes, scales, w.scales.cuda(), w.group_size).cpu().float()
    assert abs(got[0, 0] - want[0, 0]) <= 0.01 * abs(want[0, 0])


def test_the_measured_table_dispatches_to_it_before_fbgemm_shuffles(monkeypatch):
    """A ``w4a8`` entry ["mma", [config]] makes the weight's copy at load, before FBGEMM's
    in-place shuffle (whose codes it could no longer read), and sends the decode rows to the
    kernel; rows past the table keep FBGEMM's kernel (or the reference where it is not installed)."""
    _gpu_or_skip()
    from llmesh.engine.quant import linear as linear_mod
    from llmesh.engine.quant import mma_weights
    from llmesh.kernels import quant_gemm_config
    from llmesh.kernels.common import cuda_device_tag

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    w = random_w4a8(256, 128, gen).map_tensors(lambda t: t.to(device))
    table = {cuda_device_tag(device): {quant_gemm_config.table_key("w4a8", 128, 256, 16): ["mma", ["1,4,4,2"]]}}
    monkeypatch.setattr(quant_gemm_config, "load_tuned", lambda *a: table)
    copy = 128 * 256 // 2 + 2 * 128 * 2 * 2  # codes, then g and -1032 g as float16 for 2 groups
    assert linear_mod.prepare_library_weights([w], device, torch.bfloat16) == copy
    assert mma_weights.copy_bytes(w) == copy
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    rows = quantize_fp8_per_token_ref(x)
    cpu_w = random_w4a8(256, 128, torch.Generator().manual_seed(3))  # the same weight, never shuffled
    want = w4a8_matmul_ref(rows, cpu_w, torch.float32)
    from llmesh.kernels.fp8_gemm import Fp8Rows

    got = linear_mod.w4a8_matmul(Fp8Rows(rows.xq.to(device), rows.scale.to(device)), w, torch.bfloat16)
    torch.testing.assert_close(got.cpu().float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    assert quant_gemm_config.tuned_choice(device, "w4a8", 17, 128, 256) is None  # past the table
    # the integer rounding where the scales allow it, the conversions where one is past 56
    rows_d = Fp8Rows(rows.xq.to(device), rows.scale.to(device))
    got = mma_weights.w4a8_mma_matmul(rows_d, w, "1,4,4,2,0,0,0,1")
    torch.testing.assert_close(got.cpu().float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    wide_cpu = W4A8Weight(cpu_w.qweight, cpu_w.group_scales.float().clone().index_fill_(1, torch.tensor([0]), 60.0)
                          .to(torch.float8_e4m3fn), cpu_w.scales, cpu_w.group_size, cpu_w.in_features)
    wide = wide_cpu.map_tensors(lambda t: t.to(device))
    mma_weights.w4a8_layout(wide)
    assert not mma_weights.cached_layout(wide).int_round
    got = mma_weights.w4a8_mma_matmul(rows_d, wide, "1,4,4,2,0,0,0,1")
    want = w4a8_matmul_ref(rows, wide_cpu, torch.float32)
    torch.testing.assert_close(got.cpu().float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    big = quantize_fp8_per_token_ref(torch.randn(17, 256, generator=gen).to(torch.bfloat16))
    got = linear_mod.w4a8_matmul(Fp8Rows(big.xq.to(device), big.scale.to(device)), w, torch.bfloat16)
    want = w4a8_matmul_ref(big, cpu_w, torch.float32)
    torch.testing.assert_close(got.cpu().float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())

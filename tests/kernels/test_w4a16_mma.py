"""The CUDA C++ W4A16 kernel with codes in mma.sync's fragment order (llmesh/kernels/w4a16_mma.py).

On the CPU: the layouts hold the fragment rules of PTX's m16n8k16 operands (checked element by
element against the rules as PTX states them, not against the packer's own index tables), the
torch model of the kernel's arithmetic matches the reference, and NVRTC (where installed)
compiles the source for sm_90 with no local memory. On a GPU: the kernel against the reference
for rows 1-40 (tiles of 8 and 16 rows), K padded, groups 32-128, K split across blocks (twice
on the same counters), register and bulk-copy loads, in a CUDA graph."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmesh.kernels.quant_ref import w4a16_gemm_ref, w8a16_gemm_ref
from llmesh.kernels.w4a16_mma import (MmaConfig, config_str, default_config, emulate, int8_group, int8_scales,
                                      pack_codes, pack_codes_int8, pack_scales, parse_config, plan_launch, smem_bytes,
                                      split_steps, unpack_codes, unpack_scales, w4a16_mma)
from tests.kernels.nvrtc_check import compiled_report, global_loads, machine_code


def int8_weight(k: int, n: int, group: int, gen: torch.Generator):
    """A random Int8Weight: codes -128..127 (the full range: both nibbles of u = q + 128 vary),
    scales 0.0005-0.0025 per group of ``group`` rows (group = K: per channel)."""
    from llmesh.engine.quant.packed import Int8Weight

    q = torch.randint(-128, 128, (k, n), generator=gen).to(torch.int8)
    scales = (torch.rand(-(-k // group), n, generator=gen) * 0.002 + 0.0005).half()
    return Int8Weight(q, scales, group_size=group, format="int8" if group == k else "q8_0")


def int8_layout(w):
    g = int8_group(w.group_size, w.in_features)
    kp = -(-w.in_features // (2 * g)) * 2 * g
    return pack_codes_int8(w.qweight, kp), int8_scales(w.scales, w.group_size, w.in_features, kp), g


def layout_and_reference(k: int, n: int, g: int, gen: torch.Generator, int8: bool, int4_weight):
    """A random INT8 or INT4 weight [K, N] in groups of g: (codes, scales, the kernel's group, the
    reference x @ W as a function of x)."""
    if int8:
        w = int8_weight(k, n, g, gen)
        return (*int8_layout(w), lambda x: w8a16_gemm_ref(x.float(), w.qweight, w.scales.float(), g))
    w = int4_weight(k, n, g, gen)
    return (pack_codes(w.codes()), pack_scales(w.scales, w.mins), g,
            lambda x: w4a16_gemm_ref(x.float(), w.qweight, w.scales, w.mins, g))


def test_codes_follow_the_mma_b_fragment_rule():
    # PTX ISA, mma.m16n8k16 with .bf16: lane l holds B[k][n] for n = l / 4 (groupID) and, in
    # register b0, k = 2 (l % 4) + {0, 1}; in b1 the same rows + 8; the lower k in the low half.
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (64, 128), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (2, 4, 32, 4) and packed.dtype == torch.int32
    for strip, step, lane, word in itertools.product(range(2), range(4), range(32), range(4)):
        v = int(packed[strip, step, lane, word]) & 0xFFFFFFFF
        g, t = lane // 4, lane % 4
        for r in range(4):  # the kernel's widen(v >> 4r): bits 0-3 and 16-19 after the shift
            reg, col_group = r % 2, 2 * word + r // 2
            col = 64 * strip + 8 * col_group + g
            for half in range(2):
                k = 16 * step + 2 * t + 8 * reg + half
                assert (v >> (4 * r + 16 * half)) & 0xF == codes[k, col]
    assert torch.equal(unpack_codes(packed), codes)


def test_codes_are_the_a_fragment_of_the_swapped_mma():
    # The kernel uses a word as the A operand (rows = 16 output columns, 16 K): PTX's A fragment
    # gives lane l = 4g + t a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
    # a3 = A[g+8][2t+8, 2t+9]; the kernel passes {widen(w), widen(w >> 8), widen(w >> 4),
    # widen(w >> 12)} for MMA q = word w, A row r = column 16w + r of the strip.
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (32, 64), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes)
    for step, lane, word in itertools.product(range(2), range(32), range(4)):
        v = int(packed[0, step, lane, word]) & 0xFFFFFFFF
        g, t = lane // 4, lane % 4
        for reg, shift in enumerate((0, 8, 4, 12)):
            row = g + 8 * (reg % 2)
            kk = 2 * t + 8 * (reg // 2)
            for half in range(2):
                assert (v >> (shift + 16 * half)) & 0xF == codes[16 * step + kk + half, 16 * word + row]


def test_scales_are_the_c_fragment_rows_of_each_lane():
    # C fragment of the swapped MMA: lane l = 4g + t holds rows g and g + 8 (output columns
    # 16q + g and 16q + 8 + g of MMA q); the two 16-byte loads of lane g read, per q, the
    # scale pair then the min pair of those columns
    gen = torch.Generator().manual_seed(2)
    s = torch.rand(3, 128, generator=gen).half()
    m = torch.rand(3, 128, generator=gen).half()
    packed = pack_scales(s, m)
    assert packed.shape == (2, 3, 8, 4, 2, 2)
    for strip, grp, g, q in itertools.product(range(2), range(3), range(8), range(4)):
        cols = [64 * strip + 16 * q + g, 64 * strip + 16 * q + 8 + g]
        assert torch.equal(packed[strip, grp, g, q, 0], s[grp, cols])
        assert torch.equal(packed[strip, grp, g, q, 1], m[grp, cols])
    us, um = unpack_scales(packed)
    assert torch.equal(us, s) and torch.equal(um, m)


@pytest.mark.parametrize("m,n,k,g", [(1, 128, 256, 64), (5, 192, 200, 32), (16, 64, 512, 128)])
def test_the_kernels_arithmetic_matches_the_reference(m, n, k, g, int4_weight):
    """x . (128 + q) per group, folded by s and m - 128 s in float32 (emulate), is x @ W."""
    gen = torch.Generator().manual_seed(m + n + k + g)
    w = int4_weight(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    got = emulate(x, pack_codes(w.codes()), pack_scales(w.scales, w.mins), g)
    ref = w4a16_gemm_ref(x.float(), w.qweight, w.scales, w.mins, g)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_int8_codes_are_two_nibble_planes_of_the_4bit_layout():
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-128, 128, (40, 128), generator=gen).to(torch.int8)
    packed = pack_codes_int8(q, 64)
    assert packed.shape == (2, 4, 2, 32, 4)
    u = 16 * unpack_codes(packed[:, :, 0]).int() + unpack_codes(packed[:, :, 1]).int()
    assert torch.equal(u[:40], q.int() + 128) and torch.equal(u[40:], torch.full((24, 128), 128, dtype=torch.int32))
    # the high plane widened with 0x4500 | hi is bf16 2048 + 16 hi exactly, the low one 128 + lo
    hi = torch.arange(16, dtype=torch.int32)
    as_bf16 = ((0x4500 | hi) << 16).view(torch.float32)
    assert torch.equal(as_bf16, 2048.0 + 16.0 * hi.float())
    assert torch.equal(((0x4300 | hi) << 16).view(torch.float32), 128.0 + hi.float())


@pytest.mark.parametrize("m,n,k,g", [(1, 128, 256, 256), (3, 64, 200, 200), (9, 192, 512, 32)])
def test_the_int8_arithmetic_matches_the_reference(m, n, k, g):
    """x . (u + 2176) per group, folded by s and -128 s - 2176 s, is x @ (q s): per channel
    (group = K, repeated every 128 rows) and per 32 rows (q8_0), K padded."""
    gen = torch.Generator().manual_seed(m + n + k + g)
    w = int8_weight(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    codes, scales, group = int8_layout(w)
    assert group == (128 if g >= k else g)
    got = emulate(x, codes, scales, group)
    ref = w8a16_gemm_ref(x.float(), w.qweight, w.scales.float(), g)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_which_weights_the_kernel_takes():
    """Int4 and int8 weights with N a multiple of 64; an int8 weight only where float16 holds its
    scales exactly (the kernel reads them as float16): not one with subnormal scales."""
    from llmesh.engine.quant import mma_weights

    gen = torch.Generator().manual_seed(5)
    assert mma_weights.can_lay_out(int8_weight(256, 128, 256, gen))
    assert mma_weights.can_lay_out(int8_weight(256, 128, 32, gen))          # q8_0 groups
    assert not mma_weights.can_lay_out(int8_weight(256, 96, 256, gen))      # N not a multiple of 64
    tiny = int8_weight(256, 128, 256, gen)
    tiny.scales = tiny.scales.float() * 1e-3                                 # under float16's normal range
    assert not mma_weights.can_lay_out(tiny)


def test_configs_plan_whole_groups_and_fit_shared_memory():
    cfg = MmaConfig(1, 8, 8, 3)
    assert parse_config(config_str(cfg)) == cfg and config_str(cfg) == "1,8,8,3"
    assert parse_config("1,8,4,1,4") == MmaConfig(1, 8, 4, 1, 4)
    assert parse_config("1,8,4,1,0,8") == MmaConfig(1, 8, 4, 1, 0, 8)
    assert config_str(MmaConfig(1, 8, 4, 1, 0, 8)) == "1,8,4,1,0,8"
    with pytest.raises(ValueError, match="rows"):
        parse_config("1,8,4,1,0,4")
    assert config_str(parse_config("1,8,2,1,0,0,1")) == "1,8,2,1,0,0,1"
    with pytest.raises(ValueError, match="xload"):
        parse_config("1,8,2,1,4,0,1")  # not with bulk copies
    assert parse_config("2,8,2,1,4,0,2") == MmaConfig(2, 8, 2, 1, 4, 0, 2)  # x a group ahead: any weight path
    with pytest.raises(ValueError, match="xload"):
        parse_config("1,8,2,1,0,0,3")
    with pytest.raises(ValueError, match="bulk"):
        parse_config("1,8,4,1,3")
    with pytest.raises(ValueError, match="four to eight integers"):
        parse_config("1,8")
    with pytest.raises(ValueError, match="stages"):
        parse_config("1,8,3,1")  # steps held in registers: 1, 2, 4 or 8
    with pytest.raises(ValueError, match="stages"):
        parse_config("1,8,1,1,4")  # a ring of one slot
    per, splits = split_steps(MmaConfig(1, 8, 8, 3), 4096, 128)  # 256 steps, units of 64
    assert (per, splits) == (128, 2)
    per, splits = split_steps(MmaConfig(1, 4, 8, 3), 4096, 128)  # units of 32: 8 units → 3 + 3 + 2
    assert per == 96 and splits == 3
    d = default_config(1, 14336, 4096, 128)
    assert d.split == 1  # 224 strips already fill the GPU twice over with one split
    assert default_config(1, 4096, 14336, 128).split > 1
    assert default_config(1, 4096, 4096, 32).stages == 2  # divides the group's two steps
    # the block's sums reuse the ring and x tile: the reserve covers them
    assert smem_bytes(MmaConfig(2, 8, 2, 1), 16, 32) >= 8 * 2 * 16 * 64 * 4
    assert smem_bytes(MmaConfig(1, 4, 2, 1, 4), 8, 32, 8) >= 2 * 128 * 16 * 4 + 8 * 32 * 16 * 2 + 8 * 4 * 4


def test_the_launch_plan_names_the_instance_and_covers_the_output():
    plan = plan_launch(MmaConfig(2, 4, 4, 4, 8), 20, 64 * 151, 4096, 128)
    assert plan.name == "w4a16_mma<2, 4, 4, 8, 8, 2>" and plan.threads == 256
    assert plan.grid == (152, 4, 1) and plan.split_steps == 64  # 151 strips in blocks of 2, x 2 row tiles
    assert plan.smem == smem_bytes(MmaConfig(2, 4, 4, 4, 8), 16, 64, 8)
    decode = plan_launch(MmaConfig(1, 8, 4, 1), 8, 4096, 4096, 128)  # up to 8 rows: one n8 tile
    assert decode.name == "w4a16_mma<1, 8, 4, 8, 0, 1>" and decode.grid == (64, 1, 1)
    assert plan_launch(MmaConfig(1, 8, 4, 1), 9, 4096, 4096, 128).name.endswith(", 2>")
    eights = plan_launch(MmaConfig(1, 8, 4, 1, 0, 8), 16, 4096, 4096, 128)  # 16 rows in two tiles of 8
    assert eights.name.endswith(", 1>") and eights.grid == (128, 1, 1)
    xload = plan_launch(MmaConfig(1, 8, 2, 1, 0, 0, 1), 3, 4096, 4096, 128)  # x from global: no x tile
    assert xload.name == "w4a16_mma<1, 8, 2, 8, 0, 1, 1, 1>" and xload.smem == 8 * 3 * 68 * 4
    with pytest.raises(ValueError, match="tiles of 8"):
        plan_launch(MmaConfig(1, 8, 2, 1, 0, 0, 1), 12, 4096, 4096, 128)
    pipe = plan_launch(MmaConfig(2, 8, 4, 1, 0, 0, 2), 16, 4096, 4096, 128)  # x staged a group ahead: the tile
    assert pipe.name == "w4a16_mma<2, 8, 4, 8, 0, 2, 1, 2>"
    assert pipe.smem == smem_bytes(MmaConfig(2, 8, 4, 1), 16, 256, 8)
    with pytest.raises(ValueError, match="fused activation"):
        plan_launch(MmaConfig(2, 8, 4, 1, 0, 0, 2), 16, 4096, 4096, 128, act=1)
    act = plan_launch(MmaConfig(1, 8, 4, 1), 1, 4096, 4096, 128, act=1)  # silu(gate) * up as x: the defaults named
    assert act.name == "w4a16_mma<1, 8, 4, 8, 0, 1, 1, 0, 1>"
    assert plan_launch(MmaConfig(1, 8, 4, 1, 0, 0, 1), 1, 4096, 4096, 128, 2, 1).name.endswith(", 2, 1, 1>")
    int8 = plan_launch(MmaConfig(1, 8, 2, 1, 4), 1, 4096, 4096, 128, planes=2)  # 8-bit codes: twice the ring
    assert int8.name == "w4a16_mma<1, 8, 2, 8, 4, 1, 2>"
    assert int8.smem == smem_bytes(MmaConfig(1, 8, 2, 1, 4), 1, 256, 8, 2) >= 2 * 256 * 16 * 4 * 2


def test_nvrtc_compiles_the_kernel_for_hopper_without_local_memory(tmp_path):
    # (instance, registers at most; x staged a group ahead fits the same, 8-bit codes at 256 threads
    # more): one n8 tile holds half the accumulators of two, so three
    # 256-thread blocks fit an SM; two tiles still fit two
    for name, regs in (("w4a16_mma<1, 8, 4, 8, 0, 1>", 96), ("w4a16_mma<2, 8, 2, 8, 4, 1>", 96),
                       ("w4a16_mma<1, 8, 2, 8, 0, 2>", 128), ("w4a16_mma<2, 8, 2, 8, 4, 2>", 128),
                       ("w4a16_mma<1, 8, 2, 8, 8, 1, 2>", 96), ("w4a16_mma<1, 8, 4, 8, 0, 1, 2>", 128),
                       ("w4a16_mma<1, 8, 2, 8, 0, 1, 1, 1>", 104), ("w4a16_mma<2, 8, 4, 8, 0, 2, 1, 2>", 128),
                       ("w4a16_mma<2, 8, 2, 8, 4, 2, 1, 2>", 128), ("w4a16_mma<2, 4, 4, 8, 0, 2, 2, 2>", 176),
                       # RMSNorm made as x is read (ACT 2, test_w4a16_mma_norm.py): staged with bulk
                       # copies, loaded with the codes (4- then 8-bit codes), two n8 tiles
                       ("w4a16_mma<1, 8, 2, 8, 8, 1, 1, 0, 2>", 96), ("w4a16_mma<4, 4, 4, 8, 0, 1, 1, 1, 2>", 128),
                       ("w4a16_mma<1, 8, 4, 8, 0, 1, 2, 1, 2>", 176), ("w4a16_mma<2, 8, 2, 8, 4, 2, 1, 0, 2>", 128)):
        cubin, lowered, report = compiled_report("w4a16_mma.cu", name, tmp_path)
        assert lowered.startswith("_Z9w4a16_mma") and len(cubin) > 10_000
        assert report["LOCAL"] == 0 and report["STACK"] == 0, (name, report)
        assert report["REG"] <= regs, (name, report)
        # x and the residual, which the kernel before wrote, come by coherent loads (cuda/common.cuh,
        # ld_act); the read-only path keeps L1 for the two 16-byte scale loads and, with RMSNorm, the
        # norm weight (one more 16-byte load staged, two 4-byte ones a fragment against x's and the
        # residual's four where it is loaded with the codes)
        loads = global_loads(machine_code(cubin, tmp_path))
        norm = name.count(",") >= 8 and name.rstrip(">").rsplit(", ", 1)[1] == "2"
        assert loads.get("LDG.E.128.CONSTANT", 0) <= (3 if norm else 2), (name, loads)
        assert loads.get("LDG.E.CONSTANT", 0) <= (loads.get("LDG.E", 0) // 2 if norm else 0), (name, loads)


@pytest.mark.parametrize("m,n,k,g,config", [
    (1, 128, 256, 64, None),
    (3, 192, 200, 32, MmaConfig(1, 2, 2, 1)),      # K pads to Kp = 256; x zero past K
    (8, 192, 1024, 128, MmaConfig(1, 4, 8, 1)),    # a full n8 tile; eight steps in registers
    (5, 128, 512, 128, MmaConfig(2, 2, 1, 2)),     # one step ahead; split K
    (9, 192, 512, 64, MmaConfig(1, 4, 4, 1)),      # two n8 tiles, the second one row
    (16, 256, 640, 64, MmaConfig(2, 2, 4, 2)),     # split K, the second split shorter
    (17, 192, 256, 64, MmaConfig(2, 4, 4, 2)),     # two row tiles; a block with a missing strip
    (40, 64, 1024, 128, MmaConfig(1, 8, 2, 1)),    # three row tiles; two stages
    (20, 128, 512, 64, MmaConfig(2, 2, 2, 2, 0, 8)),  # three tiles of 8 rows, split K
    (13, 192, 640, 64, MmaConfig(1, 4, 2, 1, 4, 8)),  # bulk, two tiles of 8 rows (the second 5)
    (1, 128, 1024, 128, MmaConfig(1, 4, 2, 1, 4)),  # bulk copies of 4 steps, two slots
    (7, 192, 640, 64, MmaConfig(2, 2, 2, 2, 4)),    # bulk, one n8 tile, split K (a shorter split)
    (16, 256, 640, 64, MmaConfig(2, 2, 4, 2, 2)),   # bulk copies with split K (a shorter split)
    (3, 192, 200, 32, MmaConfig(1, 2, 3, 1, 2)),    # bulk copies, K padded, three slots
    (1, 128, 1024, 128, MmaConfig(1, 4, 2, 1, 0, 0, 1)),  # x from global memory (xload)
    (6, 192, 200, 32, MmaConfig(2, 2, 1, 2, 0, 8, 1)),    # xload, K padded, split K, one step ahead
    (13, 128, 512, 64, MmaConfig(1, 4, 4, 1, 0, 8, 1)),   # xload in two tiles of 8 rows
    (16, 256, 1024, 128, MmaConfig(2, 4, 4, 1, 0, 0, 2)),  # x a group ahead (xload 2), two n8 tiles
    (11, 192, 640, 64, MmaConfig(2, 2, 2, 2, 4, 0, 2)),    # xload 2, bulk, split K (a shorter split), 11 rows
    (3, 192, 200, 32, MmaConfig(1, 2, 2, 1, 0, 0, 2)),     # xload 2, K padded (zeros copied past K)
    (40, 64, 1024, 128, MmaConfig(1, 8, 2, 1, 0, 8, 2)),   # xload 2 in five tiles of 8 rows
])
def test_kernel_matches_reference_on_gpu(m, n, k, g, config, int4_weight):
    if not torch.cuda.is_available():
        pytest.skip("a CUDA kernel: needs a GPU")
    if config is not None and config.bulk and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bulk copies need Hopper")
    gen = torch.Generator().manual_seed(m * 100 + n + k + g)
    w = int4_weight(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    ref = w4a16_gemm_ref(x.float(), w.qweight, w.scales, w.mins, g)
    codes, scales, xd = pack_codes(w.codes()).cuda(), pack_scales(w.scales, w.mins).cuda(), x.cuda()
    for _ in range(2):  # the second call finds the split counters reset by the first
        got = w4a16_mma(xd, codes, scales, g, config=config)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        torch.testing.assert_close(got.cpu().float(), ref, rtol=1e-2, atol=1e-2)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w4a16_mma(xd, codes, scales, g, out=out, config=config)
    out.zero_()
    graph.replay()
    graph.replay()
    torch.testing.assert_close(out.cpu().float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m,n,k,g,config", [
    (1, 128, 1024, 1024, MmaConfig(1, 4, 4, 1)),       # per channel: groups of 128, registers
    (5, 192, 640, 640, MmaConfig(2, 2, 2, 2, 4)),      # per channel, K padded to 768, bulk, split K
    (16, 256, 512, 32, MmaConfig(2, 2, 2, 1)),         # q8_0 (groups of 32), two n8 tiles
    (20, 64, 1024, 1024, MmaConfig(1, 8, 2, 1, 8, 8)),  # three tiles of 8 rows, bulk of 8 steps
    (16, 128, 1024, 128, MmaConfig(2, 4, 2, 1, 0, 0, 2)),  # x a group ahead (xload 2)
])
def test_int8_planes_match_the_reference_on_gpu(m, n, k, g, config):
    if not torch.cuda.is_available():
        pytest.skip("a CUDA kernel: needs a GPU")
    if config.bulk and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bulk copies need Hopper")
    gen = torch.Generator().manual_seed(m * 100 + n + k + g)
    w = int8_weight(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    ref = w8a16_gemm_ref(x.float(), w.qweight, w.scales.float(), g)
    codes, scales, group = int8_layout(w)
    for _ in range(2):
        got = w4a16_mma(x.cuda(), codes.cuda(), scales.cuda(), group, config=config)
        torch.testing.assert_close(got.cpu().float(), ref, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("m,n,k,g,config,int8", [
    (1, 128, 1024, 128, MmaConfig(1, 4, 4, 1, 0, 0, 1), False),  # xload: up's fragments carried with gate's
    (3, 192, 200, 32, MmaConfig(1, 2, 2, 2, 0, 0, 1), False),    # xload, K padded, split K
    (5, 128, 512, 64, MmaConfig(2, 2, 2, 1), False),              # x staged as silu(gate) * up
    (13, 192, 640, 64, MmaConfig(1, 4, 2, 2), False),             # two n8 tiles, split K
    (8, 128, 1024, 128, MmaConfig(1, 4, 2, 1, 4), False),         # bulk copies
    (2, 128, 1024, 1024, MmaConfig(1, 4, 4, 1, 0, 0, 1), True),   # 8-bit codes, per channel
])
def test_silu_mul_is_made_as_x_is_read_on_gpu(m, n, k, g, config, int8, int4_weight):
    """act="silu_mul": gate_up [M, 2K] in, (silu(gate) * up) @ W out, equal (to the GEMM's
    tolerance) to silu_and_mul then the plain kernel, and to the reference."""
    if not torch.cuda.is_available():
        pytest.skip("a CUDA kernel: needs a GPU")
    if config.bulk and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bulk copies need Hopper")
    from llmesh.kernels.activation import silu_and_mul, silu_and_mul_ref

    gen = torch.Generator().manual_seed(m * 100 + n + k + g)
    gate_up = (2 * torch.randn(m, 2 * k, generator=gen)).to(torch.bfloat16)
    codes, scales, group, reference = layout_and_reference(k, n, g, gen, int8, int4_weight)
    ref = reference(silu_and_mul_ref(gate_up))
    codes, scales, gu = codes.cuda(), scales.cuda(), gate_up.cuda()
    for _ in range(2):  # the second call finds the split counters reset by the first
        got = w4a16_mma(gu, codes, scales, group, config=config, act="silu_mul")
        assert got.shape == (m, n)
        torch.testing.assert_close(got.cpu().float(), ref, rtol=1e-2, atol=2e-2)
    unfused = w4a16_mma(silu_and_mul(gu), codes, scales, group, config=config)
    torch.testing.assert_close(got, unfused, rtol=1e-2, atol=1e-2)


def test_programmatic_dependent_launch_reads_x_after_its_producer(int4_weight):
    """Launched with PDL, the kernel's blocks start while the previous kernel drains and copy
    weights before they wait: x written by a PDL producer the step before (SiLU-and-mul, as in
    a down projection) must still be read after it is written, and a PDL kernel after ours
    must read our output; in a CUDA graph replayed with new inputs."""
    if not torch.cuda.is_available():
        pytest.skip("a CUDA kernel: needs a GPU")
    from llmesh.kernels.activation import silu_and_mul
    from llmesh.kernels.common import pdl_launch

    if not pdl_launch(torch.device("cuda"))["PDL"]:
        pytest.skip("programmatic dependent launch needs Hopper (and LLMESH_PDL unset or 1)")
    m, n, k, g = 4, 4096, 2048, 128
    gen = torch.Generator().manual_seed(11)
    w = int4_weight(k, n, g, gen)
    codes, scales = pack_codes(w.codes()).cuda(), pack_scales(w.scales, w.mins).cuda()
    gate_up = torch.empty(m, 2 * k, dtype=torch.bfloat16, device="cuda")
    h = torch.empty(m, k, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    z = torch.empty(m, n // 2, dtype=torch.bfloat16, device="cuda")
    for config in (MmaConfig(1, 8, 4, 2, 4), MmaConfig(2, 4, 4, 1)):  # bulk + split K; register loads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            silu_and_mul(gate_up, out=h)
            w4a16_mma(h, codes, scales, g, out=y, config=config, pdl=True)
            silu_and_mul(y, out=z)
        for step in range(3):
            gate_up.copy_(torch.randn(m, 2 * k, generator=gen).to(torch.bfloat16))
            graph.replay()
            hx = silu_and_mul(gate_up).cpu()  # the producer's own output, computed alone
            ref = w4a16_gemm_ref(hx.float(), w.qweight, w.scales, w.mins, g)
            torch.testing.assert_close(y.cpu().float(), ref, rtol=1e-2, atol=1e-2, msg=f"{config} step {step}")
            torch.testing.assert_close(z.cpu(), silu_and_mul(y).cpu(), rtol=0, atol=0)


def test_bad_arguments_are_named(int4_weight):
    gen = torch.Generator().manual_seed(0)
    w = int4_weight(128, 64, 64, gen)
    codes, scales = pack_codes(w.codes()), pack_scales(w.scales, w.mins)
    with pytest.raises(ValueError, match="CUDA kernel"):
        w4a16_mma(torch.randn(1, 128).to(torch.bfloat16), codes, scales, 64)
    with pytest.raises(ValueError, match="act must be one of"):
        w4a16_mma(torch.randn(1, 256).to(torch.bfloat16), codes, scales, 64, act="gelu")
    with pytest.raises(ValueError, match="N of 64"):
        pack_codes(torch.zeros(32, 48, dtype=torch.uint8))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="K=200"):
            w4a16_mma(torch.randn(1, 200, device="cuda").to(torch.bfloat16), codes.cuda(), scales.cuda(), 64)
        with pytest.raises(ValueError, match="bf16"):
            w4a16_mma(torch.randn(1, 128, device="cuda").half(), codes.cuda(), scales.cuda(), 64)
        with pytest.raises(ValueError, match="even"):
            w4a16_mma(torch.randn(1, 255, device="cuda").to(torch.bfloat16), codes.cuda(), scales.cuda(), 64,
                      act="silu_mul")


def test_the_measured_table_dispatches_to_it(monkeypatch, int4_weight):
    """A table entry ["mma", [config]] sends the weight's decode rows to this kernel, with its
    layout made once (and counted) by prepare_library_weights; rows past the table's largest
    measured M keep the default path."""
    if not torch.cuda.is_available():
        pytest.skip("the measured table dispatches on CUDA only")
    from llmesh.engine.quant import linear as linear_mod
    from llmesh.engine.quant import mma_weights
    from llmesh.kernels import quant_gemm_config
    from llmesh.kernels.common import cuda_device_tag

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    w = int4_weight(256, 128, 128, gen).to(device)
    table = {cuda_device_tag(device): {quant_gemm_config.table_key("w4a16", 128, 256, 16): ["mma", ["1,4,4,2"]]}}
    monkeypatch.setattr(quant_gemm_config, "load_tuned", lambda *a: table)
    codes_bytes, scale_bytes = 128 * 256 // 2, 2 * 128 * 256 // 128 * 2
    assert linear_mod.prepare_library_weights([w], device, torch.bfloat16) == codes_bytes + scale_bytes
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    got = linear_mod._tuned_matmul(x.to(device), w)
    ref = w4a16_gemm_ref(x.float(), w.qweight.cpu(), w.scales.cpu(), w.mins.cpu(), 128)
    torch.testing.assert_close(got.cpu().float(), ref, rtol=1e-2, atol=1e-2)
    assert mma_weights.copy_bytes(w) == codes_bytes + scale_bytes
    assert linear_mod._tuned_matmul(torch.randn(17, 256, device=device, dtype=torch.bfloat16), w) is None

    w8 = int8_weight(256, 128, 256, gen).to(device)  # per channel
    table = {cuda_device_tag(device): {quant_gemm_config.table_key("w8a16", 128, 256, 16): ["mma", ["1,4,4,2"]]}}
    monkeypatch.setattr(quant_gemm_config, "load_tuned", lambda *a: table)
    assert linear_mod.prepare_library_weights([w8], device, torch.bfloat16) == 128 * 256 + 2 * 128 * 2 * 2
    got = linear_mod._tuned_matmul(x.to(device), w8)
    ref = w8a16_gemm_ref(x.float(), w8.qweight.cpu(), w8.scales.cpu().float(), 256)
    torch.testing.assert_close(got.cpu().float(), ref, rtol=1e-2, atol=2e-2)


def test_the_down_projection_takes_the_activation_where_the_table_picks_it(monkeypatch, int4_weight):
    """The Triton backend's act_linear sends gate_up straight to the kernel (act="silu_mul")
    where the table's "+silu_mul" entry for the down projection at these rows is "mma"; elsewhere
    (an "unfused" entry, rows past the table, LLMESH_FUSED_DECODE=0) silu_and_mul runs first.
    Both give the same rows."""
    if not torch.cuda.is_available():
        pytest.skip("the measured table dispatches on CUDA only")
    from llmesh.engine.model.config import ModelConfig
    from llmesh.engine.model.ops_triton import TritonOps
    from llmesh.engine.quant import linear as linear_mod
    from llmesh.kernels import quant_gemm_config
    from llmesh.kernels.activation import silu_and_mul
    from llmesh.kernels.common import cuda_device_tag

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(5)
    w = int4_weight(512, 256, 128, gen).to(device)
    gate_up = torch.randn(3, 1024, generator=gen).to(torch.bfloat16).to(device)
    act = "w4a16" + quant_gemm_config.SILU_MUL
    table = {quant_gemm_config.table_key("w4a16", 256, 512, 4): ["mma", ["1,4,2,1,0,0,1"]],
             quant_gemm_config.table_key(act, 256, 512, 4): ["mma", ["1,4,2,1,0,0,1"]],
             quant_gemm_config.table_key(act, 256, 512, 16): ["unfused", []]}
    monkeypatch.setattr(quant_gemm_config, "load_tuned", lambda *a: {cuda_device_tag(device): table})
    calls = []
    real = linear_mod.silu_mul_matmul
    monkeypatch.setattr("llmesh.engine.model.ops_triton.silu_mul_matmul",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    cfg = ModelConfig("llama", vocab_size=32, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
    ops = TritonOps(cfg, device=device, max_positions=64)
    fused = ops.act_linear(gate_up, w)
    unfused = linear_mod.linear(silu_and_mul(gate_up), w)
    assert linear_mod.silu_mul_matmul(gate_up, w) is not None and calls == [gate_up.shape]
    torch.testing.assert_close(fused, unfused, rtol=1e-2, atol=1e-2)
    assert linear_mod.silu_mul_matmul(torch.cat([gate_up] * 3), w) is None  # 9 rows: the M = 16 entry, unfused
    assert linear_mod.silu_mul_matmul(torch.cat([gate_up] * 6), w) is None  # 18 rows: past the table
    monkeypatch.setattr(ops, "fused_decode", False)  # LLMESH_FUSED_DECODE=0: the two ops
    calls.clear()
    torch.testing.assert_close(ops.act_linear(gate_up, w), unfused, rtol=0, atol=0)
    assert calls == []

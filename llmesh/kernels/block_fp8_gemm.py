"""Block-scaled FP8 (E4M3) linear layer: the scheme of Qwen3-*-FP8 and DeepSeek-V3 checkpoints.

The weight qweight [N, K] carries one float32 scale per BN x BK block (128 x 128 in every
checkpoint that ships one); activations are quantized at run time per token and BK-channel
group (`quantize_fp8_per_group`), so every BK-wide slice of the product has exactly one
activation scale per row and one weight scale per BN columns:

    xs[m, g] = max(absmax(x[m, g*BK:(g+1)*BK]), eps) / 448     xq = e4m3(x / xs)
    y[m, n] = sum_g (xq[m, g-slice] . qweight[n, g-slice]) * xs[m, g] * ws[n // BN, g]

The GEMM (`_block_fp8_gemm_kernel`, the design of DeepSeek's and vLLM's Triton
`w8a8_block_fp8_matmul`) walks K one group at a time: each group's FP8 tl.dot starts from zero
and is scaled into the float32 accumulator, which also bounds the tensor cores' reduced-precision
FP8 accumulation to BK products. Finer activation scales than fp8_gemm's per-token ones keep
an outlier channel from costing its whole row precision.

Tiles by M: `BLOCK_FP8_TILE`, filled from bench/block_fp8_gpu.py's sweep on a device, else
`default_block_config`. The same sweep times cuBLASLt's block-scaled GEMM (`block_fp8_scaled_mm_rows`)
and FBGEMM's CUTLASS one on the same rows; `BLOCK_FP8_LIBRARY` records, per M bucket, which was
fastest, and the engine's linear (engine/quant/linear.block_fp8_matmul) runs that one. This GEMM
stays the reference for both and runs every shape they do not take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (
    FLOAT_DTYPES, check_last_dim_contiguous, check_out, check_size, check_tensor, interpreting, measured_bucket,
    next_power_of_2)
from llmesh.kernels.fp8_gemm import (
    FP8_DTYPE, FP8_MAX, SCALE_EPS, SCALE_EPS_JIT, Fp8Rows, check_fp8_runnable, fp8_quantize, fp8_scale_of)
from llmesh.kernels.triton_helpers import cast_rtne, grouped_tile


@dataclass(frozen=True)
class BlockFp8Config:
    """Launch parameters of the block-scaled GEMM (BLOCK_K is the weight's BK: one group a step)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def default_block_config(m: int) -> BlockFp8Config:
    """Narrow row tiles for decode batches (weight-bound), square ones past them."""
    if m <= 16:
        return BlockFp8Config(16, 64, num_warps=4, num_stages=4)
    if m <= 64:
        return BlockFp8Config(64, 64, num_warps=4, num_stages=4)
    return BlockFp8Config(128, 128, num_warps=8, num_stages=3)


BLOCK_FP8_TILE: dict[str, dict[int, BlockFp8Config]] = {}
"""Per device tag: {largest M of a bucket: the tile bench/block_fp8_gpu.py measured fastest there,
over the Llama-3-8B shapes} (default_block_config on devices without an entry)."""
BLOCK_FP8_TILE["h100"] = {
    1: BlockFp8Config(block_m=16, block_n=64, num_warps=4, num_stages=6, group_m=8),
    16: BlockFp8Config(block_m=16, block_n=32, num_warps=4, num_stages=6, group_m=8),
    64: BlockFp8Config(block_m=64, block_n=128, num_warps=4, num_stages=3, group_m=8),
    128: BlockFp8Config(block_m=64, block_n=128, num_warps=4, num_stages=3, group_m=8),
    256: BlockFp8Config(block_m=64, block_n=128, num_warps=4, num_stages=3, group_m=8),
    512: BlockFp8Config(block_m=64, block_n=128, num_warps=4, num_stages=4, group_m=8),
    2048: BlockFp8Config(block_m=64, block_n=128, num_warps=4, num_stages=4, group_m=8),
}
BLOCK_FP8_TILE["h200"] = {  # bench/results/block_fp8_h200.json
    1: BlockFp8Config(16, 64, num_warps=4, num_stages=6), 16: BlockFp8Config(16, 64, num_warps=4, num_stages=6),
    64: BlockFp8Config(64, 64, num_warps=4, num_stages=4), 128: BlockFp8Config(64, 64, num_warps=4, num_stages=4),
    256: BlockFp8Config(64, 128, num_warps=4, num_stages=3), 512: BlockFp8Config(64, 128, num_warps=4, num_stages=3),
    2048: BlockFp8Config(64, 128, num_warps=4, num_stages=3)}


BLOCK_FP8_LIBRARY: dict[str, dict[int, str]] = {}
"""Per device tag: {largest M of a bucket: which GEMM runs a 128 x 128-block layer there}: ours
("triton"), cuBLASLt's block-scaled GEMM ("scaled_mm", block_fp8_scaled_mm_rows) or FBGEMM's
CUTLASS groupwise GEMM ("fbgemm", engine/quant/fbgemm_kernels.fp8_block_matmul), whichever
bench/block_fp8_gpu.py measured fastest over the Llama-3-8B shapes, each called as the engine calls
it. Ours runs where a device has no entry, the library cannot take the shape, or it is missing."""
BLOCK_FP8_LIBRARY["h100"] = {
    1: "fbgemm",
    16: "fbgemm",
    64: "scaled_mm",
    128: "scaled_mm",
    256: "scaled_mm",
    512: "scaled_mm",
    2048: "scaled_mm",
}


def block_config(device: torch.device, m: int) -> BlockFp8Config:
    """The tile for M rows on ``device``: the measured table's bucket, else default_block_config."""
    return measured_bucket(BLOCK_FP8_TILE, device, m) or default_block_config(m)


_HAS_BLOCK_SCALED_MM = hasattr(torch.nn.functional, "scaled_mm")
"""Whether this torch has the block-scaled GEMM (torch.nn.functional.scaled_mm); checked once, not per call."""


def block_library(device: torch.device, m: int) -> str:
    """Which GEMM BLOCK_FP8_LIBRARY picks for M rows on ``device`` ("triton" where unmeasured, and
    instead of cuBLASLt's where this torch lacks the block-scaled scaled_mm)."""
    library = measured_bucket(BLOCK_FP8_LIBRARY, device, m) or "triton"
    return "triton" if library == "scaled_mm" and not _HAS_BLOCK_SCALED_MM else library


LIBRARY_BLOCK = (128, 128)
"""The one block both libraries take (DeepSeek's recipe: activations per token and 128 channels)."""


def library_shape_ok(n: int, k: int, block: tuple[int, int]) -> bool:
    """Whether the libraries' block-scaled GEMMs take an [N, K] weight: 128 x 128 blocks, whole
    ones (no ragged edge), and K / 128 a multiple of 4 (cuBLASLt's weight scales are [K/128, N/128]
    with K/128 padded to 4)."""
    return tuple(block) == LIBRARY_BLOCK and n % 128 == 0 and k % 512 == 0


def group_scales(m: int, groups: int, device: torch.device) -> torch.Tensor:
    """An empty float32 [M, G] for per-(token, group) activation scales, M-major (strides (1, M)):
    the layout cuBLASLt's and FBGEMM's block-scaled GEMMs read, so every producer (this module's
    quantize_fp8_per_group, rmsnorm_fp8 and silu_and_mul_fp8 with a group) writes it and no call
    re-lays it; our GEMM reads either layout, and loads a step's M scales contiguously."""
    return torch.empty_strided((m, groups), (1, max(m, 1)), dtype=torch.float32, device=device)


def mn_major_scales(xs: torch.Tensor) -> torch.Tensor:
    """Activation scales [M, G] M-major (strides (1, M)), the layout both libraries read: as they
    are where a producer laid them so (group_scales), else re-laid."""
    m, groups = xs.shape
    if xs.stride(0) == 1 and (xs.stride(1) == m or groups == 1):
        return xs
    out = group_scales(m, groups, xs.device)
    return out.copy_(xs)


def block_fp8_scaled_mm_rows(rows: Fp8Rows, qweight: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
                             ) -> torch.Tensor:
    """cuBLASLt's block-scaled FP8 GEMM (torch.nn.functional.scaled_mm, BlockWise1x128 activations
    and BlockWise128x128 weights; Hopper, CUDA 12.9+) on per-group rows; the weight's scales
    [N/128, K/128] transposed are the [K/128, N/128] it reads. Same products as our GEMM; cuBLAS
    orders the sums its own way (not bit for bit)."""
    from torch.nn.functional import ScalingType, scaled_mm

    xq, xs = rows.xq, rows.scale
    m = xq.shape[0]
    pad = -m % CUBLAS_ROW_MULTIPLE
    if pad:  # zero rows with scale 1, their outputs dropped (bytes copied: cat lacks FP8 in some torch builds)
        padded = torch.empty(m + pad, xq.shape[1], dtype=torch.uint8, device=xq.device)
        padded[:m].copy_(xq.view(torch.uint8))
        padded[m:].zero_()
        xq = padded.view(xq.dtype)
        xs_padded = group_scales(m + pad, xs.shape[1], xs.device)  # laid M-major as the library reads them
        xs_padded[:m].copy_(xs)
        xs_padded[m:].fill_(1.0)
        xs = xs_padded
    out = scaled_mm(xq, qweight.t(), scale_a=mn_major_scales(xs),
                    scale_recipe_a=ScalingType.BlockWise1x128, scale_b=scales.t(),
                    scale_recipe_b=ScalingType.BlockWise128x128, output_dtype=out_dtype)
    return out[:m] if pad else out


CUBLAS_ROW_MULTIPLE = 8
"""Rows cuBLASLt's block-scaled GEMM is handed in multiples of: on the H100 (torch 2.11, CUDA 13) its
heuristic answered CUBLAS_STATUS_NOT_SUPPORTED for one row and ran 16 and 200, so fewer or ragged
rows are padded (tests/kernels/test_block_fp8_gemm.py holds 1, 3, 8, 16 and 200 rows to the reference)."""


_QUANT_BLOCK = 2048
"""Columns a quantize_fp8_per_group program takes (whole groups): a decode row of 4096 is two programs."""


def check_group(group: int, per_token: bool = True) -> None:
    """Channels per activation scale: a power of two >= 16 (or 0, per token, where allowed)."""
    if (group or not per_token) and (not isinstance(group, int) or group < 16 or group & (group - 1)):
        raise ValueError(f"group must be {'0 (per token) or ' if per_token else ''}a power of two >= 16, got {group}")


@triton.jit
def fp8_group_quantize(y, scale_ptr, n_groups, stride_g, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """float32 y [BLOCK], BLOCK // GROUP consecutive groups of a row: stores each group's scale
    (absmax / 448) at scale_ptr + g * stride_g for g < n_groups and returns the E4M3 codes [BLOCK];
    the arithmetic of quantize_fp8_per_group_ref (what the fused RMSNorm and SiLU-mul producers of
    block-scaled FP8 layers end with)."""
    y2 = tl.reshape(y, [BLOCK // GROUP, GROUP])
    amax = tl.maximum(tl.max(tl.abs(y2), axis=1), SCALE_EPS_JIT)
    g = tl.arange(0, BLOCK // GROUP)
    tl.store(scale_ptr + g * stride_g, tl.math.div_rn(amax, 448.0), mask=g < n_groups)
    scaled = tl.reshape(y2 * tl.math.div_rn(448.0, amax)[:, None], [BLOCK])
    return fp8_quantize(scaled, 1.0, INTERPRET)  # times 1: exact, so rounded as the reference rounds


@triton.jit
def _quant_per_group_kernel(
    x_ptr, xq_ptr, scale_ptr, K, stride_x, stride_q, stride_s, stride_sg,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One row's BLOCK columns (BLOCK // GROUP groups) a program."""
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK
    c = c0 + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + c, mask=c < K, other=0.0).to(tl.float32)
    g0 = c0 // GROUP
    q = fp8_group_quantize(x, scale_ptr + row * stride_s + g0 * stride_sg, tl.cdiv(K, GROUP) - g0, stride_sg, BLOCK,
                           GROUP, INTERPRET)
    tl.store(xq_ptr + row * stride_q + c, q, mask=c < K)


def quantize_fp8_per_group(x: torch.Tensor, group: int) -> Fp8Rows:
    """x: [M, K] float → (xq float8_e4m3fn [M, K], scales float32 [M, ceil(K / group)], M-major as
    group_scales lays them), one scale per token and ``group`` channels: x ~ xq * scales repeated
    over each group."""
    check_tensor("x", x, "[M, K]", 2, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    check_group(group, per_token=False)
    m, k = x.shape
    check_fp8_runnable(x.device)
    xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = group_scales(m, triton.cdiv(k, group), x.device)
    if m and k:
        block = max(group, min(next_power_of_2(k), _QUANT_BLOCK))  # whole groups, up to a row a program
        _quant_per_group_kernel[(m, triton.cdiv(k, block))](
            x, xq, scale, k, x.stride(0), xq.stride(0), scale.stride(0), scale.stride(1),
            GROUP=group, BLOCK=block, INTERPRET=interpreting(), num_warps=max(1, min(8, block // 256)),
        )
    return Fp8Rows(xq, scale)


def quantize_fp8_per_group_ref(x: torch.Tensor, group: int) -> Fp8Rows:
    """The arithmetic of fp8_group_quantize in torch (same roundings, same bits)."""
    m, k = x.shape
    groups = -(-k // group)
    x32 = torch.zeros((m, groups * group), dtype=torch.float32, device=x.device)
    x32[:, :k] = x.to(torch.float32)
    x32 = x32.view(m, groups, group)
    amax = x32.abs().amax(dim=-1).clamp_min(SCALE_EPS)                  # [M, G]
    inv = torch.full_like(amax, FP8_MAX) / amax
    xq = (x32 * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, groups * group)[:, :k]
    return Fp8Rows(xq.contiguous(), fp8_scale_of(amax))


@triton.jit
def _block_fp8_gemm_kernel(
    xq_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_xs, stride_xsg, stride_ws, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BN: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge read row M-1 / N-1 (never stored), so the loads stay unmasked.
    rm_in = tl.minimum(rm, M - 1).to(tl.int64)
    rn_in = tl.minimum(rn, N - 1).to(tl.int64)
    a_ptrs = xq_ptr + rm_in[:, None] * stride_xm + rk[None, :]
    b_ptrs = w_ptr + rn_in[None, :] * stride_wn + rk[:, None]
    xs_ptrs = xs_ptr + rm_in * stride_xs          # [BLOCK_M] at group 0
    ws_ptrs = ws_ptr + (rn_in // BN) * stride_ws  # [BLOCK_N] at group 0 (one row of scales per BN columns)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # The scales are carried a step ahead: Triton pipelines the tile loads (cp.async) but not these
    # gathers, which a step would otherwise wait on before its scaling.
    xs = tl.load(xs_ptrs)
    ws = tl.load(ws_ptrs)
    last_group = tl.cdiv(K, BLOCK_K) - 1
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_in = k0 + rk < K
            a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_in[:, None], other=0.0)
        nxt = tl.minimum(k0 // BLOCK_K + 1, last_group)  # the last step reloads its own (unused)
        xs_next = tl.load(xs_ptrs + nxt * stride_xsg)
        ws_next = tl.load(ws_ptrs + nxt)
        acc += tl.dot(a, b) * (xs[:, None] * ws[None, :])
        xs, ws = xs_next, ws_next
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _check_weight(qweight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], device) -> None:
    check_tensor("qweight", qweight, "[N, K]", 2, (FP8_DTYPE,), device=device)
    check_tensor("scales", scales, "[N / BN, K / BK]", 2, (torch.float32,), device=device)
    bn, bk = block
    for name, b in (("BN", bn), ("BK", bk)):
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"block {name} must be a power of two >= 16, got {b!r}")
    n, k = qweight.shape
    check_size("scales", "rows", scales.shape[0], triton.cdiv(n, bn), f"one per {bn} rows of qweight")
    check_size("scales", "columns", scales.shape[1], triton.cdiv(k, bk), f"one per {bk} columns of qweight")
    check_last_dim_contiguous("qweight", qweight)
    check_last_dim_contiguous("scales", scales)


def block_fp8_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], *,
                   out: torch.Tensor | None = None, config: BlockFp8Config | None = None) -> torch.Tensor:
    """y = x @ W^T, W = qweight scaled per (BN, BK) block, x quantized per token and BK channels.
    x: [M, K] float; qweight float8_e4m3fn [N, K]; scales float32 [ceil(N/BN), ceil(K/BK)].
    Returns [M, N] in x.dtype (into ``out`` when given)."""
    check_tensor("x", x, "[M, K]", 2, FLOAT_DTYPES)
    _check_weight(qweight, scales, block, x.device)
    m, k = x.shape
    n = qweight.shape[0]
    check_size("qweight", "K", qweight.shape[1], k, "x's last dimension")
    out = check_out("out", out, (m, n), x.dtype, x.device)
    return block_fp8_gemm_rows(quantize_fp8_per_group(x, block[1]), qweight, scales, block, out=out, config=config)


def block_fp8_gemm_rows(rows: Fp8Rows, qweight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], *,
                        out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                        config: BlockFp8Config | None = None) -> torch.Tensor:
    """block_fp8_gemm on activations already quantized per group (quantize_fp8_per_group)."""
    xq, xs = rows
    m, k = xq.shape
    n = qweight.shape[0]
    bn, bk = block
    if out is None:
        if out_dtype not in FLOAT_DTYPES:
            raise ValueError(f"give out or a float out_dtype, got {out_dtype!r}")
        out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    check_size("activation scales", "groups", xs.shape[1], triton.cdiv(k, bk), f"one per {bk} channels")
    if m == 0 or n == 0:
        return out
    cfg = config or block_config(xq.device, m)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    _block_fp8_gemm_kernel[(tiles,)](
        xq, qweight, xs, scales, out, m, n, k,
        xq.stride(0), qweight.stride(0), xs.stride(0), xs.stride(1), scales.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, BN=bn, GROUP_M=cfg.group_m,
        EVEN_K=k % bk == 0, INTERPRET=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] float -> (qweight float8_e4m3fn [N, K], scales float32 [ceil(N/BN), ceil(K/BK)]), one
    absmax / 448 scale per block, as the checkpoints' writers make them (load-time; benchmarks and
    tests build their block weights with it)."""
    check_tensor("w", w, "[N, K]", 2, FLOAT_DTYPES)
    bn, bk = block
    n, k = w.shape
    nb, kb = triton.cdiv(n, bn), triton.cdiv(k, bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, bn, kb, bk)
    scales = fp8_scale_of(tiles.abs().amax(dim=(1, 3)).clamp_min(SCALE_EPS))           # [NB, KB]
    q = (tiles / scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), scales


def block_fp8_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]
                       ) -> torch.Tensor:
    """`block_fp8_gemm` in torch: quantize x per token and group, dequantize both sides to
    float32, one matmul (the kernel sums the same products group by group)."""
    bn, bk = block
    n, k = qweight.shape
    xq, xs = quantize_fp8_per_group_ref(x, bk)
    x32 = xq.to(torch.float32) * xs.repeat_interleave(bk, 1)[:, :k]
    w32 = qweight.to(torch.float32) * scales.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (x32 @ w32.t()).to(x.dtype)

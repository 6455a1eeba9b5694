"""The skinny dense GEMM (skinny_gemm.py) with the op before it fused into its prologue.

At batch 1 a decoder layer's RMSNorm and SiLU-and-mul are tiny kernels whose cost is a launch
gap plus a round trip of the activation through memory; their input is read anyway by every
GEMV program (x is re-read per output tile), so the program can compute them on the fly:

- `rmsnorm_linear`: y = rmsnorm(x + residual) @ W^T. Every program first walks the whole row
  (H = 4096 values, from L2: far fewer bytes than its weight slice) for the sum of squares,
  then streams its weight tile with the normalised row computed per K chunk. The programs of
  output tile 0 and split 0 also store x + residual, the next layer's residual: exactly one
  writer per row, no atomics, so the result is deterministic and the launch graph-capturable.
- `silu_mul_linear`: y = (silu(gate) * up) @ W^T, gate and up read from the fused gate_up
  projection's output, the activation never stored.

Rounding follows the unfused kernels step by step (llmesh/kernels/rmsnorm.py: x + residual, x * rstd
and the weight product each rounded to the activation dtype; llmesh/kernels/activation.py: silu then
the product rounded), and the GEMV loop is skinny_gemm's for the same config. So silu_mul_linear
equals silu_and_mul + skinny_gemm bit for bit; rmsnorm_linear sums the squares in chunks of the
row rather than in rmsnorm's one block, so its rstd may differ in the last float32 bit and a
normalised element may then round one bf16 ulp apart: within bf16 GEMM tolerance, not bit exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (check_last_dim_contiguous, check_out, check_size, check_tensor, interpreting,
                                   pdl_late, pdl_launch)
from llmesh.kernels.skinny_gemm import DTYPES, _program_tile, _store_tile
from llmesh.kernels.split_k import split_buffers
from llmesh.kernels.skinny_gemm_config import SkinnyConfig, check_config, default_config, split_plan
from llmesh.kernels.triton_helpers import cast_rtne, pdl_release, pdl_wait

SUMSQ_ELEMS = 4096
"""float32 elements of one sum-of-squares chunk [BLOCK_M, BLOCK_H] (32 registers a thread at 4 warps)."""

_MAX_HIDDEN = 65536


@triton.jit
def _load_x(ptrs, ok, MASK_K: tl.constexpr):
    # x-side operands are re-read by every program: keep them in L2 (evict_last)
    if MASK_K:
        return tl.load(ptrs, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return tl.load(ptrs, eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _prologue_tile(a_ptr, r_ptr, g_ptr, row_off, r_row_off, cols, ok, rstd, K,
                   NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK_K: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """The GEMV input x[rows, cols] as float32 holding activation-dtype values: [BM, BK].

    NORM: rmsnorm(a + r) (rstd: [BM, 1]); else silu(a[:, cols]) * a[:, K + cols]."""
    dtype = a_ptr.dtype.element_ty
    a = _load_x(a_ptr + row_off + cols[None, :], ok[None, :], MASK_K)
    if NORM:
        if HAS_RESIDUAL:
            r = _load_x(r_ptr + r_row_off + cols[None, :], ok[None, :], MASK_K)
            a = cast_rtne(a + r, dtype, INTERPRET).to(tl.float32)
        g = _load_x(g_ptr + cols, ok, MASK_K)
        normed = cast_rtne(a * rstd, dtype, INTERPRET).to(tl.float32)
        return cast_rtne(normed * g[None, :], dtype, INTERPRET).to(tl.float32)
    up = _load_x(a_ptr + row_off + K + cols[None, :], ok[None, :], MASK_K)
    act = cast_rtne(a * tl.sigmoid(a), dtype, INTERPRET).to(tl.float32)
    return cast_rtne(act * up, dtype, INTERPRET).to(tl.float32)


@triton.jit(do_not_specialize=["M", "NUM_M_BLOCKS"])
def _fused_skinny_kernel(
    a_ptr, r_ptr, g_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr, res_out_ptr,
    M, N, K, K_PER_SPLIT, NUM_M_BLOCKS,
    stride_am, stride_rm, stride_wn, stride_om, stride_rom, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr,
    PDL: tl.constexpr, LATE: tl.constexpr,
):
    pdl_wait(PDL, LATE)
    # Grid, tiles and loop as skinny_gemm's _skinny_kernel, so the accumulation order (and with
    # it every bit of y) is the same for the same config; only x's loads are replaced.
    pid_m, pid_n, pid_k, rm, rn, m_mask, n_mask, k_lo, k_hi = _program_tile(M, N, K, K_PER_SPLIT, NUM_M_BLOCKS,
                                                                             BLOCK_M, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows = (rm % M).to(tl.int64)  # rows past M re-read a valid row and are never stored
    row_off = rows[:, None] * stride_am  # [BM, 1]
    r_row_off = rows[:, None] * stride_rm

    rstd = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if NORM:
        # The whole row's sum of squares, by every program; one program per row block stores
        # x + residual while it has it.
        store_rows = m_mask & ((tl.zeros([BLOCK_M], dtype=tl.int32) + pid_n + pid_k) == 0)  # [BM]
        rh = tl.arange(0, BLOCK_H)
        sq = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for h0 in range(0, K, BLOCK_H):
            cols = h0 + rh
            ok = cols < K
            s = tl.load(a_ptr + row_off + cols[None, :], mask=ok[None, :], other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_ptr + r_row_off + cols[None, :], mask=ok[None, :], other=0.0,
                            eviction_policy="evict_last").to(tl.float32)
                s = cast_rtne(s + r, a_ptr.dtype.element_ty, INTERPRET)
                tl.store(res_out_ptr + rm.to(tl.int64)[:, None] * stride_rom + cols[None, :], s,
                         mask=store_rows[:, None] & ok[None, :])
                s = s.to(tl.float32)
            sq += s * s
        rstd = tl.rsqrt(tl.sum(sq, axis=1) / K + eps)[:, None]  # [BM, 1]

    w_ptrs = w_ptr + (rn % N).to(tl.int64)[:, None] * stride_wn + (k_lo + rk)[None, :]  # [BN, BK]
    if DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + rk
        k_ok = cols < K
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        x = _prologue_tile(a_ptr, r_ptr, g_ptr, row_off, r_row_off, cols, k_ok, rstd, K,
                           NORM, HAS_RESIDUAL, not EVEN_K, INTERPRET)  # [BM, BK]
        if DOT:
            if DOT_F32:  # the interpreter multiplies bfloat16 bit patterns (common.dot_in_fp32)
                acc += tl.dot(x, tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(x.to(w_ptr.dtype.element_ty), tl.trans(w))
        elif BLOCK_M == 1:
            acc += w.to(tl.float32) * x
        else:
            acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
        w_ptrs += BLOCK_K

    pdl_release(PDL, LATE)
    _store_tile(acc, rm, rn, m_mask, n_mask, pid_k, M, N, bias_ptr, out_ptr, part_ptr, lock_ptr, stride_om,
                BLOCK_M, BLOCK_N, DOT, SPLIT, HAS_BIAS, INTERPRET)


def _check_weight(a: torch.Tensor, k: int, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """N after checking weight [N, K] and bias [N] against the activation a."""
    check_tensor("weight", weight, "[N, K]", 2, (a.dtype,), device=a.device)
    check_size("weight", "K", weight.shape[1], k, "the GEMM's inner size")
    check_last_dim_contiguous("weight", weight)
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, "[N]", 1, (torch.float16, torch.bfloat16, torch.float32), device=a.device)
        check_size("bias", "N", bias.shape[0], n, "weight's rows")
        check_last_dim_contiguous("bias", bias)
    return n


def check_norm_operands(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                        dtypes: tuple[torch.dtype, ...]) -> tuple[int, int]:
    """(M, H) after checking a norm prologue's operands: x [M, H] in one of dtypes, residual
    [M, H] or None and norm_weight [H] in x's dtype, rows contiguous, H within one program's row."""
    check_tensor("x", x, "[M, H]", 2, dtypes)
    m, h = x.shape
    check_last_dim_contiguous("x", x)
    check_tensor("norm_weight", norm_weight, "[H]", 1, (x.dtype,), device=x.device)
    check_size("norm_weight", "H", norm_weight.shape[0], h, "x's columns")
    check_last_dim_contiguous("norm_weight", norm_weight)
    if not 0 < h <= _MAX_HIDDEN:
        raise ValueError(f"hidden size must be in 1..{_MAX_HIDDEN}, got {h}")
    if residual is not None:
        check_tensor("residual", residual, "[M, H]", 2, (x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        check_last_dim_contiguous("residual", residual)
    return m, h


def _launch(a, r, g, weight, bias, out, res_out, m, n, k, eps, config, norm, has_residual):
    check_config(config)
    splits, k_per_split = split_plan(k, config.block_k, config.split_k)
    num_m_blocks = triton.cdiv(m, config.block_m)
    tiles = num_m_blocks * triton.cdiv(n, config.block_n)
    part, lock = split_buffers("fused_skinny", a, m, n, splits, tiles)
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    block_h = min(triton.next_power_of_2(k), max(16, SUMSQ_ELEMS // config.block_m))
    interpret = interpreting()
    pdl = pdl_launch(a.device)
    _fused_skinny_kernel[(tiles, splits)](
        a, r, g, weight, bias_arg, out, part, lock, res_out,
        m, n, k, k_per_split, num_m_blocks,
        a.stride(0), r.stride(0), weight.stride(0), out.stride(0), res_out.stride(0), float(eps),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_H=block_h,
        DOT=config.dot, SPLIT=splits > 1, HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
        NORM=norm, HAS_RESIDUAL=has_residual, DOT_F32=interpret, INTERPRET=interpret,
        LATE=pdl_late(), num_warps=config.num_warps, num_stages=config.num_stages, **pdl,
    )


def rmsnorm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SkinnyConfig | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) @ weight^T (+ bias), x + residual) for x, residual: [M, H],
    norm_weight: [H], weight: [N, H] → ([M, N], [M, H]); without residual the second is x itself.
    One dtype (float16 / bfloat16) for x, residual, norm_weight and weight."""
    m, h = check_norm_operands(x, residual, norm_weight, DTYPES)
    n = _check_weight(x, h, weight, bias)
    config = config or default_config(m, n, h)
    out = check_out("out", out, (m, n), x.dtype, x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x
    if m and n:
        _launch(x, residual if residual is not None else x, norm_weight, weight, bias, out, res_out,
                m, n, h, eps, config, norm=True, has_residual=residual is not None)
    elif m and residual is not None:  # a weight with no rows launches no program to store the sum
        res_out.copy_(x + residual)
    return out, res_out


def silu_mul_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SkinnyConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(silu(gate_up[:, :I]) * gate_up[:, I:]) @ weight^T (+ bias) for gate_up: [M, 2I],
    weight: [N, I] → [M, N], in gate_up's dtype (float16 / bfloat16)."""
    check_tensor("gate_up", gate_up, "[M, 2 * I]", 2, DTYPES)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate and up halves), got {gate_up.shape[1]}")
    check_last_dim_contiguous("gate_up", gate_up)
    m, inter = gate_up.shape[0], gate_up.shape[1] // 2
    n = _check_weight(gate_up, inter, weight, bias)
    config = config or default_config(m, n, inter)
    out = check_out("out", out, (m, n), gate_up.dtype, gate_up.device)
    if m == 0 or n == 0:
        return out
    if inter == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    _launch(gate_up, gate_up, gate_up, weight, bias, out, out, m, n, inter, 0.0, config, norm=False,
            has_residual=False)
    return out


def rmsnorm_linear_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                       weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused composition: rmsnorm_ref, then F.linear with float32 accumulation."""
    from llmesh.kernels.rmsnorm import rmsnorm_ref
    from llmesh.kernels.skinny_gemm import skinny_gemm_ref

    if residual is None:
        return skinny_gemm_ref(rmsnorm_ref(x, norm_weight, eps), weight, bias), x
    h, new_residual = rmsnorm_ref(x, norm_weight, eps, residual)
    return skinny_gemm_ref(h, weight, bias), new_residual


def silu_mul_linear_ref(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused composition: silu_and_mul_ref, then F.linear with float32 accumulation."""
    from llmesh.kernels.activation import silu_and_mul_ref
    from llmesh.kernels.skinny_gemm import skinny_gemm_ref

    return skinny_gemm_ref(silu_and_mul_ref(gate_up), weight, bias)

"""The fused q/k/v projection at decode sizes with RoPE and the K/V write in its epilogue.

A decode step's attention block starts with three launches: the skinny GEMV of the fused
qkv projection (skinny_gemm.py), then `rope_kv_write` (rotate q and k, store k and v in the
paged pool). At batch 1 the second is a launch of a few microseconds whose input is the
first's output. Here the GEMV's programs do it themselves, so it disappears:

- A program owns HB = BLOCK_N / 2 output dimensions of one head and the HB dimensions half a
  head further on, the two halves that neox-style RoPE rotates together. W's rows are read
  in that order (each row is K-contiguous, so which rows share a program does not change how
  a row is read), and the GEMV loop is skinny_gemm's `_skinny_acc` for the same config:
  every element of the projection has the bits skinny_gemm gives it.
- The epilogue rounds the projection to its dtype (as the qkv tensor stores it), rotates q
  and k heads with `rope.rotate_halves` (the arithmetic of rope_kv_write), stores q, k and v
  into the qkv output, and k and v into their pool slot (a negative slot, a CUDA-graph
  padding row, is not stored). So q, k, v and the pool hold exactly what skinny_gemm followed
  by rope_kv_write leave there.

The programs let the next kernel (the decode attention) launch only after their loop
(`triton_helpers.pdl_release`): let in at their start, its programs sat on the SMs the GEMV
streams with, and the fused step was slower than the two kernels (bench/README.md,
kernel_profile.py).

What it does not cover, left to the two-kernel path by the caller: split-K configs (the
epilogue would move into the reduce launch), an FP8 pool (a (token, head) scale needs the
whole head), Qwen3's per-head q/k norm (likewise), and a head dim whose half is not a multiple
of HB. `rope_kv_fusable` says whether a config and shapes qualify.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import INDEX_DTYPES, check_size, check_tensor, interpreting, pdl_late, pdl_launch
from llmesh.kernels.rope import round_to, rotate_halves
from llmesh.kernels.skinny_gemm import DTYPES, _check_args, _skinny_acc, _tile_sum
from llmesh.kernels.skinny_gemm_config import SkinnyConfig, check_config
from llmesh.kernels.triton_helpers import cast_rtne, pdl_release, pdl_wait


@triton.jit(do_not_specialize=["M", "NUM_M_BLOCKS"])
def _skinny_rope_kv_kernel(
    x_ptr, w_ptr, bias_ptr, qkv_ptr, pos_ptr, slot_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr,
    M, K, NUM_M_BLOCKS, stride_xm, stride_wn, stride_qkv, stride_cs,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr,
):
    pdl_wait(PDL, LATE)
    HB: tl.constexpr = BLOCK_N // 2
    CHUNKS: tl.constexpr = HALF // HB
    N: tl.constexpr = (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * 2 * HALF
    pid = tl.program_id(0)
    pid_m = pid % NUM_M_BLOCKS
    pid_n = pid // NUM_M_BLOCKS
    head = pid_n // CHUNKS
    d0 = (pid_n % CHUNKS) * HB
    i = tl.arange(0, BLOCK_N)
    # rows [d0, d0 + HB) of the head's first half, then the same of its second half
    rn = head * 2 * HALF + d0 + i % HB + (i // HB) * HALF
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    # The epilogue's inputs before the loop (position, then its cos/sin row). On the H200 the
    # step took the same time with them after it (bench/results/qkv_rope/).
    dtype = qkv_ptr.dtype.element_ty
    rows = (rm % M).to(tl.int64)
    pos = tl.load(pos_ptr + rows).to(tl.int64)
    slot = tl.load(slot_ptr + rows).to(tl.int64)
    dims = d0 + tl.arange(0, HB)
    cs = cos_sin_ptr + pos[:, None] * stride_cs + dims[None, :]
    cos = round_to(tl.load(cs), dtype, INTERPRET)
    sin = round_to(tl.load(cs + HALF), dtype, INTERPRET)
    acc = _skinny_acc(x_ptr, w_ptr, rm, rn, pid_m, M, N, K, 0, K, stride_xm, stride_wn,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT, EVEN_K, DOT_F32)
    pdl_release(PDL, LATE)
    y = _tile_sum(acc, BLOCK_M, DOT)  # [BM, BN]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    y = round_to(y, dtype, INTERPRET)  # the projection as the qkv tensor holds it
    x1, x2 = tl.split(tl.permute(tl.reshape(y, [BLOCK_M, 2, HB]), (0, 2, 1)))  # [BM, HB] each
    if head < NUM_Q_HEADS + NUM_KV_HEADS:  # q and k rotate; v is stored as projected
        x1, x2 = rotate_halves(x1, x2, cos, sin, dtype, INTERPRET)
    o1 = cast_rtne(x1, dtype, INTERPRET)
    o2 = cast_rtne(x2, dtype, INTERPRET)
    mask = m_mask[:, None] & (dims < HALF)[None, :]
    dst = qkv_ptr + rm.to(tl.int64)[:, None] * stride_qkv + head * 2 * HALF + dims[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)

    if head >= NUM_Q_HEADS:
        write = mask & (slot >= 0)[:, None]
        block = (slot // BLOCK_SIZE)[:, None]
        offset = (slot % BLOCK_SIZE)[:, None]
        cache_dtype = k_cache_ptr.dtype.element_ty
        if head < NUM_Q_HEADS + NUM_KV_HEADS:
            h = head - NUM_Q_HEADS
            c_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + h * stride_kch + dims[None, :]
        else:
            h = head - NUM_Q_HEADS - NUM_KV_HEADS
            c_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + h * stride_vch + dims[None, :]
        tl.store(c_dst, cast_rtne(o1.to(tl.float32), cache_dtype, INTERPRET), mask=write)
        tl.store(c_dst + HALF, cast_rtne(o2.to(tl.float32), cache_dtype, INTERPRET), mask=write)


def rope_kv_fusable(config: SkinnyConfig, head_dim: int, k_cache: torch.Tensor, fp8_pool: bool,
                    qk_norm: bool) -> bool:
    """Whether skinny_rope_kv can run this skinny config for these heads and pool (see the
    module docstring for what it leaves to the two-kernel path)."""
    hb = config.block_n // 2
    return (config.split_k == 1 and not fp8_pool and not qk_norm and config.block_n >= 2
            and head_dim % 2 == 0 and (head_dim // 2) % hb == 0 and k_cache.dtype in DTYPES)


def skinny_rope_kv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    *,
    config: SkinnyConfig,
) -> torch.Tensor:
    """qkv = x [M, K] @ weight [N, K]^T (+ bias), N = (num_q_heads + 2 num_kv_heads) * D, with
    q and k rotated at positions [M] (cos_sin_cache [max_positions, D] float32: cos | sin) and
    k, v stored into k_cache, v_cache [num_blocks, block_size, H_kv, D] (16-bit) at
    slot_mapping [M] (negative: not stored) → qkv [M, N], what skinny_gemm then rope_kv_write
    (q_out=q, k_out=k) would leave. `config` must pass rope_kv_fusable."""
    m, n, k = _check_args(x, weight, bias)
    check_config(config)
    check_tensor("cos_sin_cache", cos_sin_cache, "[max_positions, D]", 2, (torch.float32,), device=x.device)
    d = cos_sin_cache.shape[1]
    check_size("weight", "N", n, (num_q_heads + 2 * num_kv_heads) * d, "(H_q + 2 H_kv) * D")
    check_tensor("k_cache", k_cache, "[num_blocks, block_size, H_kv, D]", 4, DTYPES, device=x.device)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    check_size("k_cache", "H_kv", k_cache.shape[2], num_kv_heads, "the KV heads")
    check_size("k_cache", "D", k_cache.shape[3], d, "cos_sin_cache's row length")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {c.stride()}")
    for name, idx in (("positions", positions), ("slot_mapping", slot_mapping)):
        check_tensor(name, idx, "[M]", 1, INDEX_DTYPES, device=x.device)
        check_size(name, "M", idx.shape[0], m, "x's rows")
    if not rope_kv_fusable(config, d, k_cache, fp8_pool=False, qk_norm=False):
        raise ValueError(f"config {config.short()} cannot carry the RoPE epilogue for head dim {d} "
                         "(split-K, or half the head dim not a multiple of block_n / 2)")
    qkv = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return qkv
    num_m_blocks = triton.cdiv(m, config.block_m)
    interpret = interpreting()
    _skinny_rope_kv_kernel[(num_m_blocks * (n // (config.block_n // 2) // 2),)](
        x, weight, bias if bias is not None else qkv, qkv, positions.contiguous(), slot_mapping.contiguous(),
        cos_sin_cache, k_cache, v_cache,
        m, k, num_m_blocks, x.stride(0), weight.stride(0), qkv.stride(0), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=d // 2, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT=config.dot, HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
        DOT_F32=interpret, INTERPRET=interpret,
        LATE=pdl_late(), num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x.device),
    )
    return qkv

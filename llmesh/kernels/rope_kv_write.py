"""RoPE on q and k and the K/V write into the paged pool, in one launch.

The same arithmetic as `rope.rotary_embedding` followed by `kv_cache_write` (neox
rotate-half from the float32 cos/sin cache, each product rounded to the q dtype, the rotated
k then cast to the pool's dtype), but one program per token does both: the rotated k goes
from registers to k_out and to its pool slot, and v is copied to its slot, so k and v are
read once and the second launch disappears. A negative slot marks a padding token (a batch
padded to a CUDA-graph size): it is rotated (harmless) but not written to the pool. The grid
is (T,), shapes only, so the launch is graph-capturable. An FP8 pool is quantized on store
per (token, head) as kv_cache_write does (llmesh/kernels/kv_quant.py), the scale from both halves.

Qwen3's per-head RMSNorm of q and k (``q_norm`` / ``k_norm`` weights [D]) can run first in the
same program, with the arithmetic of llmesh/kernels/rmsnorm.py (float32 statistics, the normalised
value rounded to the input dtype, then times the weight, rounded): in a decode step's graph
that removes four launches a layer (two contiguous copies of the q and k views, two norms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (INDEX_DTYPES, check_out, check_size, check_tensor, interpreting, next_power_of_2,
                                   pdl_launch)
from llmesh.kernels.kv_cache_write import kv_cache_write_ref
from llmesh.kernels.kv_quant import kv_exponent, kv_quantize
from llmesh.kernels.kv_quant_ref import POOL_DTYPES, check_kv_scales
from llmesh.kernels.rmsnorm import rmsnorm_ref
from llmesh.kernels.rope import _check_heads, load_halves, rotary_embedding_ref, rotate_halves, round_to
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter


@triton.jit
def _rms_halves(x1, x2, w_ptr, j, j_mask, eps, HALF: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """RMSNorm of each head (a row of the [BLOCK_H, HALF] halves) with the weight w [2 * HALF]."""
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(w_ptr + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    n1 = round_to(w1 * round_to(x1 * rstd, DTYPE, INTERPRET), DTYPE, INTERPRET)
    n2 = round_to(w2 * round_to(x2 * rstd, DTYPE, INTERPRET), DTYPE, INTERPRET)
    return n1, n2


@triton.jit
def _rope_kv_write_kernel(
    pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    cos_sin_ptr, stride_cs, q_norm_ptr, k_norm_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
    QK_NORM: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    dtype = q_ptr.dtype.element_ty
    cache_dtype = k_cache_ptr.dtype.element_ty
    row = cos_sin_ptr + pos * stride_cs
    cos = round_to(tl.load(row + j, mask=j_mask, other=0.0).to(tl.float32), dtype, INTERPRET)
    sin = round_to(tl.load(row + HALF + j, mask=j_mask, other=0.0).to(tl.float32), dtype, INTERPRET)

    # q: rotated [BLOCK_HQ, HALF] halves to q_out
    q1, q2, q_mask = load_halves(q_ptr + t * stride_qt, stride_qh, j, j_mask, NUM_Q_HEADS, BLOCK_HQ, HALF)
    if QK_NORM:
        q1, q2 = _rms_halves(q1, q2, q_norm_ptr, j, j_mask, eps, HALF, dtype, INTERPRET)
    q1, q2 = rotate_halves(q1, q2, cos[None, :], sin[None, :], dtype, INTERPRET)
    hq = tl.arange(0, BLOCK_HQ)
    q_dst = qo_ptr + t * stride_qot + hq[:, None] * stride_qoh + j[None, :]
    tl.store(q_dst, cast_rtne(q1, dtype, INTERPRET), mask=q_mask)
    tl.store(q_dst + HALF, cast_rtne(q2, dtype, INTERPRET), mask=q_mask)

    # k: rotated [BLOCK_HKV, HALF] halves to k_out and, rounded to q's dtype first as
    # kv_cache_write would read them, to the pool
    k1, k2, kv_mask = load_halves(k_ptr + t * stride_kt, stride_kh, j, j_mask, NUM_KV_HEADS, BLOCK_HKV, HALF)
    if QK_NORM:
        k1, k2 = _rms_halves(k1, k2, k_norm_ptr, j, j_mask, eps, HALF, dtype, INTERPRET)
    k1, k2 = rotate_halves(k1, k2, cos[None, :], sin[None, :], dtype, INTERPRET)
    k1 = cast_rtne(k1, dtype, INTERPRET)
    k2 = cast_rtne(k2, dtype, INTERPRET)
    h = tl.arange(0, BLOCK_HKV)
    k_dst = ko_ptr + t * stride_kot + h[:, None] * stride_koh + j[None, :]
    tl.store(k_dst, k1, mask=kv_mask)
    tl.store(k_dst + HALF, k2, mask=kv_mask)

    # The slot test is broadcast as a tensor: Triton 3.9's interpreter rejects a scalar & tensor mask.
    write = kv_mask & (h[:, None] * 0 + slot >= 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    kc_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch + j[None, :]
    # v: [BLOCK_HKV, HALF] halves copied to the pool
    v_src = v_ptr + t * stride_vt + h[:, None] * stride_vh + j[None, :]
    vc_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + j[None, :]
    v1 = tl.load(v_src, mask=write, other=0.0).to(tl.float32)
    v2 = tl.load(v_src + HALF, mask=write, other=0.0).to(tl.float32)
    if FP8:
        k1 = tl.where(kv_mask, k1.to(tl.float32), 0.0)
        k2 = tl.where(kv_mask, k2.to(tl.float32), 0.0)
        ke = kv_exponent(tl.maximum(tl.max(tl.abs(k1), axis=1), tl.max(tl.abs(k2), axis=1)))  # [BLOCK_HKV]
        ve = kv_exponent(tl.maximum(tl.max(tl.abs(v1), axis=1), tl.max(tl.abs(v2), axis=1)))
        tl.store(kc_dst, kv_quantize(k1, ke, INTERPRET), mask=write)
        tl.store(kc_dst + HALF, kv_quantize(k2, ke, INTERPRET), mask=write)
        tl.store(vc_dst, kv_quantize(v1, ve, INTERPRET), mask=write)
        tl.store(vc_dst + HALF, kv_quantize(v2, ve, INTERPRET), mask=write)
        # scales: [num_blocks, block_size, H_kv] contiguous, a slot's heads adjacent
        h_mask = (h < NUM_KV_HEADS) & (h * 0 + slot >= 0)
        tl.store(k_scale_ptr + slot * NUM_KV_HEADS + h, ke.to(tl.uint8), mask=h_mask)
        tl.store(v_scale_ptr + slot * NUM_KV_HEADS + h, ve.to(tl.uint8), mask=h_mask)
    else:
        tl.store(kc_dst, cast_rtne(k1.to(tl.float32), cache_dtype, INTERPRET), mask=write)
        tl.store(kc_dst + HALF, cast_rtne(k2.to(tl.float32), cache_dtype, INTERPRET), mask=write)
        tl.store(vc_dst, cast_rtne(v1, cache_dtype, INTERPRET), mask=write)
        tl.store(vc_dst + HALF, cast_rtne(v2, cache_dtype, INTERPRET), mask=write)


def rope_kv_write(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: [T, H_q, D] and k: [T, H_kv, D] at positions: [T], store the rotated k and
    v: [T, H_kv, D] into k_cache, v_cache: [num_blocks, block_size, H_kv, D] at
    slot_mapping: [T] (negative slots skipped); an FP8 pool quantized, with its scale pools
    k_scales, v_scales: [num_blocks, block_size, H_kv] uint8. With q_norm, k_norm ([D], q's
    dtype) each head of q and k is RMSNorm-ed (eps) before the rotation. Returns (q_out, k_out):
    new tensors, or the ones given (q_out=q, k_out=k rotates in place; q, k, v may be views of
    a fused qkv)."""
    check_tensor("cos_sin_cache", cos_sin_cache, "[max_positions, D]", 2)
    device = cos_sin_cache.device
    d = cos_sin_cache.shape[1]
    if d % 2:
        raise ValueError(f"cos_sin_cache rows must hold cos and sin halves (even length), got {d}")
    check_tensor("positions", positions, "[T]", 1, INDEX_DTYPES, device=device)
    t = positions.shape[0]
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_heads(name, x, t, d, device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    check_tensor("k_cache", k_cache, "[num_blocks, block_size, H_kv, D]", 4, POOL_DTYPES, device=device)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or v_cache.device != device:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} on {device}")
    check_size("k_cache", "H_kv", k_cache.shape[2], k.shape[1], "k's heads")
    check_size("k_cache", "D", k_cache.shape[3], d, "cos_sin_cache's row length")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {c.stride()}")
    check_tensor("slot_mapping", slot_mapping, "[T]", 1, INDEX_DTYPES, device=device)
    check_size("slot_mapping", "T", slot_mapping.shape[0], t, "one slot per token")
    fp8 = check_kv_scales(k_cache, k_scales, v_scales)
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come together")
    if q_norm is not None:
        for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
            check_tensor(name, w, f"[{d}]", 1, (q.dtype,), device=device)
            check_size(name, "D", w.shape[0], d, "the head dimension")
            if not w.is_contiguous():
                raise ValueError(f"{name} must be contiguous, got stride {w.stride()}")
    q_out = check_out("q_out", q_out, tuple(q.shape), q.dtype, device)
    k_out = check_out("k_out", k_out, tuple(k.shape), k.dtype, device)
    if t == 0:
        return q_out, k_out
    h_q, h_kv = q.shape[1], k.shape[1]
    _rope_kv_write_kernel[(t,)](
        positions.contiguous(), slot_mapping.contiguous(), q, k, v, q_out, k_out, k_cache, v_cache,
        k_scales if fp8 else k_cache, v_scales if fp8 else v_cache, cos_sin_cache, cos_sin_cache.stride(0),
        q_norm if q_norm is not None else q, k_norm if k_norm is not None else k, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=h_q, NUM_KV_HEADS=h_kv, BLOCK_HQ=next_power_of_2(h_q), BLOCK_HKV=next_power_of_2(h_kv),
        HALF=d // 2, BLOCK_HALF=next_power_of_2(d // 2), BLOCK_SIZE=k_cache.shape[1], FP8=fp8,
        QK_NORM=q_norm is not None, INTERPRET=interpreting(), **pdl_launch(q.device)
    )
    return q_out, k_out


def rope_kv_write_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head norms when given (`rmsnorm_ref`), `rotary_embedding_ref`, then
    `kv_cache_write_ref` of the rotated k and v; returns (q, k) rotated."""
    if q_norm is not None:
        q, k = rmsnorm_ref(q, q_norm, eps), rmsnorm_ref(k, k_norm, eps)
    q_rot, k_rot = rotary_embedding_ref(positions, q, k, cos_sin_cache)
    kv_cache_write_ref(k_cache, v_cache, k_rot, v, slot_mapping, k_scales, v_scales)
    return q_rot, k_rot

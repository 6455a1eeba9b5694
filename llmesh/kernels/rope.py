"""Rotary position embedding (neox / rotate-half layout) applied to q and k in one launch.

The angles come from a cache ``cos_sin_cache: [max_positions, D]`` whose first half of each
row is cos and second half sin of ``position * inv_freq`` (float32), built by
`rope_cos_sin_cache` from `layers.rope_inv_freq` with the same float32 operations as
`layers.RotaryEmbedding`. The kernel casts cos/sin to the q dtype and rounds after each
multiply and the add, as the torch expression ``x * cos + rotate_half(x) * sin`` does, so
16-bit results match `layers.apply_rotary` to the last bit: the products are rounded through
an instruction the compiler cannot see through (`round_product`), since it would otherwise
contract a product and the add into one FMA, which rounds once where torch rounds twice.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from llmesh.engine.model.layers import apply_rotary, rope_inv_freq
from llmesh.kernels.common import (
    INDEX_DTYPES, check_last_dim_contiguous, check_out, check_size, check_tensor, interpreting,
    next_power_of_2, pdl_launch)
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    return cast_rtne(x, DTYPE, INTERPRET).to(tl.float32)


@triton.jit
def round_product(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """round_to for a product about to be added: on a GPU the rounding is an inline cvt (mov for
    float32), opaque to LLVM, so the product cannot be fused with the add into an FMA, and two
    kernels computing the same expression get the same bits whatever else they contract."""
    if INTERPRET:
        y = round_to(x, DTYPE, INTERPRET)
    elif DTYPE == tl.bfloat16:
        y = tl.inline_asm_elementwise("cvt.rn.bf16.f32 $0, $1;", "=h,r", [x], dtype=tl.bfloat16, is_pure=True,
                                      pack=1).to(tl.float32)
    elif DTYPE == tl.float16:
        y = tl.inline_asm_elementwise("cvt.rn.f16.f32 $0, $1;", "=h,r", [x], dtype=tl.float16, is_pure=True,
                                      pack=1).to(tl.float32)
    else:
        y = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return y


@triton.jit
def load_halves(x_ptr, stride_h, j, j_mask, NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """(x1, x2, mask): the halves [BLOCK_H, HALF] of one token's heads in float32, and the mask
    of real (head, j) elements."""
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < NUM_HEADS) & j_mask[None, :]
    src = x_ptr + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1, x2, mask


@triton.jit
def rotate_halves(x1, x2, c, s, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """The rotated halves in float32, each product rounded to DTYPE as the torch expression does
    (the sum is rounded by the caller's store); c, s: cos and sin broadcastable to x1's shape."""
    o1 = round_product(x1 * c, DTYPE, INTERPRET) + round_product(-x2 * s, DTYPE, INTERPRET)
    o2 = round_product(x2 * c, DTYPE, INTERPRET) + round_product(x1 * s, DTYPE, INTERPRET)
    return o1, o2


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, stride_h, stride_oh, cos, sin, j, j_mask,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, INTERPRET: tl.constexpr,
):
    dtype = o_ptr.dtype.element_ty
    x1, x2, mask = load_halves(x_ptr, stride_h, j, j_mask, NUM_HEADS, BLOCK_H, HALF)
    o1, o2 = rotate_halves(x1, x2, cos[None, :], sin[None, :], dtype, INTERPRET)
    h = tl.arange(0, BLOCK_H)
    dst = o_ptr + h[:, None] * stride_oh + j[None, :]
    tl.store(dst, cast_rtne(o1, dtype, INTERPRET), mask=mask)
    tl.store(dst + HALF, cast_rtne(o2, dtype, INTERPRET), mask=mask)


@triton.jit
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, cache_ptr, stride_cache,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    dtype = q_ptr.dtype.element_ty
    row = cache_ptr + pos * stride_cache
    cos = round_to(tl.load(row + j, mask=j_mask, other=0.0).to(tl.float32), dtype, INTERPRET)
    sin = round_to(tl.load(row + HALF + j, mask=j_mask, other=0.0).to(tl.float32), dtype, INTERPRET)
    _rotate_heads(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, stride_qh, stride_qoh, cos, sin, j, j_mask,
                  NUM_Q_HEADS, BLOCK_HQ, HALF, INTERPRET)
    _rotate_heads(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, stride_kh, stride_koh, cos, sin, j, j_mask,
                  NUM_KV_HEADS, BLOCK_HKV, HALF, INTERPRET)


def rope_cos_sin_cache(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos then sin of position * inv_freq (Llama-3/linear scaling)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)
    positions = torch.arange(max_positions, device=device)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [P, D/2], as RotaryEmbedding
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _check_heads(name: str, x: torch.Tensor, t: int, d: int, device: torch.device) -> None:
    check_tensor(name, x, f"[T, H, {d}]", 3, device=device)
    check_size(name, "T", x.shape[0], t, "one position per token")
    check_size(name, "D", x.shape[2], d, "cos_sin_cache's row length")
    check_last_dim_contiguous(name, x)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: [T, H_q, D] and k: [T, H_kv, D] at positions: [T]; returns (q_out, k_out).

    Results go to new tensors, or to `q_out` / `k_out` when given; pass q_out=q, k_out=k to
    rotate in place (q and k may be strided views of a fused qkv projection).
    """
    check_tensor("cos_sin_cache", cos_sin_cache, "[max_positions, D]", 2)
    device = cos_sin_cache.device
    max_positions, d = cos_sin_cache.shape
    if d % 2:
        raise ValueError(f"cos_sin_cache rows must hold cos and sin halves (even length), got {d}")
    check_last_dim_contiguous("cos_sin_cache", cos_sin_cache)
    check_tensor("positions", positions, "[T]", 1, INDEX_DTYPES, device=device)
    t = positions.shape[0]
    _check_heads("q", q, t, d, device)
    _check_heads("k", k, t, d, device)
    if k.dtype != q.dtype:
        raise ValueError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    q_out = check_out("q_out", q_out, tuple(q.shape), q.dtype, device)
    k_out = check_out("k_out", k_out, tuple(k.shape), k.dtype, device)
    if t == 0:
        return q_out, k_out
    h_q, h_kv = q.shape[1], k.shape[1]
    _rope_kernel[(t,)](
        positions.contiguous(), q, k, q_out, k_out, cos_sin_cache, cos_sin_cache.stride(0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        NUM_Q_HEADS=h_q, NUM_KV_HEADS=h_kv, BLOCK_HQ=next_power_of_2(h_q), BLOCK_HKV=next_power_of_2(h_kv),
        HALF=d // 2, BLOCK_HALF=next_power_of_2(d // 2), INTERPRET=interpreting(), **pdl_launch(q.device)
    )
    return q_out, k_out


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`layers.apply_rotary` with cos/sin read from the cache at `positions`."""
    half = cos_sin_cache.shape[1] // 2
    rows = cos_sin_cache[positions.long()]  # [T, D]
    cos = torch.cat((rows[:, :half], rows[:, :half]), dim=-1).to(q.dtype)
    sin = torch.cat((rows[:, half:], rows[:, half:]), dim=-1).to(q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

"""An MoE layer's entry in one launch: the residual add and RMSNorm before it, the router's
logits and the top-k choice (what rmsnorm.py, the router's GEMM and moe_router.py do in three).

At decode sizes these are three kernels of a few microseconds each in front of the experts,
48 layers deep in Qwen3-30B-A3B, each mostly launch and ramp: the router's weight is small
(E x H: 0.5 MB at 128 x 2048) and the token's row is 4 KB. Here a grid of (token, slice of
experts) programs each

1. walks the row once for the sum of squares (x + residual, rounded to the row's dtype as
   rmsnorm does; the programs of slice 0 store it, the next layer's residual: one writer a row),
2. streams its slice of router rows against the normalised row, recomputed chunk by chunk from
   the row (L2-resident) as fused_skinny's prologue does (slice 0's programs store it: the
   experts' input), and stores its slice's logits, rounded to the row's dtype as the router's
   linear layer returns them,
3. counts its arrival at the token (split_k.arrive); the last program of the token reads the
   whole row of logits back and makes moe_router's choice (``choose_experts``: the same code).

Numerics: the normalised row and x + residual round as rmsnorm's; the sum of squares runs in
chunks (as fused_skinny's), so rstd may differ from rmsnorm's in the last float32 bit and an
element of the row one bf16 ulp; the logits are a float32 dot in another order than a GEMM
library's. The torch table (and this table above ``NORM_ROUTER_MAX_TOKENS``) runs the three ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (arrival_counters, check_last_dim_contiguous, check_size, check_tensor,
                                   interpreting, next_power_of_2, pdl_launch)
from llmesh.kernels.fused_skinny import _MAX_HIDDEN, check_norm_operands
from llmesh.kernels.moe_router import MAX_EXPERTS, choose_experts
from llmesh.kernels.split_k import arrive
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter

NORM_ROUTER_MAX_TOKENS = 0
"""The triton op table fuses the MoE entry up to this many tokens (0: never). On the H100
(78a1272, Qwen3-30B-A3B's layer: moe_h100_sorted.json's ``moe_norm_router_t<T>_*``) the fused
kernel took 14.9 / 14.5 / 15.4 / 22.3 us at 1 / 4 / 16 / 64 tokens against the three kernels'
15.8 / 15.4 / 15.7 / 16.1 (every row choosing the same experts), but in the batch-1 step
(kernel_profile_h100_nr_{on,off}.json) it saved nothing: 3.925 ms a step against 3.926 with 96
launches fewer, the step already 0.95 GPU-busy and the GEMM after it waiting on the entry either
way. With the CUDA GEMVs in the step it lost (session 57, ca3d025, kernel_profile_h100_moe_b1_nr_*.json):
3.553 / 3.554 ms with it against 3.361 / 3.364 without (CUDA paths / Triton tables), the fused entry
10.4 us a launch, on the path of every layer. So it stays off: the three kernels are the simpler path
and the faster. What would change that is an entry that is not latency-bound on one SM's row (the
router GEMM split wider)."""

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class NormRouterConfig:
    """block_e: experts a program scores (a power of two); block_h: the row's chunk a step."""

    block_e: int
    block_h: int = 512
    num_warps: int = 4


def default_config(num_experts: int, hidden: int) -> NormRouterConfig:
    """About 32 programs a token (their slices of router rows stream in parallel), chunks of
    512 columns: a [block_e, 512] float32 accumulator is 16-64 registers a thread at 4 warps."""
    return NormRouterConfig(block_e=min(16, max(2, next_power_of_2(num_experts) // 32)),
                            block_h=min(512, next_power_of_2(hidden)))


@triton.jit
def _row_chunk(x_ptr, r_ptr, cols, ok, HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr):
    """x + residual over cols, rounded to x's dtype (float32 values), evict_last: every program
    of the token reads the row twice."""
    s = tl.load(x_ptr + cols, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + cols, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        s = cast_rtne(s + r, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    return s


@triton.jit
def _norm_router_kernel(x_ptr, r_ptr, g_ptr, w_ptr, h_ptr, res_out_ptr, logits_ptr, weights_ptr, ids_ptr,
                        counts_ptr, counted_ptr, lock_ptr, H, E, stride_x, stride_r, stride_w, eps,
                        TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_ALL: tl.constexpr, BLOCK_H: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, RENORM: tl.constexpr, COUNT: tl.constexpr,
                        INTERPRET: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + t * stride_x
    r_row = r_ptr + t * stride_r
    rh = tl.arange(0, BLOCK_H)
    writer = (rh * 0 + p) == 0  # slice 0's program stores the token's rows (a vector: a mask operand)
    sq = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + rh
        ok = cols < H
        s = _row_chunk(x_row, r_row, cols, ok, HAS_RESIDUAL, INTERPRET)
        if HAS_RESIDUAL:
            tl.store(res_out_ptr + t * H + cols, s, mask=ok & writer)
        sq += s * s
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / H + eps)

    re = p * BLOCK_E + tl.arange(0, BLOCK_E)
    w_rows = w_ptr + (re % E).to(tl.int64)[:, None] * stride_w  # rows past E re-read a valid one, never stored
    acc = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + rh
        ok = cols < H
        s = _row_chunk(x_row, r_row, cols, ok, HAS_RESIDUAL, INTERPRET)
        g = tl.load(g_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        normed = cast_rtne(s * rstd, dtype, INTERPRET).to(tl.float32)
        y = cast_rtne(normed * g, dtype, INTERPRET)
        tl.store(h_ptr + t * H + cols, y, mask=ok & writer)
        w = tl.load(w_rows + cols[None, :], mask=ok[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * y.to(tl.float32)[None, :]
    logits = cast_rtne(tl.sum(acc, axis=1), dtype, INTERPRET)
    tl.store(logits_ptr + t * E + re, logits, mask=re < E)

    if arrive(lock_ptr, t) == tl.num_programs(1) - 1:  # the token's last slice: every logit is stored
        tl.atomic_xchg(lock_ptr + t, 0)  # ready for the next launch on this stream
        e = tl.arange(0, BLOCK_ALL)
        valid = e < E
        row = tl.load(logits_ptr + t * E + e, mask=valid, other=float("-inf"), cache_modifier=".cg")
        choose_experts(row.to(tl.float32), valid, e, t, weights_ptr, ids_ptr, counts_ptr, counted_ptr, TOP_K, RENORM,
                       COUNT, INTERPRET)


def fusable(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, router: torch.Tensor) -> bool:
    """Whether the triton op table fuses this MoE entry: up to NORM_ROUTER_MAX_TOKENS tokens, one
    dtype throughout (a GGUF or quantized model's router may be another), rows contiguous."""
    return (0 < x.shape[0] <= NORM_ROUTER_MAX_TOKENS and x.dim() == 2 and x.dtype in DTYPES
            and norm_weight.dtype == router.dtype == x.dtype and router.dim() == 2
            and router.shape[0] <= MAX_EXPERTS and x.shape[1] <= _MAX_HIDDEN
            and x.stride(-1) == router.stride(-1) == norm_weight.stride(-1) == 1
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                      and residual.stride(-1) == 1)))


def norm_router(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                router: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                counts: torch.Tensor | None = None, counted: torch.Tensor | None = None, *,
                config: NormRouterConfig | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, x + residual, router logits, weights, ids) for x [T, H], residual [T, H] or None,
    norm_weight [H], router [E, H], all of x's dtype: h = rmsnorm(x + residual), logits = h @
    router^T [T, E] (x's dtype), then moe_router.topk_softmax's choice of the logits (weights [T, k]
    in weights_dtype, ids int64 [T, k]; counts and counted as there). Without residual the second
    is x itself."""
    t, h = check_norm_operands(x, residual, norm_weight, DTYPES)
    check_tensor("router", router, "[E, H]", 2, (x.dtype,), device=x.device)
    check_size("router", "H", router.shape[1], h, "x's columns")
    check_last_dim_contiguous("router", router)
    e = router.shape[0]
    if not 0 < top_k <= e <= MAX_EXPERTS:
        raise ValueError(f"top_k {top_k} of {e} experts: need 0 < top_k <= experts <= {MAX_EXPERTS}")
    if (counts is None) != (counted is None):
        raise ValueError("counts and counted come together")
    if counts is not None and (counts.dtype != torch.int64 or counts.shape != (e,) or not counts.is_contiguous()
                               or counted.dtype != torch.int64 or counted.shape != (t,)):
        raise ValueError(f"counts must be a contiguous int64 [{e}] tensor and counted int64 [{t}], got "
                         f"{counts.dtype} {tuple(counts.shape)} and {counted.dtype} {tuple(counted.shape)}")
    config = config or default_config(e, h)
    if config.block_e & (config.block_e - 1) or config.block_h & (config.block_h - 1):
        raise ValueError(f"block_e and block_h must be powers of two, got {config}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    res_out = torch.empty_like(out) if residual is not None else x
    logits = torch.empty(t, e, dtype=x.dtype, device=x.device)
    weights = torch.empty(t, top_k, dtype=weights_dtype, device=x.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    if t:
        count = counts is not None
        r = residual if residual is not None else x
        _norm_router_kernel[(t, triton.cdiv(e, config.block_e))](
            x, r, norm_weight, router, out, res_out, logits, weights, ids, counts if count else ids,
            counted.contiguous() if count else ids, arrival_counters("moe_norm_router", x.device, t),
            h, e, x.stride(0), r.stride(0), router.stride(0), float(eps),
            TOP_K=top_k, BLOCK_E=config.block_e, BLOCK_ALL=next_power_of_2(e), BLOCK_H=config.block_h,
            HAS_RESIDUAL=residual is not None, RENORM=bool(renormalize), COUNT=count, INTERPRET=interpreting(),
            num_warps=config.num_warps, **pdl_launch(x.device))
    return out, res_out, logits, weights, ids

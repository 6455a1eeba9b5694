"""The MoE router's expert choice in one Triton program per token: softmax over the experts'
logits in float32, the top k, optionally renormalised to sum 1, cast to the weights' dtype.

Two implementations of one contract (``topk_softmax``):

- ``topk_softmax_ref``: torch ops, Hugging Face's order (softmax, topk, sum, divide, cast): the
  reference, and what the torch op table runs;
- ``_topk_softmax_kernel``: at a decode step these are five or six kernels of a few
  microseconds each per MoE layer, 48 layers deep in Qwen3-30B-A3B, where the whole step is
  ~5 ms at batch 1. One program per token holds its row of logits (E <= a few hundred) in
  registers and picks the k experts by k arg-maxes, ties to the lower expert id.

Numerics: the same float32 formula (max-subtracted exponentials over their sum), but the
reductions' order differs from torch's, so weights can differ in the last bits; the ids differ
only where two probabilities tie to the bit. The engine's triton op table uses the kernel on a
GPU where ``ROUTER_KERNEL_ON_CUDA`` is set, which its GPU timing decided (bench/moe_gpu.py,
``moe_router_t<T>_{torch,kernel}_us``), as ``moe_align``'s did.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import arrival_counters, interpreting, next_power_of_2, pdl_launch
from llmesh.kernels.split_k import arrive
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter

ROUTER_KERNEL_ON_CUDA = True
"""Measured on the H200 (moe_h200.json, 128 experts, top-8): 6.9 us a call at batch 1 and 7.5 at
batch 64 against the torch ops' 21.7 and 28.4; in the Qwen3-30B-A3B batch-1 decode step 1,126
kernels became 838 and the step 5.30 ms became 4.60 (kernel_profile_h200_router_on.json against
kernel_profile_h200.json as committed at fadb3fc, the same run)."""

MAX_EXPERTS = 1024
"""Experts one program holds in registers (a row of logits)."""

TOPK_NUM_WARPS = 4
"""Warps of the one-program top-k (its k arg-maxes are cross-warp reductions at more than one)."""

ROUTE_MAX_TOKENS = 16
"""Tokens up to which the triton table routes with ``route`` (one launch) rather than the router
GEMV and ``topk_softmax``: every program re-reads its slice of the router weight per token."""
ROUTE_SLICE_E = 4
"""Experts a ``route`` program projects (E / ROUTE_SLICE_E programs a token)."""
ROUTE_TILE = 8192
"""float32 elements of a ``route`` program's [SLICE_E, BLOCK_H] product tile (64 a thread at 4 warps)."""
ROUTE_NUM_WARPS = 4


def topk_softmax_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                     counts: torch.Tensor | None = None, counted: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] → (weights [T, k] in weights_dtype, expert ids int64 [T, k]). With
    ``counts`` (int64 [E]) and ``counted`` (int64 [T], 1 for a token the counts include, 0 for
    padding), each chosen expert's count grows by its token's ``counted``."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if counts is not None:
        counts.index_add_(0, ids.flatten(), counted[:, None].expand_as(ids).flatten())
    return weights.to(weights_dtype), ids


@triton.jit
def _candidates(p, valid):
    """The arg-max operand: probabilities, NaN as +inf (a NaN row still names k distinct real
    experts, as torch.topk does), padding lanes below every pick (-1) so never chosen."""
    return tl.where(valid, tl.where(p != p, float("inf"), p), -2.0)


@triton.jit
def _pick(x, e, valid, t, weights_ptr, ids_ptr, counts_ptr, counted_ptr, K: tl.constexpr, RENORM: tl.constexpr,
          COUNT: tl.constexpr, INTERPRET: tl.constexpr):
    """Token t's choice from its float32 logits x [BLOCK_E] (-inf past E): softmax, k arg-maxes
    (ties to the lower expert), the counts, the optionally renormalised weights."""
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(valid, p, 0.0)
    p = p / tl.sum(p, axis=0)
    # k arg-maxes name the winners in order; their ranks place every weight in one masked store.
    left = _candidates(p, valid)
    rank = tl.zeros_like(e) - 1
    for j in tl.static_range(K):
        i = tl.argmax(left, axis=0, tie_break_left=True)
        tl.store(ids_ptr + t * K + j, i.to(tl.int64))
        rank = tl.where(e == i, j, rank)
        left = tl.where(e == i, -1.0, left)
    picked = rank >= 0
    if COUNT:  # the load-balance metric's counts (integer atomics: the total is order-free)
        tl.atomic_add(counts_ptr + e, tl.where(picked, tl.load(counted_ptr + t), 0), mask=picked)
    if RENORM:
        p = p / tl.sum(tl.where(picked, p, 0.0), axis=0)
    tl.store(weights_ptr + t * K + rank, cast_rtne(p, weights_ptr.dtype.element_ty, INTERPRET), mask=picked)


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, counts_ptr, counted_ptr, E, stride_l,
                         K: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr, COUNT: tl.constexpr,
                         INTERPRET: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = e < E
    x = tl.load(logits_ptr + t * stride_l + e, mask=valid, other=float("-inf")).to(tl.float32)
    _pick(x, e, valid, t, weights_ptr, ids_ptr, counts_ptr, counted_ptr, K, RENORM, COUNT, INTERPRET)


@triton.jit
def _route_kernel(x_ptr, w_ptr, logits_ptr, lock_ptr, weights_ptr, ids_ptr, counts_ptr, counted_ptr, E, H,
                  stride_x, stride_w, slices, K: tl.constexpr, BLOCK_E: tl.constexpr, SLICE_E: tl.constexpr,
                  BLOCK_H: tl.constexpr, RENORM: tl.constexpr, COUNT: tl.constexpr, INTERPRET: tl.constexpr,
                  PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * SLICE_E + tl.arange(0, SLICE_E)
    row_ok = rows < E
    w_rows = w_ptr + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * stride_w  # past E: row 0, never stored
    h = tl.arange(0, BLOCK_H)
    # The router weight is no kernel's output: its first chunk is in flight before the wait for
    # the previous kernel (x is).
    w = tl.load(w_rows + h[None, :], mask=(h < H)[None, :], other=0.0)
    pdl_enter(PDL)
    x_row = x_ptr + t * stride_x
    acc = w.to(tl.float32) * tl.load(x_row + h, mask=h < H, other=0.0).to(tl.float32)[None, :]
    for h0 in range(BLOCK_H, H, BLOCK_H):
        ok = h0 + h < H
        w = tl.load(w_rows + (h0 + h)[None, :], mask=ok[None, :], other=0.0)
        acc += w.to(tl.float32) * tl.load(x_row + h0 + h, mask=ok, other=0.0).to(tl.float32)[None, :]
    # rounded to x's dtype, as F.linear's output that the two-kernel path's softmax reads
    logits = cast_rtne(tl.sum(acc, axis=1), x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    tl.store(logits_ptr + t * E + rows, logits, mask=row_ok)
    if arrive(lock_ptr, t) == slices - 1:  # the token's last slice to finish picks its experts
        e = tl.arange(0, BLOCK_E)
        valid = e < E
        row = tl.load(logits_ptr + t * E + e, mask=valid, other=float("-inf"), cache_modifier=".cg")
        _pick(row, e, valid, t, weights_ptr, ids_ptr, counts_ptr, counted_ptr, K, RENORM, COUNT, INTERPRET)
        tl.atomic_xchg(lock_ptr + t, 0)  # ready for the next launch on this stream


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                 counts: torch.Tensor | None = None, counted: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_softmax_ref``'s contract in one launch (CUDA-graph safe, no host read), the expert
    counts included (the torch ops spend a scatter kernel on them)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    t, e = router_logits.shape
    counted = _check_choice(t, e, top_k, counts, counted)
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(t, top_k, dtype=weights_dtype, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=router_logits.device)
    if t:
        count = counts is not None
        _topk_softmax_kernel[(t,)](router_logits, weights, ids, counts if count else ids,
                                   counted if count else ids, e, router_logits.stride(0), K=top_k,
                                   BLOCK_E=next_power_of_2(e), RENORM=bool(renormalize), COUNT=count,
                                   INTERPRET=interpreting(), num_warps=1 if interpreting() else TOPK_NUM_WARPS,
                                   **pdl_launch(router_logits.device))
    return weights, ids


def _check_choice(t: int, e: int, top_k: int, counts: torch.Tensor | None, counted: torch.Tensor | None
                  ) -> torch.Tensor | None:
    """The choice's arguments for T tokens over E experts (ValueError naming the bad one);
    returns counted made contiguous."""
    if not 0 < top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}] (the experts), got {top_k}")
    if e > MAX_EXPERTS:
        raise ValueError(f"{e} experts exceed the kernel's {MAX_EXPERTS}; use topk_softmax_ref")
    if (counts is None) != (counted is None):
        raise ValueError("counts and counted come together")
    if counts is not None:
        if counts.dtype != torch.int64 or counts.shape != (e,) or not counts.is_contiguous():
            raise ValueError(f"counts must be a contiguous int64 [{e}] tensor, got {counts.dtype} "
                             f"{tuple(counts.shape)}")
        if counted.dtype != torch.int64 or counted.shape != (t,):
            raise ValueError(f"counted must be int64 [{t}], got {counted.dtype} {tuple(counted.shape)}")
        counted = counted.contiguous()
    return counted


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                   counts: torch.Tensor | None = None, counted: torch.Tensor | None = None,
                   *, kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice (and the expert counts, see topk_softmax_ref): the kernel on a GPU
    where ROUTER_KERNEL_ON_CUDA (``kernel`` forces a path: tests, the benchmark), the torch
    reference otherwise."""
    if kernel is None:
        kernel = router_logits.is_cuda and ROUTER_KERNEL_ON_CUDA and router_logits.shape[-1] <= MAX_EXPERTS
    if kernel:
        return topk_softmax(router_logits, top_k, renormalize, weights_dtype, counts, counted)
    return topk_softmax_ref(router_logits, top_k, renormalize, weights_dtype, counts, counted)


def route_ref(x: torch.Tensor, gate: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
              counts: torch.Tensor | None = None, counted: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's projection x [T, H] @ gate [E, H]^T (logits in x's dtype, as nn.Linear) and
    topk_softmax_ref's choice over them."""
    return topk_softmax_ref(torch.nn.functional.linear(x, gate), top_k, renormalize, weights_dtype, counts, counted)


def route_fusable(x: torch.Tensor, gate: object) -> bool:
    """Whether ``route`` is the triton table's path for this projection: a GPU (or the
    interpreter), at most ROUTE_MAX_TOKENS tokens (measured), a plain gate in x's 16-bit dtype."""
    return (isinstance(gate, torch.Tensor) and (x.is_cuda or interpreting()) and x.dim() == 2
            and 0 < x.shape[0] <= ROUTE_MAX_TOKENS and x.dtype in (torch.float16, torch.bfloat16)
            and gate.dtype == x.dtype and gate.dim() == 2 and gate.shape[1] == x.shape[1]
            and gate.shape[0] <= MAX_EXPERTS)


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
          counts: torch.Tensor | None = None, counted: torch.Tensor | None = None, *,
          slice_e: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_ref``'s contract in one launch (CUDA-graph safe, no host read): programs (token,
    slice of ``slice_e`` experts) each compute their slice's logits in float32, round them to x's
    dtype and store them; the last slice of a token to arrive (an arrival counter per token,
    common.arrival_counters, reset by that program) runs topk_softmax's choice over the row. At a
    decode step this is one launch where the router's GEMV and the top-k were two, 48 layers deep
    in Qwen3-30B-A3B. The logits' sums run in another order than cuBLAS's, so a logit may differ
    from F.linear's in its last bit and the ids only where that decides a tie."""
    if x.dim() != 2 or gate.dim() != 2 or gate.shape[1] != x.shape[1]:
        raise ValueError(f"route needs x [T, H] and gate [E, H], got {tuple(x.shape)} and {tuple(gate.shape)}")
    if gate.dtype != x.dtype:
        raise ValueError(f"the router weight's dtype {gate.dtype} must be x's {x.dtype}")
    t, h = x.shape
    e = gate.shape[0]
    counted = _check_choice(t, e, top_k, counts, counted)
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    weights = torch.empty(t, top_k, dtype=weights_dtype, device=x.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    if t:
        slice_e = slice_e or ROUTE_SLICE_E
        if slice_e < 1 or slice_e & (slice_e - 1):
            raise ValueError(f"slice_e must be a power of two, got {slice_e}")
        slices = triton.cdiv(e, slice_e)
        logits = torch.empty(t, e, dtype=torch.float32, device=x.device)
        count = counts is not None
        _route_kernel[(t, slices)](
            x, gate, logits, arrival_counters("moe_route", x.device, t), weights, ids,
            counts if count else ids, counted if count else ids, e, h, x.stride(0), gate.stride(0), slices,
            K=top_k, BLOCK_E=next_power_of_2(e), SLICE_E=slice_e,
            BLOCK_H=min(next_power_of_2(h), max(16, ROUTE_TILE // slice_e)), RENORM=bool(renormalize),
            COUNT=count, INTERPRET=interpreting(), num_warps=1 if interpreting() else ROUTE_NUM_WARPS,
            **pdl_launch(x.device))
    return weights, ids

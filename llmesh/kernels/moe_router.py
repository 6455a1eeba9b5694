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

from llmesh.kernels.common import interpreting, next_power_of_2, pdl_launch
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter

ROUTER_KERNEL_ON_CUDA = True
"""Measured on the H200 (moe_h200.json, 128 experts, top-8): 6.9 us a call at batch 1 and 7.5 at
batch 64 against the torch ops' 21.7 and 28.4; in the Qwen3-30B-A3B batch-1 decode step 1,126
kernels became 838 and the step 5.30 ms became 4.60 (kernel_profile_h200_router_on.json against
kernel_profile_h200.json as committed at fadb3fc, the same run)."""

MAX_EXPERTS = 1024
"""Experts one program holds in registers (a row of logits)."""


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
def choose_experts(x, valid, e, t, weights_ptr, ids_ptr, counts_ptr, counted_ptr, K: tl.constexpr,
                   RENORM: tl.constexpr, COUNT: tl.constexpr, INTERPRET: tl.constexpr):
    """Token t's choice from its logits x (float32 [BLOCK_E], lanes past E invalid and -inf):
    softmax, k arg-maxes, weights (renormalised under RENORM) and ids stored, counts grown."""
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(valid, p, 0.0)
    p = p / tl.sum(p, axis=0)
    # k arg-maxes name the winners in order; their ranks place every weight in one masked store.
    left = _candidates(p, valid)
    rank = tl.full(e.shape, -1, tl.int32)
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
    choose_experts(x, valid, e, t, weights_ptr, ids_ptr, counts_ptr, counted_ptr, K, RENORM, COUNT, INTERPRET)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                 counts: torch.Tensor | None = None, counted: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_softmax_ref``'s contract in one launch (CUDA-graph safe, no host read), the expert
    counts included (the torch ops spend a scatter kernel on them)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    t, e = router_logits.shape
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
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(t, top_k, dtype=weights_dtype, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=router_logits.device)
    if t:
        count = counts is not None
        _topk_softmax_kernel[(t,)](router_logits, weights, ids, counts if count else ids,
                                   counted if count else ids, e, router_logits.stride(0), K=top_k,
                                   BLOCK_E=next_power_of_2(e), RENORM=bool(renormalize), COUNT=count,
                                   INTERPRET=interpreting(), num_warps=1 if interpreting() else 4,
                                   **pdl_launch(router_logits.device))
    return weights, ids


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

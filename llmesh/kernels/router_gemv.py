"""The MoE router at one token in one CUDA C++ launch (``router_gemv`` in cuda/moe_gemv.cu).

At batch 1 an MoE layer's entry is three kernels: RMSNorm, the router's GEMV ([E, H], E logits)
and moe_router's top-k choice, which reads those logits back. Each launch costs a layer a few
microseconds on its critical path (the next kernel's wait for the one before), 48 layers deep in
Qwen3-30B-A3B. ``router`` folds the last two: the dense GEMV's rows (moe_gemv.gemv's kernel)
write the logits, and the grid's last block to arrive (an arrival counter, as split-K's) makes
moe_router's choice from them in one warp. Triton's fused entry (moe_norm_router.py) computed the
logits in a few programs a token and lost in the step; this one keeps the GEMV's warp a row.

Contract: ``moe_router.topk_softmax_ref`` on the logits rounded to bf16 (as ``linear`` then
``select_experts`` give them): the ids exactly, up to ties to the bit; the weights up to the last
bits of float32 (the sums run in another order), before rounding to the weights' dtype. Taken
where ``chosen`` says: LLMESH_CUDA_ROUTER=1 / 0 forces it on / off; by default on the devices in
MEASURED_FASTER (none: on the H100 the batch-1 Qwen3-30B-A3B step took 3.330 ms with it against
3.337 without, kernel_profile_h100_moe_b1_router_{1,0}.json at 2776b6b, within a run's spread.
The 48 launches it removes were cheap under PDL; the choice after the grid's last arrival sits
on the layer's path as moe_router's kernel did: 5.9 us a launch against the GEMV's 2.1 plus 4.1).
"""

from __future__ import annotations

import ctypes
import os

import torch

from llmesh.kernels.common import arrival_counters, cuda_device_tag, next_power_of_2, pdl_launch
from llmesh.kernels.moe_gemv import (DOWN_LOADS, MAX_PAIRS, GemvConfig, dense_config, dense_unsupported, one_row,
                                     pass_slices)

ENV = "LLMESH_CUDA_ROUTER"
"""1: a one-token router runs ``router`` wherever it can; 0: never; unset: MEASURED_FASTER."""
MEASURED_FASTER: frozenset[str] = frozenset()
"""Device tags where the batch-1 step measured faster with ``router`` than with the GEMV and
moe_router's kernel (bench/kernel_profile.py with LLMESH_CUDA_ROUTER=0 / 1)."""
MAX_EXPERTS = 256
"""Experts the choosing warp holds (8 a lane)."""
WEIGHT_DTYPES = (torch.bfloat16, torch.float32)


def instance(e: int, k: int, renormalize: bool, weights32: bool, count: bool, config: GemvConfig) -> str:
    """The template instance for E experts over a row of k: the GEMV's rows, slices and form, then
    the experts a lane of the choosing warp holds, the most pairs, and the choice's switches."""
    epl = next_power_of_2(-(-e // 32))
    return (f"router_gemv<{config.rows}, {pass_slices(k, DOWN_LOADS // config.rows)}, {int(config.early)}, {epl}, "
            f"{MAX_PAIRS}, {int(renormalize)}, {int(weights32)}, {int(count)}>")


def unsupported(x: torch.Tensor, w: torch.Tensor, top_k: int, weights_dtype: torch.dtype) -> str | None:
    """Why ``router`` cannot choose for x [1, H] through the router w [E, H], or None."""
    if (why := dense_unsupported(x, w)) is not None:
        return why
    e = w.shape[0]
    if e > MAX_EXPERTS:
        return f"at most {MAX_EXPERTS} experts (got {e})"
    if not 1 <= top_k <= min(e, MAX_PAIRS):
        return f"1 to {min(e, MAX_PAIRS)} experts a token (got {top_k})"
    if weights_dtype not in WEIGHT_DTYPES:
        return f"bf16 or float32 routing weights (got {weights_dtype})"
    return None


def chosen(x: torch.Tensor, w: torch.Tensor, top_k: int, weights_dtype: torch.dtype) -> bool:
    """Whether the triton op table runs this one-token router here (ENV, else MEASURED_FASTER)."""
    if x.numel() != x.shape[-1] or not x.is_cuda:
        return False
    forced = os.environ.get(ENV, "").strip()
    if forced == "0" or (forced != "1" and cuda_device_tag(x.device) not in MEASURED_FASTER):
        return False
    return unsupported(x, w, top_k, weights_dtype) is None


def router(x: torch.Tensor, w: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
           counts: torch.Tensor | None = None, counted: torch.Tensor | None = None, *,
           config: GemvConfig | None = None, pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, H] (bf16) through the router w [E, H] (bf16), then the top-k choice → (weights [1, k]
    in weights_dtype, ids int64 [1, k]); with ``counts`` (int64 [E]) and ``counted`` (int64 [1]),
    each chosen expert's count grows by ``counted`` (moe_router.topk_softmax_ref's contract)."""
    from llmesh.kernels import cuda_rtc

    if (why := unsupported(x, w, top_k, weights_dtype)) is not None:
        raise ValueError(f"router: {why}")
    if (counts is None) != (counted is None):
        raise ValueError("router: counts and counted come together")
    e, k = w.shape
    if counts is not None and (counts.dtype != torch.int64 or counts.shape != (e,) or not counts.is_contiguous()
                               or counted.dtype != torch.int64 or counted.numel() != 1):
        raise ValueError(f"router: counts must be a contiguous int64 [{e}] and counted an int64 [1], got "
                         f"{counts.dtype} {tuple(counts.shape)} and {counted.dtype} {tuple(counted.shape)}")
    config = config or dense_config(cuda_device_tag(x.device), e, k)
    row = one_row(x)
    logits = torch.empty(e, dtype=x.dtype, device=x.device)
    weights = torch.empty(1, top_k, dtype=weights_dtype, device=x.device)
    ids = torch.empty(1, top_k, dtype=torch.int64, device=x.device)
    count = counts is not None
    name = instance(e, k, renormalize, weights_dtype == torch.float32, count, config)
    kernel = cuda_rtc.load("moe_gemv.cu", name, x.device)
    if pdl is None:
        pdl = pdl_launch(x.device)["PDL"]
    counter = arrival_counters("router_gemv", x.device, 1)
    null = ctypes.c_void_p(0)
    warps = -(-e // config.rows)
    kernel.launch((-(-warps // config.warps), 1, 1), 32 * config.warps, 0,
                  [row, w, logits, counter, weights, ids, counts if count else null,
                   counted.reshape(1) if count else null, e, k, top_k], pdl=pdl)
    return weights, ids

"""Int4Weight through the swapped-operand W4A16 kernel (llmesh/kernels/w4a16_swapped.py) where the
measured table picks it (llmesh/kernels/quant_gemm_tuned.json entries ``["swapped", ["m,n,k,split,
warps,stages"]]``, from bench/quant_gemm.py's sweep, which times it beside our other kernels and
the libraries'). The kernel reads the codes transposed, K contiguous, so a weight it serves keeps
that copy (as many bytes as its codes) beside its own; the copy is made once after the model
loads (``linear.prepare_library_weights``), before the KV pool takes its share of memory."""

from __future__ import annotations

import torch

from llmesh.engine.quant.packed import Int4Weight

_CACHE = "_swapped_codes"


def supported(w: Int4Weight, m: int) -> bool:
    """Whether the kernel can serve ``m`` rows of this weight (CUDA; its group steps hold whole
    16-row dot tiles)."""
    from llmesh.kernels.w4a16_swapped import MAX_M

    return w.qweight.is_cuda and w.group_size % 16 == 0 and 0 < m <= MAX_M


def codes(w: Int4Weight) -> torch.Tensor:
    """The weight's codes as the kernel reads them (uint8 [N, Kp / 2]), cached on the weight."""
    from llmesh.kernels.w4a16_swapped import swap_codes

    cached = w.__dict__.get(_CACHE)
    if cached is None:
        cached = w.__dict__[_CACHE] = swap_codes(w.qweight)
    return cached


def copy_bytes(w: Int4Weight) -> int:
    cached = w.__dict__.get(_CACHE)
    return 0 if cached is None else cached.numel() * cached.element_size()


def swapped_matmul(x: torch.Tensor, w: Int4Weight, config: str) -> torch.Tensor | None:
    """x [M, K] @ W → [M, N] through the swapped kernel with the table's config, or None where it
    cannot serve these rows (the caller's default path then does)."""
    from llmesh.kernels.w4a16_swapped import parse_config, w4a16_swapped

    if not supported(w, x.shape[0]):
        return None
    cfg = parse_config(config)
    if w.group_size % cfg.block_k:
        return None  # a config measured at another group size: its K step would straddle groups
    return w4a16_swapped(x, codes(w), w.scales, w.mins, w.group_size, config=cfg)

"""Int4Weight through the CUDA C++ fragment-order W4A16 kernel (kernels/w4a16_mma.py) where the
measured table picks it (kernels/quant_gemm_tuned.json entries ``["mma", ["wn,wk,stages,split"]]``,
from bench/quant_gemm.py's sweep, which times it beside our other kernels and the libraries').
The kernel reads the codes in mma.sync's fragment order and the scales and mins interleaved per
lane, so a weight it serves keeps that copy (as many bytes as its codes, scales and mins)
beside its own; the copy is made once after the model loads (``linear.prepare_library_weights``),
before the KV pool takes its share of memory."""

from __future__ import annotations

import torch

from llmesh.engine.quant.packed import Int4Weight

_CACHE = "_mma_layout"


def supported(w: Int4Weight, x: torch.Tensor) -> bool:
    """Whether the kernel can serve ``x`` times this weight (CUDA, bf16 rows, N a multiple of 64,
    a group of 16-256 rows)."""
    from llmesh.kernels.w4a16_mma import MAX_M, unsupported

    return (w.qweight.is_cuda and 0 < x.shape[0] <= MAX_M
            and unsupported(x, w.out_features, w.group_size) is None)


def layout(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) as the kernel reads them, made once and cached on the weight."""
    from llmesh.kernels.w4a16_mma import pack_codes, pack_scales

    cached = w.__dict__.get(_CACHE)
    if cached is None:
        cached = w.__dict__[_CACHE] = (pack_codes(w.codes()), pack_scales(w.scales.half(), w.mins.half()))
    return cached


def copy_bytes(w: Int4Weight) -> int:
    cached = w.__dict__.get(_CACHE)
    return 0 if cached is None else sum(t.numel() * t.element_size() for t in cached)


def mma_matmul(x: torch.Tensor, w: Int4Weight, config: str) -> torch.Tensor | None:
    """x [M, K] @ W → [M, N] through the kernel with the table's config, or None where it cannot
    serve these rows (the caller's default path then does)."""
    from llmesh.kernels.w4a16_mma import parse_config, w4a16_mma

    if not supported(w, x):
        return None
    codes, scales = layout(w)
    return w4a16_mma(x, codes, scales, w.group_size, config=parse_config(config))

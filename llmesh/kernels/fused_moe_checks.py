"""fused_moe's argument checks: the stacked expert layouts it takes (float, INT8 / FP8 with
per-row scales, FP8 with block scales, INT4 codes with group scales and mins; llmesh/kernels/fused_moe.py's docstring),
each violation a ValueError naming the argument and what it should be."""

from __future__ import annotations

import torch

from llmesh.kernels.common import check_last_dim_contiguous, check_size, check_tensor

QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn)
"""Expert weight types that carry per-row scales."""


def check_layouts(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, w13_min, w2_min, weight_block=None
                  ) -> tuple[int, int, int, int, int]:
    """Returns (T, H, E, I, k) after checking the stacked layouts against x."""
    check_tensor("x", x, "[T, H]", 2)
    device = x.device
    t, h = x.shape
    if weight_block is not None:
        e, inter = check_blocks(h, w13, w2, w13_scale, w2_scale, weight_block, device)
    elif w13.dtype == torch.uint8:
        e, inter = check_int4(h, w13, w2, w13_scale, w2_scale, w13_min, w2_min, device)
    else:
        e, inter = check_rows(h, x.dtype, w13, w2, w13_scale, w2_scale, device)
    if w13.dtype != torch.uint8 and (w13_min is not None or w2_min is not None):
        raise ValueError("mins are for INT4 (uint8) experts")
    check_tensor("topk_ids", topk_ids, "[T, k]", 2, (torch.int32, torch.int64), device=device)
    check_tensor("topk_weights", topk_weights, "[T, k]", 2, device=device)
    check_size("topk_ids", "shape", tuple(topk_ids.shape), tuple(topk_weights.shape), "topk_weights' shape")
    check_size("topk_ids", "T", topk_ids.shape[0], t, "x's rows")
    if w2.dtype != w13.dtype:
        raise ValueError(f"w13 is {w13.dtype} and w2 is {w2.dtype}; both experts' weights need one type")
    for name, tensor in (("x", x), ("w13", w13), ("w2", w2)):
        check_last_dim_contiguous(name, tensor)
    return t, h, e, inter, topk_ids.shape[1]


def _stacked(h, w13, w2, wdtypes, device, rows_multiple: int = 1) -> tuple[int, int]:
    """(E, I) of row-major stacked experts w13 [E, 2I, H], w2 [E, H, I] of one of ``wdtypes``, I a
    multiple of ``rows_multiple``."""
    check_tensor("w13", w13, "[E, 2I, H]", 3, wdtypes, device=device)
    check_tensor("w2", w2, "[E, H, I]", 3, wdtypes, device=device)
    e, two_i, _ = w13.shape
    check_size("w13", "H", w13.shape[2], h, "x's columns")
    if two_i % (2 * rows_multiple):
        blocks = f" with I a multiple of the block's {rows_multiple} rows" if rows_multiple > 1 else ""
        raise ValueError(f"w13 must stack gate and up rows (2I){blocks}, got {two_i} rows")
    inter = two_i // 2
    check_size("w2", "shape", tuple(w2.shape), (e, h, inter), "[E, H, I] of w13's E, x's H and w13's I")
    return e, inter


def check_rows(h, act_dtype, w13, w2, w13_scale, w2_scale, device) -> tuple[int, int]:
    """Float, int8 or E4M3 experts: w13 [E, 2I, H], w2 [E, H, I] (+ per-row scales)."""
    int8 = w13.dtype in QUANTIZED_DTYPES
    e, inter = _stacked(h, w13, w2, QUANTIZED_DTYPES if int8 else (act_dtype,), device)
    two_i = 2 * inter
    if int8:
        if w13_scale is None or w2_scale is None:
            raise ValueError("int8 / fp8 experts need w13_scale [E, 2I] and w2_scale [E, H]")
        check_tensor("w13_scale", w13_scale, "[E, 2I]", 2, (torch.float32, torch.float16), device=device)
        check_tensor("w2_scale", w2_scale, "[E, H]", 2, (torch.float32, torch.float16), device=device)
        check_size("w13_scale", "shape", tuple(w13_scale.shape), (e, two_i), "one scale per w13 row")
        check_size("w2_scale", "shape", tuple(w2_scale.shape), (e, h), "one scale per w2 row")
    elif w13_scale is not None or w2_scale is not None:
        raise ValueError("scales are for int8 / fp8 / int4 experts; these weights are float")
    return e, inter


def check_blocks(h, w13, w2, w13_scale, w2_scale, block, device) -> tuple[int, int]:
    """Block-scaled E4M3 experts: w13 [E, 2I, H], w2 [E, H, I], float32 scales per (BN, BK)
    block [E, rows / BN, K / BK] (rounded up); gate and up meet on a block boundary (BN | I)."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and b >= 16 and b & (b - 1) == 0 for b in block)):
        raise ValueError(f"weight_block must be two powers of two >= 16 (BN, BK), got {block!r}")
    bn, bk = block
    e, inter = _stacked(h, w13, w2, (torch.float8_e4m3fn,), device, rows_multiple=bn)
    for name, scale, rows, k in (("w13_scale", w13_scale, 2 * inter, h), ("w2_scale", w2_scale, h, inter)):
        if scale is None:
            raise ValueError("block-scaled experts need w13_scale and w2_scale [E, rows / BN, K / BK]")
        check_tensor(name, scale, "[E, rows / BN, K / BK]", 3, (torch.float32,), device=device)
        check_last_dim_contiguous(name, scale)
        check_size(name, "shape", tuple(scale.shape), (e, -(-rows // bn), -(-k // bk)), f"one per {bn}x{bk} block")
    return e, inter


def check_int4(h, w13, w2, w13_scale, w2_scale, w13_min, w2_min, device) -> tuple[int, int]:
    """INT4 experts: codes w13 [E, Kp(H) / 2, 2I], w2 [E, Kp(I) / 2, H] and float16 scales and
    mins [E, Kp / G, N] of each (the module docstring's layout)."""
    check_tensor("w13", w13, "[E, Kp/2, 2I]", 3, (torch.uint8,), device=device)
    check_tensor("w2", w2, "[E, Kp/2, H]", 3, (torch.uint8,), device=device)
    e, _, two_i = w13.shape
    if two_i % 2:
        raise ValueError(f"w13 must hold gate and up columns (2I), got {two_i}")
    inter = two_i // 2
    check_size("w2", "E x H", (w2.shape[0], w2.shape[2]), (e, h), "w13's E and x's H")
    for name, codes, scale, low, k in (("w13", w13, w13_scale, w13_min, h), ("w2", w2, w2_scale, w2_min, inter)):
        if scale is None or low is None:
            raise ValueError("INT4 experts need w13_scale, w13_min, w2_scale and w2_min [E, Kp / G, N]")
        for part, t in (("scale", scale), ("min", low)):
            check_tensor(f"{name}_{part}", t, "[E, Kp/G, N]", 3, (torch.float16,), device=device)
            check_last_dim_contiguous(f"{name}_{part}", t)
        kp, groups = 2 * codes.shape[1], scale.shape[1]
        if kp < k or groups == 0 or groups % 2 or kp % groups:  # each half of Kp holds whole groups
            raise ValueError(f"{name}: codes for {kp} input rows in {groups} groups do not hold {k} rows in the "
                             f"halves layout (Kp a multiple of 2 G, Int4Weight's)")
        if (kp // groups) % 16:
            raise ValueError(f"{name}: groups of {kp // groups} input rows; the kernel's K steps (multiples of 16) "
                             f"must fit whole in a group")
        check_size(f"{name}_scale", "shape", tuple(scale.shape), (e, scale.shape[1], codes.shape[2]),
                   f"{name}'s E and N")
        check_size(f"{name}_min", "shape", tuple(low.shape), tuple(scale.shape), f"{name}_scale's shape")
    return e, inter

"""Int4Weight and Int8Weight through the CUDA C++ fragment-order kernel (llmesh/kernels/w4a16_mma.py)
where the measured table picks it (llmesh/kernels/quant_gemm_tuned.json entries ``["mma", ["wn,wk,
stages,split[,bulk[,rows[,xload]]]"]]`` from bench/quant_gemm.py's sweep, which times it beside
our other kernels and the libraries'); where the table's ``+silu_mul`` entry picks it, a down
projection takes its input as [gate | up] and makes silu(gate) * up itself (``act``,
linear.silu_mul_matmul; bench/quant_act.py measures both ways), and where the ``+rmsnorm`` entry
picks it, a qkv or gate/up projection takes the un-normalised hidden state and its residual and
makes rmsnorm(x + residual) itself (linear.norm_matmul). The kernel reads the codes in
mma.sync's fragment order (an 8-bit weight as two nibble planes) and the scales and mins
interleaved per lane, so a weight it serves keeps that copy (as many bytes as its codes, scales
and mins) beside its own; the copy is made once after the model loads
(``linear.prepare_library_weights``), before the KV pool takes its share of memory.

W4A8 weights go through the kernel's W4A8 instance (llmesh/kernels/w4a8_mma.py) where the table's
``w4a8`` entries pick ``mma`` (bench/quant_w4a8_sweep.py times it beside FBGEMM's kernel, the
format's default): their copy is laid out from the codes before FBGEMM's in-place shuffle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llmesh.engine.quant.packed import Int4Weight, Int8Weight, W4A8Weight
from llmesh.kernels.w4a16_mma import (MAX_M, int8_group, int8_scales, pack_codes, pack_codes_int8, pack_scales,
                                      parse_config, shape_unsupported, unsupported, w4a16_mma)
from llmesh.kernels.w4a8_mma import (int_rounding_exact, kernel_k, pack_w4a8_codes, pack_w4a8_scales, scales_fit,
                                     w4a8_mma)
from llmesh.kernels.w4a8_mma import unsupported as w4a8_unsupported

_CACHE = "_mma_layout"
_FITS = "_mma_scales_fit"
FP16_MIN_NORMAL = 2.0 ** -14
INT8_MAX_SCALE = 511.0
"""The kernel reads scales and mins as float16: an int8 weight's float32 scale is taken only
where float16 holds it to full precision (no subnormals) and its min, -128 s, in range."""


@dataclass(frozen=True)
class MmaLayout:
    codes: torch.Tensor
    """int32 [N/64, Kp/16, 32, 4] (4-bit) or [N/64, Kp/16, 2, 32, 4] (8-bit as two planes)"""
    scales: torch.Tensor
    """float16 [N/64, Kp/G, 8, 4, 2, 2]"""
    group: int
    """the kernel's group (an int8 weight's per-channel scale repeats every 128 rows)"""
    int_round: bool = False
    """W4A8: the integer rounding of products (MmaConfig.round 1) is exact for these scales"""


def _group(w: Int4Weight | Int8Weight) -> int | None:
    return w.group_size if isinstance(w, Int4Weight) else int8_group(w.group_size, w.in_features)


def can_lay_out(w) -> bool:
    """Whether the kernel takes this weight at all (its layout can be made): int4 or int8 with a
    group it handles, N a multiple of 64, K of 8, scales that float16 holds (``_scales_fit``)."""
    if not isinstance(w, (Int4Weight, Int8Weight)) or (group := _group(w)) is None:
        return False
    return shape_unsupported(w.out_features, w.in_features, group) is None and _scales_fit(w)


def _scales_fit(w: Int4Weight | Int8Weight) -> bool:
    """Int4Weight's scales are float16 already; an Int8Weight's (float32 from quantize-on-load)
    must fit float16 as the module says. Checked once (a device sync) and cached on the weight:
    ``linear.prepare_library_weights`` asks before any CUDA graph is captured."""
    if isinstance(w, Int4Weight):
        return True
    fits = w.__dict__.get(_FITS)
    if fits is None:
        s = w.scales.float().abs()
        nonzero = s[s > 0]
        fits = w.__dict__[_FITS] = bool(s.max() <= INT8_MAX_SCALE) and (
            nonzero.numel() == 0 or bool(nonzero.min() >= FP16_MIN_NORMAL))
    return fits


def supported(w: Int4Weight | Int8Weight, x: torch.Tensor, act: str | None = None) -> bool:
    """Whether the kernel can serve ``x`` times this weight (CUDA, bf16 rows, N a multiple of 64,
    a group of 16-256 rows; an int8 weight's group a multiple of 16 up to 128 or of 128 past);
    with ``act="silu_mul"``, x is [gate | up] of twice the weight's input width."""
    if not isinstance(w, (Int4Weight, Int8Weight)) or (group := _group(w)) is None:
        return False
    silu = act == "silu_mul"
    k = x.shape[1] // 2 if silu else x.shape[1]
    if silu and x.shape[1] != 2 * w.in_features:
        return False
    return (w.qweight.is_cuda and 0 < x.shape[0] <= MAX_M and unsupported(x, w.out_features, group, k) is None
            and _scales_fit(w))


def layout(w: Int4Weight | Int8Weight) -> MmaLayout:
    """The kernel's copy of the weight, made once and cached on it."""
    cached = w.__dict__.get(_CACHE)
    if cached is None:
        if isinstance(w, Int4Weight):
            cached = MmaLayout(pack_codes(w.codes()), pack_scales(w.scales.half(), w.mins.half()), w.group_size)
        else:
            group = _group(w)
            k = w.in_features
            kp = -(-k // (2 * group)) * 2 * group  # the kernel's K: whole pairs of groups
            cached = MmaLayout(pack_codes_int8(w.qweight, kp), int8_scales(w.scales, w.group_size, k, kp), group)
        w.__dict__[_CACHE] = cached
    return cached


def cached_layout(w: Int4Weight | Int8Weight | W4A8Weight) -> MmaLayout | None:
    """The kernel's copy if `layout` has made it (prepare_library_weights does at load), else None."""
    return w.__dict__.get(_CACHE)


def copy_bytes(w: Int4Weight | Int8Weight | W4A8Weight) -> int:
    cached = cached_layout(w)
    return 0 if cached is None else sum(t.numel() * t.element_size() for t in (cached.codes, cached.scales))


def mma_matmul(x: torch.Tensor, w: Int4Weight | Int8Weight, config: str, act: str | None = None
               ) -> torch.Tensor | None:
    """x [M, K] @ W → [M, N] through the kernel with the table's config (``act="silu_mul"``: x
    is [M, 2K], gate then up, and the product is silu(gate) * up @ W), or None where it cannot
    serve these rows (the caller's default path then does)."""
    if act == "rmsnorm":
        raise ValueError("mma_matmul: the fused norm goes through norm_mma_matmul")
    if not supported(w, x, act):
        return None
    lay = layout(w)
    return w4a16_mma(x, lay.codes, lay.scales, lay.group, config=parse_config(config), act=act)


def norm_mma_matmul(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    w: Int4Weight | Int8Weight, config: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rmsnorm(x + residual) @ W, x + residual) in one launch, rounded as rmsnorm then the plain
    kernel (without a residual the second is x itself), or None where the kernel cannot serve
    these rows."""
    if (not supported(w, x) or x.shape[1] != w.in_features or norm_weight.dtype != x.dtype
            or (residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape))):
        return None
    lay = layout(w)
    res_out = None
    if residual is not None:
        if not residual.is_contiguous() or residual.data_ptr() % 16:  # rows read as 16-byte vectors
            residual = residual.clone(memory_format=torch.contiguous_format)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = w4a16_mma(x, lay.codes, lay.scales, lay.group, config=parse_config(config), act="rmsnorm",
                  norm=(norm_weight, eps), residual=residual, residual_out=res_out)
    return y, x if res_out is None else res_out


def w4a8_can_lay_out(w: W4A8Weight) -> bool:
    """Whether the W4A8 instance takes this weight: codes still readable (not yet shuffled for
    FBGEMM), N a multiple of 64, K of 8, a group of 16-256 rows, group scales it holds exactly."""
    return (isinstance(w, W4A8Weight) and not w.shuffled
            and shape_unsupported(w.out_features, w.in_features, w.group_size) is None and scales_fit(w.group_scales))


def w4a8_layout(w: W4A8Weight) -> MmaLayout:
    """The W4A8 instance's copy of the codes and group scales (u = q + 8; g and -1032 g), made
    once, before FBGEMM's shuffle, and cached on the weight."""
    cached = w.__dict__.get(_CACHE)
    if cached is None:
        kp = kernel_k(w.in_features, w.group_size)
        cached = MmaLayout(pack_w4a8_codes(w.codes(), kp), pack_w4a8_scales(w.group_scales, w.group_size, kp),
                           w.group_size, int_rounding_exact(w.group_scales))
        w.__dict__[_CACHE] = cached
    return cached


def w4a8_mma_matmul(rows, w: W4A8Weight, config: str) -> torch.Tensor | None:
    """Per-token FP8 rows (fp8_gemm.Fp8Rows) @ a W4A8 weight → [M, N] bf16 through the W4A8
    instance with the table's config (its integer rounding only where this weight's scales make
    it exact: the conversions otherwise), or None where it cannot serve them (no copy was made at
    load, or too many rows): the caller's FBGEMM path then does."""
    lay = cached_layout(w)
    if (lay is None or not 0 < rows.xq.shape[0] <= MAX_M
            or w4a8_unsupported(rows.xq, w.out_features, w.group_size) is not None):
        return None
    cfg = parse_config(config)
    if cfg.round and not lay.int_round:
        cfg = dataclasses.replace(cfg, round=0)
    return w4a8_mma(rows.xq, rows.scale, lay.codes, lay.scales, w.scales, w.group_size, config=cfg)

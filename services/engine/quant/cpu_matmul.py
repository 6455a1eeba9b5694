"""Packed weights on the CPU without expanding them on every step.

The torch backend's reference for a packed weight dequantizes all of W every step: on the
CPU that reads four bytes per weight (more than a float32 model does) and spends the step
expanding it, so a quantized model ran slower than the float32 one it came from. Here each
weight is prepared once, on first use, and the copy kept beside it:

- bfloat16 activations: PyTorch's packed CPU kernels, which read the packed bytes and
  accumulate in float32. ``_weight_int8pack_mm`` takes INT8 with one scale per output
  channel (quantize-on-load INT8); ``_weight_int4pack_mm_for_cpu`` (the CPU twin of
  gpt-fast's tinygemm) takes 4-bit groups of 32-256 with a scale and a zero point,
  ``w = (q - 8) * scale + zero`` — our Int4Weight's ``w = q * s + m`` (every 4-bit source:
  INT4/AWQ/GPTQ, GGUF Q4_0/Q4_1) with ``zero = m + 8 s``. INT8 in 32-value groups (GGUF
  Q8_0) has no such kernel and is expanded once to bfloat16.
- float32 activations: those kernels have only a scalar float32 path, several times slower
  than a float32 dense GEMV, so W is expanded once to float32 and stored as a dense float32
  weight is (``cpu_layout``): bit for bit what the model dequantized to float32 at load
  computes, at its speed (and its memory, on top of the packed weight). Kept [K, N] as
  ``dequantize()`` returns it, the down projection (K > N) took 487 us a GEMV against 314
  stored [N, K] (cpu_linear_cpu.json), about 5 ms of a 30-layer step.

Float32 GEMMs, dense or expanded (measured on a 2-core AVX2 EPYC with ``bench/cpu_linear.py``):
MKL's sgemm reads a weight with more outputs than inputs (N >= K) up to 2x faster stored
[K, N] than in the [N, K] of a checkpoint at one row, but takes 2-4x its one-row time at
2-16 rows (a verify step, a small batch), where oneDNN's prepacked weights are 1.5-3x faster
and about as fast from there up. So a float32
weight is stored [K, N] (``cpu_layout``: a transposed view, same shape, which F.linear hands
to MKL as is) for the one-row steps, and gets a oneDNN-packed copy for the others.

Expanded and packed copies (float32, bfloat16 for Q8_0, oneDNN's) are bounded: once they
would pass a quarter of the machine's memory (``EXPAND_BUDGET_FRAC``), further weights keep
the per-step dequantizing reference or MKL, so a large model still fits where it did.
Other formats (FP8) return None and the caller keeps the dequantizing reference.
"""

from __future__ import annotations

import os

import torch

from llmesh.engine.quant.packed import Int4Weight, Int8Weight, QuantizedWeight

INT4_CPU_GROUPS = (32, 64, 128, 256)
"""Group sizes the CPU int4 kernel takes."""

_CACHE = "_cpu_pack"

EXPAND_BUDGET_FRAC = 0.25
"""Share of physical memory that expanded copies of packed weights may take, in all."""

_expanded_bytes = 0


def _may_expand(nbytes: int) -> bool:
    global _expanded_bytes
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    if _expanded_bytes + nbytes > EXPAND_BUDGET_FRAC * total:
        return False
    _expanded_bytes += nbytes
    return True


ONEDNN_MIN_ROWS = 2
"""From this many rows up, float32 GEMMs use oneDNN's prepacked weight (MKL below)."""

_ONEDNN = "_llmesh_onednn"


def cpu_layout(w: torch.Tensor) -> torch.Tensor:
    """A float32 weight [N, K] on the CPU with N >= K, stored [K, N] behind the same shape and
    values: MKL's one-row GEMV is fastest with the longer dimension contiguous (1.1-2x on the
    demo's qkv, o, gate_up and LM head; its down projection, K > N, is faster as it is).
    Other weights as they are."""
    if (w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2 or w.stride(0) == 1
            or w.shape[0] < w.shape[1]):
        return w
    return w.t().contiguous().t()


def _version(w: torch.Tensor) -> int:
    try:
        return w._version
    except RuntimeError:  # an inference tensor: it cannot be written in place outside inference mode
        return 0


def _onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's prepacked float32 copy of a weight [N, K] (any strides; a bfloat16 one widened,
    exactly), made once and again after W is written in place (a weight reload); None where
    this PyTorch has no oneDNN linear or the copy would pass the memory budget."""
    version, packed = w.__dict__.get(_ONEDNN, (None, None))
    if version != _version(w):
        charged = packed is not None and packed is not False  # a repack reuses the budget it took
        packed = False
        if torch.backends.mkldnn.is_available() and (charged or _may_expand(w.numel() * 4)):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.float(), 4)
            except (RuntimeError, AttributeError):  # a build or CPU without this oneDNN path
                packed = False
        w.__dict__[_ONEDNN] = (_version(w), packed)
    return packed if packed is not False else None


def cpu_dense_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [M, K] @ W[N, K]^T (+ bias) → [M, N] through oneDNN when M >= ONEDNN_MIN_ROWS; None
    (the caller uses F.linear) for one row, other dtypes or no oneDNN.

    bfloat16 goes through the float32 copy too: without AVX-512 BF16, PyTorch's bfloat16 GEMM
    takes 3-8x its one-row time at 2-16 rows, and it accumulates in float32 anyway, so the
    widened product differs from it by summation order only (rounded to bfloat16 the same way).
    """
    if x.shape[0] < ONEDNN_MIN_ROWS or x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != x.dtype:
        return None
    packed = _onednn_pack(w)
    if packed is None:
        return None
    if x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    b = None if bias is None else bias.float()
    return torch.ops.mkldnn._linear_pointwise(x.float(), packed, b, "none", [], "").to(x.dtype)


def _int8_pack(w: Int8Weight, dtype: torch.dtype) -> tuple | None:
    if w.group_size != w.in_features:
        # Grouped (GGUF Q8_0, e.g. the demo's tied embedding / LM head): the int8 kernel takes
        # one scale per channel only, so keep W expanded to bfloat16 (half of float32's bytes,
        # and bfloat16 GEMMs are vectorized) rather than expanding it on every step.
        if not _may_expand(w.in_features * w.out_features * 2):
            return None
        return ("dense", w.dequantize().t().to(dtype).contiguous())  # [N, K]
    return ("int8", w.qweight.t().contiguous(), w.scales[0].to(dtype).contiguous())  # [N, K], [N]


def _int4_pack(w: Int4Weight, dtype: torch.dtype) -> tuple | None:
    if w.group_size not in INT4_CPU_GROUPS:
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes().t().contiguous().to(torch.int32), 1)
    scale_zero = torch.stack([w.scales.float(), w.signed_zeros()], dim=-1).to(dtype).contiguous()  # [Kp / G, N, 2]
    return ("int4", packed, scale_zero, w.padded_in_features)


def _pack(w: QuantizedWeight, dtype: torch.dtype) -> tuple | None:
    if not isinstance(w, (Int8Weight, Int4Weight)):
        return None
    if dtype == torch.float32:
        if not _may_expand(w.in_features * w.out_features * 4):
            return None
        return ("dense", cpu_layout(w.dequantize().t().contiguous()))  # [N, K], as a dense weight
    if isinstance(w, Int8Weight):
        return _int8_pack(w, dtype)
    return _int4_pack(w, dtype)


def cpu_packed_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor | None:
    """x [M, K] (float32 or bfloat16, on the CPU) @ W → [M, N], or None when W's format has
    no CPU path here."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return None
    cache: dict = w.__dict__.setdefault(_CACHE, {})
    if x.dtype not in cache:
        cache[x.dtype] = _pack(w, x.dtype)
    pack = cache[x.dtype]
    if pack is None:
        return None
    if pack[0] == "dense":  # an expanded copy (float32, or Q8_0's bfloat16), used as a dense weight is
        y = cpu_dense_matmul(x, pack[1])
        return torch.nn.functional.linear(x, pack[1]) if y is None else y
    x = x.contiguous()
    if pack[0] == "int8":
        return torch.ops.aten._weight_int8pack_mm(x, pack[1], pack[2])
    _, packed, scale_zero, kp = pack
    if isinstance(w, Int4Weight) and w.perm is not None:
        x = x.index_select(1, w.perm)  # act-order: the packed rows are stored sorted by group
    if x.shape[1] < kp:  # Kp's padding rows hold q = 0; zero activations make them add nothing
        x = torch.nn.functional.pad(x, (0, kp - x.shape[1]))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, w.group_size, scale_zero)

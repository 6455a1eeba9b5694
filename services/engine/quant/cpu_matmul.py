"""Packed weights on the CPU without expanding them on every step.

The torch backend's reference for a packed weight dequantizes all of W every step: on the
CPU that reads four bytes per weight (more than a float32 model does) and spends the step
expanding it, so a quantized model ran slower than the float32 one it came from. Here each
weight is prepared once (when the model loads, for the copies ``calibrate`` times; on first
use otherwise) and the copy kept beside it:

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

Dense GEMMs (float32, bfloat16, and the expanded copies): MKL (F.linear) or oneDNN's
prepacked copy of W, chosen per weight shape and row count by measurement on the host
(``calibrate``, run once on the model's own weights after it loads). Hosts disagree: on a
2-core AVX2 EPYC MKL's one-row float32 GEMV read a weight stored [K, N] up to 2x faster than
[N, K], and oneDNN was 1.5-3x faster than MKL at 2-16 rows (``bench/cpu_linear.py``); on a
2-core AVX-512 BF16 EPYC oneDNN won at every row count, one row included (float32 1.1-1.4x
MKL's best layout), and its packed bfloat16 copy ran at twice MKL's bfloat16 speed (the
demo's tied LM head 3.4 against 6.0 ms a row).
A float32 weight is still stored [K, N] where N >= K (``cpu_layout``), MKL's better layout;
weights too small to leave the caches keep the rule the AVX2 host measured (MKL for one row,
oneDNN from two).

Expanded and packed copies (float32, bfloat16 for Q8_0, oneDNN's) are bounded: once they
would pass a quarter of the machine's memory (``EXPAND_BUDGET_FRAC``), further weights keep
the per-step dequantizing reference or MKL, so a large model still fits where it did.
Other formats (FP8) return None and the caller keeps the dequantizing reference.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable

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
"""Uncalibrated (see ``calibrate``): from this many rows up, dense GEMMs use oneDNN's
prepacked weight, MKL below."""

_ONEDNN = "_llmesh_onednn"

ROW_BUCKETS = (1, 8)
"""Row counts ``calibrate`` times: one row (one stream's decode step) and a few (a verify
step, a small batch); every M >= 2 takes the second bucket's choice."""

CALIBRATE_MIN_BYTES = 16 << 20
"""Weights of one shape that take less than this stay on the uncalibrated rule: they sit in
the caches, where the choice saves little and would only make numerics depend on timing."""

CALIBRATE_SAMPLE_BYTES = 96 << 20
"""Each candidate is timed over this many bytes of a shape's weights (all of them if fewer),
cycled, so they stream from memory as in a step, not from the caches."""

CALIBRATE_MARGIN = 1.05
"""A measured path replaces the fixed rule's only when it is this much faster: the host's
run-to-run spread is several percent, and a near tie flipping between runs would only make
the numerics depend on it."""

_CHOICE: dict[tuple, str] = {}
"""(dtype, N, K, K-major, row bucket) → the measured fastest: 'mkl' (F.linear on the stored
weight), 'onednn' (oneDNN's copy packed in the activations' dtype), 'onednn_f32' (bfloat16
widened to a float32 copy)."""


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


def _onednn_pack(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """oneDNN's prepacked copy of a weight [N, K] (any strides) in ``dtype`` (a bfloat16 one
    widened to float32 exactly, or packed as it is), made once and again after W is written
    in place (a weight reload); None where this PyTorch or CPU has no such oneDNN linear or
    the copy would pass the memory budget."""
    packs = w.__dict__.setdefault(_ONEDNN, {})
    version, packed = packs.get(dtype, (None, None))
    if version != _version(w):
        w.__dict__.pop(_RESOLVED, None)  # memos of the old copy: stale, and they would keep it alive
        charged = packed is not None and packed is not False  # a repack reuses the budget it took
        packed = False
        if torch.backends.mkldnn.is_available() and (charged or _may_expand(w.numel() * dtype.itemsize)):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), 4)
            except (RuntimeError, AttributeError):  # a build or CPU without this oneDNN path
                packed = False
        packs[dtype] = (_version(w), packed)
    return packed if packed is not False else None


def _new_plan_epoch() -> None:
    global _plan_epoch
    _plan_epoch += 1


def _drop_onednn_pack(w: torch.Tensor, dtype: torch.dtype) -> None:
    """Free a copy no measured choice uses, and give its bytes back to the budget."""
    global _expanded_bytes
    _new_plan_epoch()
    w.__dict__.pop(_RESOLVED, None)  # its memo would keep the dropped copy alive
    _, packed = w.__dict__.get(_ONEDNN, {}).pop(dtype, (None, None))
    if packed is not None and packed is not False:
        _expanded_bytes -= w.numel() * dtype.itemsize


def _choice_key(x: torch.Tensor, w: torch.Tensor) -> tuple:
    return (x.dtype, w.shape[0], w.shape[1], w.stride(0) == 1, 0 if x.shape[0] == 1 else 1)


def _default_choice(dtype: torch.dtype, rows: int) -> str:
    if rows < ONEDNN_MIN_ROWS:
        return "mkl"
    return "onednn" if dtype == torch.float32 else "onednn_f32"


def run_gemm_path(choice: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ W^T (+ bias) the way ``choice`` says; None for 'mkl' or a oneDNN copy it cannot have."""
    if choice == "mkl":
        return None
    pack_dtype = torch.float32 if choice == "onednn_f32" else x.dtype
    packed = _onednn_pack(w, pack_dtype)
    if packed is None:
        return None
    if pack_dtype == x.dtype:
        b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        # The checks before each call cost more than some of these GEMVs' Python: no no-op copy.
        return torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), packed, b,
                                                  "none", [], "")
    b = None if bias is None else bias.float()
    return torch.ops.mkldnn._linear_pointwise(x.float(), packed, b, "none", [], "").to(x.dtype)


_RESOLVED = "_llmesh_cpu_gemm"
"""Per weight: {(x dtype, row bucket): (plan epoch, weight version, oneDNN copy)} for the
same-dtype oneDNN path, so a decode step's GEMV skips the choice and pack lookups."""

_plan_epoch = 0
"""Bumped by whatever changes a choice or drops a copy (``calibrate``): older memos are stale."""


def cpu_dense_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [M, K] @ W[N, K]^T (+ bias) → [M, N] through oneDNN where ``calibrate`` measured it
    faster for W's shape and M's bucket (uncalibrated: from ONEDNN_MIN_ROWS rows up); None
    (the caller uses F.linear: MKL) otherwise, for other dtypes or without oneDNN.

    bfloat16 may take a float32 copy ('onednn_f32'): without AVX-512 BF16, PyTorch's bfloat16
    GEMM takes 3-8x its one-row time at 2-16 rows, and it accumulates in float32 anyway, so the
    widened product differs from it by summation order only (rounded to bfloat16 the same way).
    """
    memo = w.__dict__.get(_RESOLVED)
    if memo is not None and x.is_contiguous() and (bias is None or bias.dtype == x.dtype):
        hit = memo.get((x.dtype, x.shape[0] == 1))
        if hit is not None and hit[0] == _plan_epoch and hit[1] == _version(w):
            return torch.ops.mkldnn._linear_pointwise(x, hit[2], bias, "none", [], "")
    if x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != x.dtype:
        return None
    key = _choice_key(x, w)
    choice = _CHOICE.get(key) or _default_choice(x.dtype, x.shape[0])
    y = run_gemm_path(choice, x, w, bias)
    if choice == "onednn" and y is not None:
        packed = w.__dict__[_ONEDNN][x.dtype][1]
        w.__dict__.setdefault(_RESOLVED, {})[(x.dtype, x.shape[0] == 1)] = (_plan_epoch, _version(w), packed)
    return y


def gemm_paths(dtype: torch.dtype) -> tuple[str, ...]:
    """The paths ``calibrate`` chooses among for a dense weight of ``dtype``."""
    return ("mkl", "onednn") if dtype == torch.float32 else ("mkl", "onednn", "onednn_f32")


def _time_pass(choice: str, x: torch.Tensor, weights: list[torch.Tensor], passes: int = 3) -> float:
    """Seconds per GEMM: the best of ``passes`` passes through ``weights``, after one to warm up."""
    if choice == "mkl":
        fns = [lambda w=w: torch.nn.functional.linear(x, w) for w in weights]
    else:
        fns = [lambda w=w: run_gemm_path(choice, x, w, None) for w in weights]
    try:
        if any(f() is None for f in fns):
            return math.inf  # no such oneDNN copy here
    except RuntimeError:  # a oneDNN path this CPU lacks (bfloat16 without AVX-512)
        return math.inf
    best = math.inf
    for _ in range(passes):
        t0 = time.perf_counter()
        for f in fns:
            f()
        best = min(best, (time.perf_counter() - t0) / len(fns))
    return best


@torch.inference_mode()
def calibrate(weights: Iterable[torch.Tensor], min_bytes: int = CALIBRATE_MIN_BYTES) -> dict[str, dict]:
    """Time each GEMM path on the model's own dense CPU weights and keep the fastest per shape
    and row bucket for ``cpu_dense_matmul`` (past ``CALIBRATE_MARGIN``). Which is fastest is a
    property of the host (oneDNN at 2-16 rows was 1.5-3x MKL on a 2-core AVX2 EPYC; on an
    AVX-512 BF16 one it also won at one row, its packed bfloat16 at twice MKL's speed), so it
    is measured, not assumed. Returns what it chose and the microseconds behind it, by
    'dtype NxK bucket', for logs and benchmarks."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for w in weights:
        if (isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.dim() == 2
                and w.dtype in (torch.float32, torch.bfloat16)):
            groups.setdefault((w.dtype, w.shape[0], w.shape[1], w.stride(0) == 1), []).append(w)
    report: dict[str, dict] = {}
    for (dtype, n, k, k_major), ws in groups.items():
        if sum(w.numel() for w in ws) * dtype.itemsize < min_bytes:
            continue
        sample, nbytes = [], 0
        for w in ws:
            if nbytes >= CALIBRATE_SAMPLE_BYTES:
                break
            sample.append(w)
            nbytes += w.numel() * dtype.itemsize
        chosen: set[str] = set()
        for bucket, rows in enumerate(ROW_BUCKETS):
            x = torch.randn(rows, k, dtype=dtype)
            us = {c: 1e6 * _time_pass(c, x, sample) for c in gemm_paths(dtype)}
            choice, default = min(us, key=us.get), _default_choice(dtype, rows)
            if us[default] <= CALIBRATE_MARGIN * us[choice]:
                choice = default  # a near tie: keep the fixed rule rather than follow the noise
            _CHOICE[(dtype, n, k, k_major, bucket)] = choice
            _new_plan_epoch()
            chosen.add(choice)
            report[f"{str(dtype).removeprefix('torch.')} {n}x{k} m{rows}"] = {
                "choice": choice, **{c: round(t, 1) for c, t in us.items() if t != math.inf}}
        for c in set(gemm_paths(dtype)) - chosen - {"mkl"}:
            for w in sample:
                _drop_onednn_pack(w, torch.float32 if c == "onednn_f32" else dtype)
    return report


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


def _prepared(w: QuantizedWeight, dtype: torch.dtype) -> tuple | None:
    """W's CPU form for ``dtype`` activations, made on first use and kept beside it."""
    cache: dict = w.__dict__.setdefault(_CACHE, {})
    if dtype not in cache:
        cache[dtype] = _pack(w, dtype)
    return cache[dtype]


def cpu_dense_copies(weights: Iterable[object], dtype: torch.dtype) -> list[torch.Tensor]:
    """The dense weights a CPU model of ``dtype`` multiplies by: its dense ones, and the
    expanded copies of packed ones (made now rather than on the first step) — what
    ``calibrate`` times."""
    out = []
    for w in weights:
        if isinstance(w, torch.Tensor):
            out.append(w)
        elif isinstance(w, QuantizedWeight) and dtype in (torch.float32, torch.bfloat16):
            pack = _prepared(w, dtype)
            if pack is not None and pack[0] == "dense":
                out.append(pack[1])
    return out


def cpu_packed_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor | None:
    """x [M, K] (float32 or bfloat16, on the CPU) @ W → [M, N], or None when W's format has
    no CPU path here."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return None
    pack = _prepared(w, x.dtype)
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

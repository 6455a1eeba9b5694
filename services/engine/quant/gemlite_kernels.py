"""GemLite's Triton kernels (PyPI ``gemlite``, github.com/dropbox/gemlite) for INT4 and INT8
weight-only linears on CUDA, where the measured table picks them.

GemLite is a well-kept library of low-bit GEMV/GEMM kernels (in SGLang and TorchAO) with four
shapes of kernel for the decode sizes that ours and tinygemm serve: a plain GEMV, its
"reverse split-K" variant (each program two K blocks, fewer scale loads), a split-K GEMV and a
split-K GEMM with an atomic reduction. bench/quant_gemm.py times each of them beside our
kernels and tinygemm per (shape, M) and writes the winner to llmesh/kernels/quant_gemm_tuned.json as
``["gemlite", [matmul_type]]``; ``linear`` dispatches there. Our kernels stay the reference and
the fallback (gemlite imports only with a CUDA device and is an optional dependency: the
``gpu`` extra).

Its weight layout is its own (codes packed into int32 words along K, [K / 8, N] for INT4), so a
weight it serves keeps a second copy beside ours, made once after the model loads
(``linear.prepare_library_weights``), before the KV pool is sized.

Numerics: INT4 runs in its "fma" mode, w = q * scale + zero, which is our w = q * s + m with
scale = s and zero = m, each rounded once to the activation dtype (our float16 scales keep more
mantissa than bfloat16). INT8 codes are stored shifted by 128 (unsigned), w = (q' - 128) * s.
Within each format's tolerance of our kernels, not bit for bit.
"""

from __future__ import annotations

import functools

import torch

from llmesh.engine.quant.packed import Int4Weight, Int8Weight

MATMUL_TYPES = ("GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK", "GEMM_SPLITK")
"""The kernels a decode-size candidate may name (GEMM, for large M, is cuBLAS's ground)."""

_CACHE = "_gemlite"


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why gemlite cannot run here (None: it can). It reads the CUDA device at import."""
    if not torch.cuda.is_available():
        return "gemlite needs a CUDA device"
    try:
        import gemlite  # noqa: F401
    except Exception as e:  # not installed, or a Triton it does not support
        return f"gemlite does not import: {type(e).__name__}: {str(e)[:160]}"
    return None


CHECKED_INT4_GROUPS = (64, 128)
"""INT4 group sizes its kernels have been checked at on a GPU (tests/engine/test_gemlite_kernels.py).
The table's key has no group size, so a weight of another group (GGUF's Q4 blocks of 32), or a
grouped INT8 weight (GGUF's Q8_0), keeps our kernels until a GPU test covers it."""


def format_supported(w: object, dtype: torch.dtype) -> bool:
    """Whether this weight's format, shape and group are ones gemlite serves here (any device)."""
    if dtype not in (torch.float16, torch.bfloat16) or not isinstance(w, (Int4Weight, Int8Weight)):
        return False
    if isinstance(w, Int4Weight):
        k = w.padded_in_features
        return w.perm is None and w.group_size in CHECKED_INT4_GROUPS and k % 32 == 0 and k % w.group_size == 0
    return w.group_size == w.in_features and w.in_features % 32 == 0  # one scale per output channel


def supported(w: object, dtype: torch.dtype) -> bool:
    """Whether gemlite can hold this weight for activations of ``dtype``: a CUDA weight of a
    supported format."""
    return format_supported(w, dtype) and w.qweight.is_cuda


def _codes_n_by_k(w: Int4Weight | Int8Weight) -> torch.Tensor:
    """uint8 [N, K] unsigned codes (what gemlite's packer takes)."""
    if isinstance(w, Int4Weight):
        return w.codes().t().contiguous()  # [Kp, N] -> [N, Kp]
    return (w.qweight.to(torch.int16) + 128).to(torch.uint8).t().contiguous()


def layer(w: Int4Weight | Int8Weight, dtype: torch.dtype):
    """The GemLiteLinear holding ``w`` for ``dtype`` activations, made once and cached on the weight."""
    cache: dict = w.__dict__.setdefault(_CACHE, {})
    if dtype in cache:
        return cache[dtype]
    if (why := unavailable_reason()) is not None:
        raise RuntimeError(why)
    if not supported(w, dtype):
        raise ValueError(f"gemlite: weight [{w.in_features} x {w.out_features}] group {w.group_size} "
                         f"({type(w).__name__}) cannot run with {dtype} activations")
    from gemlite import DType, GemLiteLinear

    gdt = DType.BF16 if dtype == torch.bfloat16 else DType.FP16
    n = w.out_features
    codes = _codes_n_by_k(w)
    k = codes.shape[1]
    scales = w.scales.to(dtype).t().contiguous()  # [N, K / G]: gemlite views it [N, -1] and transposes
    if isinstance(w, Int4Weight):
        lin = GemLiteLinear(4, group_size=w.group_size, in_features=k, out_features=n, input_dtype=gdt,
                            output_dtype=gdt)
        lin.pack(codes, scales, zeros=torch.zeros_like(scales))  # fma mode: zero = -z * scale, set below
        zero = w.mins.to(dtype).contiguous()  # [Kp / G, N], the layout gemlite keeps its zeros in
        if lin.zeros.shape != zero.shape:
            raise RuntimeError(f"gemlite: zeros {tuple(lin.zeros.shape)} where {tuple(zero.shape)} was expected "
                               "(a gemlite whose layout this module does not know)")
        lin.zeros.data = zero
    else:
        lin = GemLiteLinear(8, group_size=w.group_size, in_features=k, out_features=n, input_dtype=gdt,
                            output_dtype=gdt)
        lin.pack(codes, scales, zeros=128)
    del codes
    cache[dtype] = lin
    return lin


def gemlite_matmul(x: torch.Tensor, w: Int4Weight | Int8Weight, matmul_type: str) -> torch.Tensor | None:
    """x [M, K] @ W -> [M, N] in x's dtype through gemlite's ``matmul_type`` kernel, or None
    where it cannot run (gemlite missing, a weight or dtype it cannot hold)."""
    if matmul_type not in MATMUL_TYPES or unavailable_reason() is not None or not supported(w, x.dtype):
        return None
    from gemlite.core import GEMLITE_MATMUL_TYPES_MAPPING, forward_functional

    lin = layer(w, x.dtype)
    if x.shape[1] < lin.in_features:  # INT4's padding rows hold q = 0 at zero activations
        x = torch.nn.functional.pad(x, (0, lin.in_features - x.shape[1]))
    y = forward_functional(x.contiguous(), None, lin.get_tensor_args(), _float32_out_meta(lin),
                           GEMLITE_MATMUL_TYPES_MAPPING[matmul_type])
    return y.to(x.dtype)


def _float32_out_meta(lin) -> list[int]:
    """The layer's meta arguments with a float32 output. Its decode kernels add their K-split
    partials into the output with atomics, up to K / 32 of them per element at M = 1: added in
    bfloat16 they drifted 4% of the output's range from the reference on 4096 x 14336 (the sweep's
    correctness check refused them); added in float32 and rounded once they agree."""
    meta = getattr(lin, "_llmesh_meta", None)
    if meta is None:
        from gemlite import DType

        meta = list(lin.get_meta_args())
        meta[6] = DType.FP32.value  # get_meta_args: [..., input_dtype, output_dtype, acc_dtype, ...]
        lin._llmesh_meta = meta
    return meta


def copy_bytes(w: Int4Weight | Int8Weight) -> int:
    """Bytes of the gemlite copies made for ``w``."""
    total = 0
    for lin in w.__dict__.get(_CACHE, {}).values():
        total += sum(t.numel() * t.element_size() for t in (lin.W_q, lin.scales, lin.zeros))
    return total

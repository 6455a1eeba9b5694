"""FBGEMM's GenAI kernels (PyPI ``fbgemm-gpu-genai``, github.com/pytorch/FBGEMM) for INT4
weight-only and FP8 W8A8 linears on Hopper, where the measured table picks them.

FBGEMM GenAI is Meta's library of CUTLASS 3 kernels for serving (what TorchAO's INT4
"preshuffled" format and Llama 4's FP8 serving run on). Three of them serve our formats:

- ``bf16i4bf16_shuffled``: bfloat16 activations times INT4 weights with bfloat16 group scales
  and zeros, a Hopper mixed-input GEMM (wgmma, TMA) over weights pre-shuffled into its
  tensor-core fragment order. On the H200 it ran 0.7-1.0x bf16 at M = 32-256 on Llama-3-8B
  shapes, where our tl.dot kernels fell to 0.2-0.5x; tinygemm stays faster at M <= 4 and our
  kernels mostly at M = 16 (bench/quant_gemm.py measures; llmesh/kernels/quant_gemm_tuned.json records).
- ``f8f8bf16_rowwise``: FP8 activations quantized per token times FP8 weights with one scale
  per output channel (exactly Fp8Weight), bfloat16 out: 1.3-1.9x bf16 from M = 1 to 8192,
  where cuBLASLt through ``torch._scaled_mm`` gave 0.8-1.4x at decode sizes.
- ``f8i4bf16_shuffled``: FP8 activations times INT4 weights with FP8 group scales and a float32
  row scale (W4A8Weight, the only kernel that format has on a GPU): the codes are widened to
  FP8 in registers and multiplied on FP8 tensor cores, so large batches run at FP8's rate
  while the weights stay at INT4's bytes.
- ``f8f8bf16_groupwise``: FP8 activations per token and 128 channels times FP8 weights with one
  scale per 128 x 128 block (Fp8BlockWeight: Qwen3-*-FP8, DeepSeek-V3), CUTLASS's
  FP8BlockScaledAccum mainloop; it competes with cuBLASLt's block-scaled GEMM and our Triton
  one per M bucket (bench/block_fp8_gpu.py measures; block_fp8_gemm.BLOCK_FP8_LIBRARY records).

INT4 weights keep a second copy in FBGEMM's layout (made once after the model loads, by
``linear.prepare_library_weights``, before the KV pool is sized); FP8 weights are used as
they are; W4A8 weights are re-laid in place (they have no other reader on a GPU). Our kernels
stay the reference and the fallback: the library is the optional ``gpu`` extra, built for one
torch (1.6.x for torch 2.11) and sm_90a / sm_100a.

Numerics: INT4 computes ``w = q' * scale + zero`` with signed codes q' = q - 8, so our
``w = q * s + m`` becomes scale = s, zero = m + 8 s, each rounded once to bfloat16 (as
tinygemm's): within the INT4 tolerance, not bit for bit. FP8 accumulates in float32 with
CUTLASS's fast accumulation, as cuBLASLt does.
"""

from __future__ import annotations

import functools
import logging

import torch

from llmesh.engine.quant.packed import Fp8BlockWeight, Fp8Weight, Int4Weight, W4A8Weight, pack_signed_nibbles

CHECKED_INT4_GROUPS = (128,)
"""INT4 group sizes checked on a GPU (tests/engine/test_fbgemm_kernels.py); its packer takes
groups of at least 128, and the table's key has no group size."""

INT4_KERNEL = "shuffled"
"""The INT4 table entry's field (``["fbgemm", ["shuffled"]]``; FP8 entries have none) and the key
of the weight's cached copy."""

_CACHE = "_fbgemm"


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why FBGEMM's kernels cannot run here (None: they can)."""
    if not torch.cuda.is_available():
        return "fbgemm-gpu-genai needs a CUDA device"
    if torch.cuda.get_device_capability() < (9, 0):
        return "fbgemm-gpu-genai's INT4 / FP8 GEMMs are built for sm_90a and later"
    try:
        # Its import warns, through the root logger, that its own version table lacks an
        # entry for 1.6.0; the pin in pyproject.toml is the pairing FBGEMM documents.
        logging.disable(logging.WARNING)
        try:
            import fbgemm_gpu.experimental.gen_ai  # noqa: F401
        finally:
            logging.disable(logging.NOTSET)
        torch.ops.fbgemm.bf16i4bf16_shuffled  # noqa: B018 (raises when the op did not register)
        torch.ops.fbgemm.f8f8bf16_rowwise  # noqa: B018
        torch.ops.fbgemm.f8i4bf16_shuffled  # noqa: B018
    except Exception as e:  # not installed, or built for another torch
        return f"fbgemm-gpu-genai does not load: {type(e).__name__}: {str(e)[:160]}"
    return None


def int4_format_supported(w: object) -> bool:
    """Whether this INT4 weight's format and shape are ones its kernel serves (any device)."""
    return (isinstance(w, Int4Weight) and w.perm is None and w.group_size in CHECKED_INT4_GROUPS
            and w.out_features % 128 == 0 and w.padded_in_features % w.group_size == 0)


def int4_supported(w: object) -> bool:
    return int4_format_supported(w) and w.qweight.is_cuda


def signed_nibbles_n_by_k(w: Int4Weight) -> torch.Tensor:
    """int8 [N, Kp/2]: the codes minus 8, k = 2j in the low nibble and 2j + 1 in the high one
    (the packing FBGEMM's ``pack_int4`` makes), from our [Kp/2, N] halves layout."""
    return pack_signed_nibbles(w.codes().t().to(torch.int16) - 8)  # codes [N, Kp] in -8..7


def scales_and_zeros(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 [Kp/G, N] scale and zero with w = (q - 8) * scale + zero."""
    return w.scales.to(torch.bfloat16).contiguous(), w.signed_zeros().to(torch.bfloat16).contiguous()


def int4_pack(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shuffled codes, shuffled scales, zeros) for ``bf16i4bf16_shuffled``, cached on the weight."""
    cache: dict = w.__dict__.setdefault(_CACHE, {})
    if INT4_KERNEL not in cache:
        if (why := unavailable_reason()) is not None:
            raise RuntimeError(why)
        if not int4_supported(w):
            raise ValueError(f"fbgemm: INT4 weight [{w.in_features} x {w.out_features}] group {w.group_size} "
                             f"cannot run its kernel (CUDA, group in {CHECKED_INT4_GROUPS}, N % 128, no act-order)")
        scale, zero = scales_and_zeros(w)
        codes, scale = torch.ops.fbgemm.preshuffle_i4(signed_nibbles_n_by_k(w), scale)
        cache[INT4_KERNEL] = (codes, scale, zero)
    return cache[INT4_KERNEL]


def int4_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor | None:
    """x [M, K] @ W -> [M, N] bfloat16, or None where it cannot run (x not bfloat16, no rows,
    a weight it cannot hold, the library missing)."""
    if x.dtype != torch.bfloat16 or x.shape[0] == 0 or not int4_supported(w) or unavailable_reason() is not None:
        return None
    codes, scale, zero = int4_pack(w)
    kp = w.padded_in_features
    if x.shape[1] < kp:  # Kp's padding rows hold q = 0 (w = zero there): zero activations cancel them
        x = torch.nn.functional.pad(x, (0, kp - x.shape[1]))
    return torch.ops.fbgemm.bf16i4bf16_shuffled(x.contiguous(), codes, scale, zero)


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, w: Fp8Weight, out_dtype: torch.dtype) -> torch.Tensor | None:
    """Per-token FP8 rows (codes [M, K], float32 scales [M]) @ an FP8 weight -> [M, N] bfloat16,
    or None where it cannot run (another output dtype, no rows, the library missing)."""
    if out_dtype != torch.bfloat16 or xq.shape[0] == 0 or not w.qweight.is_cuda or unavailable_reason() is not None:
        return None
    return torch.ops.fbgemm.f8f8bf16_rowwise(xq, w.qweight, x_scale.float(), w.scales.float())


@functools.lru_cache(maxsize=1)
def groupwise_unavailable_reason() -> str | None:
    """Why FBGEMM's block-scaled FP8 GEMM (f8f8bf16_groupwise) cannot run here (None: it can)."""
    if (why := unavailable_reason()) is not None:
        return why
    try:
        torch.ops.fbgemm.f8f8bf16_groupwise  # noqa: B018
    except Exception as e:  # an older build without it
        return f"fbgemm-gpu-genai has no f8f8bf16_groupwise: {type(e).__name__}: {str(e)[:120]}"
    return None


GROUPWISE = "groupwise"
"""The cache key of a block-scaled weight's scales in the layout f8f8bf16_groupwise reads."""


def groupwise_scales(w: Fp8BlockWeight) -> torch.Tensor:
    """The weight's block scales N-major ([K/128, N/128] contiguous), made once and cached on it
    (prepare_library_weights makes it after the load, so no CUDA graph capture allocates it)."""
    cache: dict = w.__dict__.setdefault(_CACHE, {})
    if GROUPWISE not in cache:
        cache[GROUPWISE] = w.scales.t().contiguous()
    return cache[GROUPWISE]


def fp8_block_matmul(rows, w: Fp8BlockWeight, out_dtype: torch.dtype) -> torch.Tensor | None:
    """Rows quantized per token and 128 channels @ a 128 x 128-block FP8 weight -> [M, N] bfloat16
    through CUTLASS's groupwise GEMM (DeepSeek's recipe), or None where it cannot run (another
    output dtype or block, a ragged shape, no rows, the library missing)."""
    from llmesh.kernels.block_fp8_gemm import library_shape_ok, mn_major_scales

    n, k = w.qweight.shape
    if (out_dtype != torch.bfloat16 or rows.xq.shape[0] == 0 or not w.qweight.is_cuda
            or not library_shape_ok(n, k, w.block) or groupwise_unavailable_reason() is not None):
        return None
    # its activation scales are read M-major: [K/128, M] contiguous is that transposed
    return torch.ops.fbgemm.f8f8bf16_groupwise(rows.xq, w.qweight, mn_major_scales(rows.scale).t(),
                                                groupwise_scales(w))


W4A8_MIN_GROUP = 128
"""FBGEMM's W4A8 packer takes groups of at least 128 input channels."""


def w4a8_supported(w: W4A8Weight) -> str | None:
    """Why FBGEMM's W4A8 kernel cannot serve this weight (None: it can)."""
    if (why := unavailable_reason()) is not None:
        return why
    if not w.qweight.is_cuda:
        return "the weight is not on a CUDA device"
    if w.group_size < W4A8_MIN_GROUP:
        return f"group size {w.group_size} (FBGEMM takes groups of at least {W4A8_MIN_GROUP})"
    if w.out_features % 8:
        return f"{w.out_features} output features (FBGEMM's layout needs a multiple of 8)"
    return None


def w4a8_shuffle(w: W4A8Weight) -> W4A8Weight:
    """Re-lay ``w`` in place into FBGEMM's shuffled order (codes keep their [N, K/2] shape, group
    scales become [K/G, 8, N]); a weight already shuffled is left as it is."""
    if not w.shuffled:
        if (why := w4a8_supported(w)) is not None:
            raise RuntimeError(f"fbgemm: W4A8 weight [{w.in_features} x {w.out_features}]: {why}")
        w.qweight, w.group_scales = torch.ops.fbgemm.preshuffle_i4(w.qweight.contiguous(),
                                                                   w.group_scales.contiguous())
        w.shuffled = True
    return w


def w4a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, w: W4A8Weight) -> torch.Tensor:
    """Per-token FP8 rows (codes [M, K], float32 scales [M]) @ a W4A8 weight -> [M, N] bfloat16
    (the weight is shuffled first if it was not: outside a CUDA graph capture, as
    prepare_library_weights does at load)."""
    w4a8_shuffle(w)
    if xq.shape[0] == 0:
        return torch.empty(0, w.out_features, dtype=torch.bfloat16, device=xq.device)
    if xq.shape[1] < w.padded_in_features:  # the codes past K are 0; zero activations meet them
        padded = torch.zeros(xq.shape[0], w.padded_in_features, dtype=xq.dtype, device=xq.device)
        padded[:, : xq.shape[1]] = xq
        xq = padded
    return torch.ops.fbgemm.f8i4bf16_shuffled(xq.contiguous(), w.qweight, x_scale.float().contiguous(),
                                              w.scales, w.group_scales)


def copy_bytes(w: Int4Weight) -> int:
    """Bytes of the FBGEMM copy made for ``w``."""
    return sum(t.numel() * t.element_size() for t in w.__dict__.get(_CACHE, {}).get(INT4_KERNEL, ()))

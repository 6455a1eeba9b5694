"""Multiplying by a weight that may be quantized: the one place that picks the kernel.

``linear(x, w, bias)`` takes a dense tensor (nn.Linear layout [N, K]) or a packed weight
(packed.py) and returns x @ W^T + bias. With ``kernels=True`` packed weights go through our
Triton GEMMs (the triton backend, and the torch backend on a GPU); otherwise through their
torch references — dequantize, round to x's dtype, multiply. The torch backend on the CPU,
where Triton has no compiled kernels, asks for ``cpu_kernels``: PyTorch's packed CPU GEMMs
(cpu_matmul.py), the reference for the formats they do not take. On a GPU, packed weights
first consult the measured table (llmesh/kernels/quant_gemm_config.py, tuned_choice): GEMV, tl.dot
GEMM config, our swapped-operand INT4 kernel (swapped_int4.py), our CUDA C++ fragment-order
INT4/INT8 kernel (mma_weights.py), cuBLASLt FP8, PyTorch's
tinygemm INT4 kernel (int4pack.py), GemLite's INT4/INT8 kernels (gemlite_kernels.py) or FBGEMM's
INT4/FP8 CUTLASS kernels (fbgemm_kernels.py) per shape and batch size;
``prepare_library_weights`` makes the copies of the weights that those with layouts of their own
(the swapped and fragment-order kernels and the libraries) will serve. W4A8 weights run FBGEMM's
kernel, or the fragment-order kernel's W4A8 instance at the sizes where the table's ``w4a8``
entries say ``mma``. Dense weights use F.linear, except on CUDA at decode sizes where the measured
table (llmesh/kernels/skinny_gemm_config.py) says the skinny Triton GEMM is faster for that shape,
and at one row of bf16 where moe_gemv.DENSE_STEP or DENSE_FASTER says the CUDA C++ GEMV is faster than both.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from llmesh.engine.quant.cpu_matmul import cpu_dense_matmul, cpu_packed_matmul
from llmesh.engine.quant.packed import Fp8BlockWeight, Fp8Weight, Int4Weight, Int8Weight, QuantizedWeight, W4A8Weight
from llmesh.kernels import moe_gemv
from llmesh.kernels.skinny_gemm_config import MAX_M as SKINNY_MAX_M
from llmesh.kernels.skinny_gemm_config import tuned_config

Weight = torch.Tensor | QuantizedWeight


DEQUANT_GEMM_MIN_M = 256
"""From this many rows on, packed INT4/INT8 weights are expanded to x's dtype by a kernel and
multiplied by cuBLAS (compute bound there; vLLM's AWQ switches at the same size)."""


_KIND = {Int4Weight: "w4a16", Int8Weight: "w8a16", Fp8Weight: "fp8"}
_PRIVATE_COPIES = frozenset({"swapped", "int4pack", "gemlite", "fbgemm"})
"""Table choices whose kernels read a copy of the weight in a layout of their own (kernel_operands)."""
log = logging.getLogger(__name__)


def _tuned_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor | None:
    """The kernel bench/quant_gemm.py measured fastest for this device, shape and M
    (llmesh/kernels/quant_gemm_tuned.json), or None where it has no entry (the default path)."""
    from llmesh.kernels.quant_gemm_config import GemmConfig, tuned_choice

    choice = tuned_choice(x.device, _KIND[type(w)], x.shape[0], w.out_features, w.in_features)
    if choice is None:
        return None
    name, fields = choice
    if name == "int4pack":
        from llmesh.engine.quant.int4pack import int4pack_matmul

        return int4pack_matmul(x, w, int(fields[0])) if isinstance(w, Int4Weight) else None
    if name == "gemlite":
        from llmesh.engine.quant.gemlite_kernels import gemlite_matmul

        return gemlite_matmul(x, w, str(fields[0])) if isinstance(w, (Int4Weight, Int8Weight)) else None
    if name == "fbgemm":
        from llmesh.engine.quant.fbgemm_kernels import int4_matmul

        return int4_matmul(x, w) if isinstance(w, Int4Weight) else None
    if name == "swapped":
        from llmesh.engine.quant.swapped_int4 import swapped_matmul

        return swapped_matmul(x, w, str(fields[0])) if isinstance(w, Int4Weight) else None
    if name == "mma":
        from llmesh.engine.quant.mma_weights import mma_matmul

        return mma_matmul(x, w, str(fields[0])) if isinstance(w, (Int4Weight, Int8Weight)) else None
    if name == "dequant":
        return dequant_matmul(x, w) if isinstance(w, (Int4Weight, Int8Weight)) else None
    if isinstance(w, Fp8Weight):
        return None  # fp8_matmul reads the table itself
    from llmesh.kernels.quant_gemv import MAX_M, GemvConfig, w4a16_gemv, w8a16_gemv

    if name == "gemv" and x.shape[0] > MAX_M:
        return None
    cfg = GemvConfig(*fields) if name == "gemv" else GemmConfig(*fields)
    # The table's key has no group size: a config measured at another group whose K tile
    # would straddle this weight's groups falls back to the default path.
    if (isinstance(w, Int4Weight) or w.group_size != w.in_features) and w.group_size % cfg.block_k:
        return None
    if name == "gemv":
        if isinstance(w, Int4Weight):
            return w4a16_gemv(x, w.qweight, w.scales, w.mins, w.group_size, config=cfg)
        return w8a16_gemv(x, w.qweight, w.scales, w.group_size, config=cfg)
    if isinstance(w, Int4Weight):
        from llmesh.kernels.w4a16_gemm import w4a16_gemm

        return w4a16_gemm(x, w.qweight, w.scales, w.mins, w.group_size, config=cfg)
    from llmesh.kernels.w8a16_gemm import w8a16_gemm

    return w8a16_gemm(x, w.qweight, w.scales, w.group_size, config=cfg)


def prepare_library_weights(weights, device: torch.device, dtype: torch.dtype) -> int:
    """Make, now, the copies of every packed weight that the measured table sends to a library
    kernel at some batch size (tinygemm's, gemlite's and FBGEMM's INT4 layouts are their own;
    block-scaled FP8 weights' scales N-major for FBGEMM's groupwise GEMM), and re-lay W4A8 weights
    for FBGEMM's kernel in place; returns the copies' bytes. Called once
    after the model loads, so the KV pool is sized with them in memory."""
    from llmesh.kernels.quant_gemm_config import SILU_MUL, tuned_choices_any_m

    from llmesh.engine.quant import fbgemm_kernels, gemlite_kernels, int4pack, mma_weights, swapped_int4

    if device.type != "cuda":
        return 0
    total = 0
    missing: set[str] = set()
    for w in weights:
        if isinstance(w, W4A8Weight):
            # the fragment-order copy is laid out from the codes, so before FBGEMM's shuffle
            if (any(name == "mma" for name, _ in tuned_choices_any_m(device, "w4a8", w.out_features, w.in_features))
                    and mma_weights.w4a8_can_lay_out(w)):
                mma_weights.w4a8_layout(w)
                total += mma_weights.copy_bytes(w)
            if fbgemm_kernels.w4a8_supported(w) is None:
                fbgemm_kernels.w4a8_shuffle(w)  # in place: no copy, so no bytes to count
        if isinstance(w, Fp8BlockWeight) and fbgemm_kernels.groupwise_unavailable_reason() is None:
            fbgemm_kernels.groupwise_scales(w)  # K/128 x N/128 floats: too few bytes to count
        if not isinstance(w, (Int4Weight, Int8Weight)):
            continue
        choices = (tuned_choices_any_m(device, _KIND[type(w)], w.out_features, w.in_features)
                   | tuned_choices_any_m(device, _KIND[type(w)] + SILU_MUL, w.out_features, w.in_features))
        for name, fields in sorted(choices):
            if name == "int4pack" and isinstance(w, Int4Weight) and dtype == torch.bfloat16:
                if int4pack.supported(w, int(fields[0])):
                    packed, sz = int4pack.pack(w, int(fields[0]))
                    total += packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
        if any(name == "gemlite" for name, _ in choices):
            if (why := gemlite_kernels.unavailable_reason()) is not None:
                missing.add(why)
            elif gemlite_kernels.supported(w, dtype):
                gemlite_kernels.layer(w, dtype)  # one copy, whichever of its kernels an M takes
                total += gemlite_kernels.copy_bytes(w)
        if any(name == "swapped" for name, _ in choices) and isinstance(w, Int4Weight):
            swapped_int4.codes(w)  # one copy, whichever config an M takes
            total += swapped_int4.copy_bytes(w)
        if any(name == "mma" for name, _ in choices) and mma_weights.can_lay_out(w) and dtype == torch.bfloat16:
            mma_weights.layout(w)
            total += mma_weights.copy_bytes(w)
        if any(name == "fbgemm" for name, _ in choices) and isinstance(w, Int4Weight) and dtype == torch.bfloat16:
            if (why := fbgemm_kernels.unavailable_reason()) is not None:
                missing.add(why)
            elif fbgemm_kernels.int4_supported(w):
                fbgemm_kernels.int4_pack(w)
                total += fbgemm_kernels.copy_bytes(w)
    for why in missing:  # those weights run our kernels at the sizes the table gave a library
        log.warning("the measured table picks a library kernel for some weights, but it cannot run here; our "
                    "kernels serve them (pip install 'llmesh[gpu]')", extra={"reason": why})
    return total


def _kernel_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    # x: [M, K] → [M, N]
    if isinstance(w, Int4Weight) and w.perm is not None:
        x = x.index_select(1, w.perm)  # act-order: W's rows are stored sorted by group
    if isinstance(w, (Fp8Weight, W4A8Weight)):
        from llmesh.kernels.fp8_gemm import quantize_fp8_per_token

        return fp8_matmul(quantize_fp8_per_token(x), w, x.dtype)
    if isinstance(w, Fp8BlockWeight):
        from llmesh.kernels.block_fp8_gemm import quantize_fp8_per_group

        return fp8_matmul(quantize_fp8_per_group(x, w.block[1]), w, x.dtype)
    if x.is_cuda and (y := _tuned_matmul(x, w)) is not None:
        return y
    if x.shape[0] >= DEQUANT_GEMM_MIN_M:
        return dequant_matmul(x, w)
    if isinstance(w, Int4Weight):
        from llmesh.kernels.w4a16_gemm import w4a16_gemm

        return w4a16_gemm(x, w.qweight, w.scales, w.mins, w.group_size)
    from llmesh.kernels.w8a16_gemm import w8a16_gemm

    return w8a16_gemm(x, w.qweight, w.scales, w.group_size)


def silu_mul_matmul(gate_up: torch.Tensor, w: Weight) -> torch.Tensor | None:
    """(silu(gate) * up) @ W in one launch, gate_up [M, 2K] a fused gate/up projection's output,
    where the measured table's ``+silu_mul`` entry for this weight at M rows picks the fused
    fragment-order kernel (it makes the activation as it reads x: silu_and_mul's launch and round
    trip gone); else None, and the caller runs the two ops. Not for act-order weights, whose
    input is permuted first."""
    if (not gate_up.is_cuda or gate_up.dim() != 2 or not isinstance(w, (Int4Weight, Int8Weight))
            or (isinstance(w, Int4Weight) and w.perm is not None)):
        return None
    from llmesh.kernels.quant_gemm_config import SILU_MUL, tuned_choice

    choice = tuned_choice(gate_up.device, _KIND[type(w)] + SILU_MUL, gate_up.shape[0], w.out_features,
                          w.in_features)
    if choice is None or choice[0] != "mma":
        return None
    from llmesh.engine.quant.mma_weights import mma_matmul

    return mma_matmul(gate_up, w, str(choice[1][0]), act="silu_mul")


def norm_matmul(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                w: Weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rmsnorm(x + residual) @ W, x + residual) in one launch, where the measured table's
    ``+rmsnorm`` entry for this weight at M rows picks the fused fragment-order kernel (it
    normalises x as it reads it: rmsnorm's launch and round trip gone); else None, and the caller
    runs the two ops. Not for act-order weights, whose input is permuted first."""
    if (not x.is_cuda or x.dim() != 2 or not isinstance(w, (Int4Weight, Int8Weight))
            or (isinstance(w, Int4Weight) and w.perm is not None)):
        return None
    from llmesh.kernels.quant_gemm_config import RMSNORM, tuned_choice

    choice = tuned_choice(x.device, _KIND[type(w)] + RMSNORM, x.shape[0], w.out_features, w.in_features)
    if choice is None or choice[0] != "mma":
        return None
    from llmesh.engine.quant.mma_weights import norm_mma_matmul

    return norm_mma_matmul(x, residual, norm_weight, eps, w, str(choice[1][0]))


def dequant_matmul(x: torch.Tensor, w: Int4Weight | Int8Weight) -> torch.Tensor:
    """x @ W with W expanded to x's dtype by a kernel first (a transient copy of the whole
    weight), then cuBLAS: compute-bound sizes, where the expansion's one pass is cheap beside
    the GEMM; the table may pick it at any measured M ("dequant")."""
    from llmesh.kernels.quant_dequant import dequantize_int4, dequantize_int8

    if isinstance(w, Int4Weight):
        return x @ dequantize_int4(w.qweight, w.scales, w.mins, w.group_size, w.in_features, x.dtype)
    return x @ dequantize_int8(w.qweight, w.scales, w.group_size, x.dtype)


def fp8_matmul(rows, w: Fp8Weight | Fp8BlockWeight | W4A8Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """Activations quantized per token (kernels.fp8_gemm.Fp8Rows: by quantize_fp8_per_token, or
    fused into the op that produced them; per token and group for a block-scaled weight) @ an FP8
    or W4A8 weight → [M, N] in out_dtype. FP8: cuBLASLt's FP8 GEMM where the measured table says
    ``scaled_mm``, FBGEMM's where it says ``fbgemm`` (and it can run), else our kernel (with the
    table's tile where it gives one). Block-scaled FP8: block_fp8_matmul. W4A8: w4a8_matmul."""
    from llmesh.kernels.fp8_gemm import Fp8GemmConfig, fp8_gemm_rows, fp8_scaled_mm_rows
    from llmesh.kernels.quant_gemm_config import tuned_choice

    if isinstance(w, W4A8Weight):
        return w4a8_matmul(rows, w, out_dtype)
    if isinstance(w, Fp8BlockWeight):
        return block_fp8_matmul(rows, w, out_dtype)
    choice = tuned_choice(rows.xq.device, "fp8", rows.xq.shape[0], w.out_features, w.in_features)
    if choice is not None and choice[0] == "scaled_mm":
        return fp8_scaled_mm_rows(rows, w.qweight, w.scales, out_dtype)
    if choice is not None and choice[0] == "fbgemm":
        from llmesh.engine.quant.fbgemm_kernels import fp8_matmul as fbgemm_fp8_matmul

        if (y := fbgemm_fp8_matmul(rows.xq, rows.scale, w, out_dtype)) is not None:
            return y
    config = Fp8GemmConfig(*choice[1]) if choice is not None and choice[0] == "fp8" and choice[1] else None
    return fp8_gemm_rows(rows, w.qweight, w.scales, out_dtype=out_dtype, config=config)


def block_fp8_matmul(rows, w: Fp8BlockWeight, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows quantized per token and BK channels @ a block-scaled FP8 weight → [M, N]: the library
    BLOCK_FP8_LIBRARY measured fastest at this M (cuBLASLt's or FBGEMM's block-scaled GEMM) where
    it takes the weight, else our block_fp8_gemm."""
    from llmesh.kernels import block_fp8_gemm as block

    n, k = w.qweight.shape
    if rows.xq.is_cuda and rows.xq.shape[0] and block.library_shape_ok(n, k, w.block):
        library = block.block_library(rows.xq.device, rows.xq.shape[0])
        if library == "scaled_mm":
            return block.block_fp8_scaled_mm_rows(rows, w.qweight, w.scales, out_dtype)
        if library == "fbgemm":
            from llmesh.engine.quant.fbgemm_kernels import fp8_block_matmul

            if (y := fp8_block_matmul(rows, w, out_dtype)) is not None:
                return y
    return block.block_fp8_gemm_rows(rows, w.qweight, w.scales, w.block, out_dtype=out_dtype)


def w4a8_matmul(rows, w: W4A8Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-token FP8 rows @ a W4A8 weight → [M, N] in out_dtype: on a GPU the fragment-order
    kernel's W4A8 instance where the measured table says ``mma`` for this M (and its copy was
    made at load), else FBGEMM's kernel where it runs (either's bfloat16 output cast when another
    dtype is asked); else the reference."""
    if rows.xq.is_cuda:
        from llmesh.engine.quant import fbgemm_kernels
        from llmesh.kernels.quant_gemm_config import tuned_choice

        choice = tuned_choice(rows.xq.device, "w4a8", rows.xq.shape[0], w.out_features, w.in_features)
        if choice is not None and choice[0] == "mma":
            from llmesh.engine.quant.mma_weights import w4a8_mma_matmul

            if (y := w4a8_mma_matmul(rows, w, str(choice[1][0]))) is not None:
                return y.to(out_dtype)

        # shuffled: the support check passed at load (prepare_library_weights), not again per call
        if w.shuffled or fbgemm_kernels.w4a8_supported(w) is None:
            return fbgemm_kernels.w4a8_matmul(rows.xq, rows.scale, w).to(out_dtype)
    return w4a8_matmul_ref(rows, w, out_dtype)


def w4a8_matmul_ref(rows, w: W4A8Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """The W4A8 kernel's arithmetic in float32: FP8 codes times e4m3(code * group scale), summed,
    then times the token's and the row's scales."""
    acc = rows.xq.float() @ w.unscaled_t()[: w.in_features]                   # [M, N]
    return (acc * rows.scale.float()[:, None] * w.scales.float()[None, :]).to(out_dtype)


def _reference_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    if isinstance(w, W4A8Weight):
        from llmesh.kernels.fp8_gemm import quantize_fp8_per_token_ref

        return w4a8_matmul_ref(quantize_fp8_per_token_ref(x), w, x.dtype)
    if isinstance(w, Fp8Weight):
        from llmesh.kernels.fp8_gemm import fp8_gemm_ref

        return fp8_gemm_ref(x, w.qweight, w.scales)
    if isinstance(w, Fp8BlockWeight):
        from llmesh.kernels.block_fp8_gemm import block_fp8_gemm_ref

        return block_fp8_gemm_ref(x, w.qweight, w.scales, w.block)
    return x @ w.dequantize().to(x.dtype)


def _dense_skinny(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ W^T through the skinny Triton GEMM where bench/gemm_sweep.py measured it beating
    cuBLAS on this device for this (N, K, M bucket); None everywhere else (then F.linear)."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not (0 < rows <= SKINNY_MAX_M) or x.dtype not in (torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        return None
    config = tuned_config(x.device, rows, w.shape[0], k)
    if config is None or w.stride(-1) != 1:
        return None
    from llmesh.kernels.skinny_gemm import skinny_gemm

    x2 = x.reshape(rows, k)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return skinny_gemm(x2, w, bias, config=config).view(*x.shape[:-1], w.shape[0])


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None, *, kernels: bool = True,
           cpu_kernels: bool = False) -> torch.Tensor:
    """x: [..., K] → [..., N]. ``cpu_kernels`` (with kernels off, x on the CPU): packed
    weights through PyTorch's CPU kernels (cpu_matmul.py) where their format allows."""
    if isinstance(w, torch.Tensor):
        if kernels and x.is_cuda:
            if bias is None and moe_gemv.dense_chosen(x, w):
                return moe_gemv.gemv(x, w)  # one row: the CUDA GEMV where it measured fastest
            if (y := _dense_skinny(x, w, bias)) is not None:
                return y
        if cpu_kernels and x.is_cpu and x.dim() >= 2:
            flat = x.dim() == 2  # the model's [T, K]: no reshape and view around the GEMM
            y = cpu_dense_matmul(x if flat else x.reshape(-1, x.shape[-1]), w, bias)
            if y is not None:
                return y if flat else y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = None
    if kernels:
        y = _kernel_matmul(x2, w)
    elif cpu_kernels and x2.device.type == "cpu":
        y = cpu_packed_matmul(x2, w)  # None: no CPU path for this format
    if y is None:
        y = _reference_matmul(x2, w)
    if bias is not None:
        y = y + bias
    return y.view(*lead, y.shape[-1])


def kernel_operands(w: Weight | list[Weight], m: int, device: torch.device) -> list[torch.Tensor]:
    """The weight tensors the kernel that multiplies m rows by ``w`` on ``device`` reads (what an
    L2 prefetch should bring in, model/prefetch.py): a dense weight itself; a packed one's
    fragment-order copy where the measured table sends m rows to that kernel (its own codes and
    scales until the copy is made); none where the table picks a kernel that reads a private copy
    not named here (the swapped-operand kernel's, tinygemm's, GemLite's, FBGEMM's), since asking
    for bytes no kernel reads would only take HBM time and L2 room; else the weight's own codes
    and scales (our GEMVs and tl.dot GEMMs, the dequantizing path, FP8's kernels)."""
    if isinstance(w, list):
        return [t for part in w for t in kernel_operands(part, m, device)]
    if isinstance(w, torch.Tensor):
        return [w]
    if isinstance(w, (Int4Weight, Int8Weight, W4A8Weight)) and device.type == "cuda":
        from llmesh.engine.quant.mma_weights import cached_layout
        from llmesh.kernels.quant_gemm_config import tuned_choice

        choice = tuned_choice(device, _KIND.get(type(w), "w4a8"), m, w.out_features, w.in_features)
        name = None if choice is None else choice[0]
        if name == "mma" and (copy := cached_layout(w)) is not None:
            return [copy.codes, copy.scales]
        if name in _PRIVATE_COPIES and not isinstance(w, W4A8Weight):  # FBGEMM re-lays W4A8's own in place
            return []
    names = ("qweight", "scales", "mins", "group_scales")
    return [t for t in (getattr(w, name, None) for name in names) if isinstance(t, torch.Tensor)]


def dequantize_rows(w: Weight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of an embedding table stored as a linear weight [vocab, hidden] (dense) or
    packed with N = vocab (GGUF's quantized token_embd): [T] → [T, hidden], only those rows
    are expanded."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    if isinstance(w, W4A8Weight):
        w._check_readable()
        part = W4A8Weight(w.qweight.index_select(0, ids), w.group_scales.index_select(1, ids),
                          w.scales.index_select(0, ids), w.group_size, w.in_features)
        return part.dequantize().t().to(dtype)
    if isinstance(w, Fp8BlockWeight):
        bn, bk = w.block
        scales = w.scales.index_select(0, ids // bn).repeat_interleave(bk, 1)[:, : w.in_features]
        return (w.qweight.index_select(0, ids).float() * scales).to(dtype)
    if isinstance(w, Int8Weight):
        part = Int8Weight(w.qweight.index_select(1, ids), w.scales.index_select(1, ids), w.group_size, w.format)
    elif isinstance(w, Int4Weight):
        part = Int4Weight(w.qweight.index_select(1, ids), w.scales.index_select(1, ids),
                          w.mins.index_select(1, ids), w.group_size, w.in_features, w.perm, w.format)
    else:
        return (w.qweight.index_select(0, ids).float() * w.scales.index_select(0, ids)[:, None]).to(dtype)
    return part.dequantize().t().to(dtype)

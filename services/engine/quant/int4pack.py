"""PyTorch's built-in INT4 GEMM (``torch.ops.aten._weight_int4pack_mm``, the tensor-core
"tinygemm" kernel gpt-fast uses) for Int4Weight on CUDA, where the measured table picks it.

The table (llmesh/kernels/quant_gemm_tuned.json, entries ``["int4pack", [inner_k_tiles]]``) comes from
bench/quant_gemm.py, which times this kernel beside ours per shape and batch size; on the
H200 it was measured against our W4A16 kernels at decode sizes. Its weight layout is its own
(an [N/8, K/(16 * inner_k_tiles), 32, inner_k_tiles/2] int32 tiling of the tensor-core
fragments), so a weight it serves keeps a second, packed copy beside ours: our kernels still
serve the batch sizes where they win (the table is per M). The copies are made once after the
model loads (``linear.prepare_library_weights``), before the KV pool takes its share of memory.

Numerics: tinygemm computes ``w = (q - 8) * scale + zero`` with bfloat16 scale and zero; our
``w = q * s + m`` becomes scale = s, zero = m + 8 s, each rounded to bfloat16 once (our float16
scales keep more mantissa), so its products differ from our kernels' by about one bfloat16
rounding of the weight: within the INT4 tolerance, not bit for bit.
"""

from __future__ import annotations

import torch

from llmesh.engine.quant.packed import Int4Weight

GROUPS = (32, 64, 128, 256)
"""Group sizes the kernel takes."""
INNER_K_TILES = (2, 4, 8)

_CACHE = "_int4pack"


def supported(w: Int4Weight, inner_k_tiles: int) -> bool:
    """Whether tinygemm can hold this weight with this tiling."""
    return (w.qweight.is_cuda and w.group_size in GROUPS and inner_k_tiles in INNER_K_TILES
            and w.out_features % 8 == 0 and w.padded_in_features % (16 * inner_k_tiles) == 0)


def nibbles_n_by_k(w: Int4Weight) -> torch.Tensor:
    """uint8 [N, Kp/2]: q[n, 2j] in the high nibble, q[n, 2j + 1] in the low one (the input
    ``_convert_weight_to_int4pack`` takes), from our [Kp/2, N] halves layout."""
    q = w.codes().t()  # [N, Kp] values 0..15
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def scales_and_zeros(w: Int4Weight) -> torch.Tensor:
    """bfloat16 [Kp/G, N, 2]: (scale, zero) with w = (q - 8) * scale + zero."""
    return torch.stack([w.scales.float(), w.signed_zeros()], dim=-1).to(torch.bfloat16).contiguous()


def pack(w: Int4Weight, inner_k_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tinygemm weight, its scales and zeros), cached on the weight."""
    cache: dict = w.__dict__.setdefault(_CACHE, {})
    if inner_k_tiles not in cache:
        if not supported(w, inner_k_tiles):
            raise ValueError(f"int4pack: weight [{w.in_features} x {w.out_features}] group {w.group_size} cannot "
                             f"take inner_k_tiles={inner_k_tiles} (CUDA, group in {GROUPS}, N % 8, "
                             f"Kp % {16 * inner_k_tiles})")
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles_n_by_k(w), inner_k_tiles)
        cache[inner_k_tiles] = (packed, scales_and_zeros(w))
    return cache[inner_k_tiles]


def int4pack_matmul(x: torch.Tensor, w: Int4Weight, inner_k_tiles: int) -> torch.Tensor | None:
    """x [M, K] @ W → [M, N] bfloat16 through tinygemm, or None where it cannot run (x not
    bfloat16, a weight it cannot hold)."""
    if x.dtype != torch.bfloat16 or not supported(w, inner_k_tiles):
        return None
    packed, sz = pack(w, inner_k_tiles)
    kp = w.padded_in_features
    if x.shape[1] < kp:  # Kp's padding rows hold q = 0 (w = zero there): zero activations cancel them
        x = torch.nn.functional.pad(x, (0, kp - x.shape[1]))
    return torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, w.group_size, sz)

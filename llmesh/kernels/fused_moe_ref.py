"""Torch reference of the fused mixture-of-experts layer (llmesh/kernels/fused_moe.py).

One SwiGLU per expert, over the tokens routed to it, in Hugging Face's order (its
``*Experts.forward``): gate/up projection, silu(gate) * up, down projection, times the
routing weight, accumulated into the output expert by expert with ``index_add_``. The torch
op table runs this, so a float32 model agrees with transformers to rounding.

Weights are stacked over experts: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I].
INT8 weight-only experts carry per-output-channel scales (w = q * scale): w13_scale [E, 2I],
w2_scale [E, H]; E4M3 experts of a block-scaled FP8 checkpoint one scale per ``weight_block``
(BN, BK) block: w13_scale [E, 2I / BN, H / BK], w2_scale [E, H / BN, I / BK]. INT4 experts are codes uint8 [E, Kp / 2, N] in Int4Weight's halves layout
with float16 group scales and mins [E, Kp / G, N] (w = q * scale + min; llmesh/kernels/fused_moe.py).
A topk_ids entry of -1 names an expert held by another rank (expert
parallelism): the pair contributes zero.
"""

from __future__ import annotations

import torch

from llmesh.kernels.quant_ref import dequantize_int4_ref


def dequantize_experts_ref(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
                           low: torch.Tensor | None = None, k: int | None = None,
                           block: tuple[int, int] | None = None) -> torch.Tensor:
    """[E, N, K] int8 codes with scales [E, N] → [E, N, K] in ``dtype`` (float weights pass);
    E4M3 codes with ``block`` (BN, BK) scales [E, N / BN, K / BK] likewise; INT4 codes
    [E, Kp / 2, N] with ``low`` (the mins) and K given → [E, N, K] likewise."""
    if scale is None:
        return q.to(dtype)
    if block is not None:
        n, kk = q.shape[1:]
        dense = scale.float().repeat_interleave(block[0], 1)[:, :n].repeat_interleave(block[1], 2)[:, :, :kk]
        return (q.float() * dense).to(dtype)
    if low is None:
        return (q.float() * scale.float()[:, :, None]).to(dtype)
    group = 2 * q.shape[1] // scale.shape[1]
    return torch.stack([dequantize_int4_ref(q[e], scale[e], low[e], group, k).t()  # [N, K] each
                        for e in range(q.shape[0])]).to(dtype)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, w13_min: torch.Tensor | None = None,
                  w2_min: torch.Tensor | None = None, weight_block: tuple[int, int] | None = None) -> torch.Tensor:
    """x [T, H], routing topk_weights / topk_ids [T, k] → [T, H] in x's dtype.

    topk_weights may be float32 (Mixtral keeps them so, and the product is rounded once) or
    x's dtype (Qwen-MoE rounds them first); either way the weighted output is rounded to x's
    dtype before it is added, as HF does.
    """
    # x: [T, H]; w13: [E, 2I, H]; w2: [E, H, I]; topk_*: [T, k]
    num_experts = w13.shape[0]
    int4 = w13_min is not None
    inter = w13.shape[2] // 2 if int4 else w2.shape[2]
    out = torch.zeros_like(x)
    if x.shape[0] == 0:
        return out
    # A host read of which experts are hit: the reference's loop runs over those alone. Id -1
    # is an expert another rank holds (expert parallelism): its pairs add nothing here.
    ids = topk_ids.flatten().long()
    hit = torch.bincount(ids[ids >= 0], minlength=num_experts).nonzero().flatten().tolist()
    for e in hit:
        token_idx, slot = torch.where(topk_ids == e)  # [n], [n]
        one = slice(e, e + 1)
        w_gate_up = dequantize_experts_ref(w13[one], None if w13_scale is None else w13_scale[one], x.dtype,
                                           None if w13_min is None else w13_min[one], x.shape[1],
                                           weight_block)[0]  # [2I, H]
        w_down = dequantize_experts_ref(w2[one], None if w2_scale is None else w2_scale[one], x.dtype,
                                        None if w2_min is None else w2_min[one], inter, weight_block)[0]  # [H, I]
        gate_up = torch.nn.functional.linear(x[token_idx], w_gate_up)  # [n, 2I]
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        y = torch.nn.functional.linear(h, w_down) * topk_weights[token_idx, slot, None]  # [n, H]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out

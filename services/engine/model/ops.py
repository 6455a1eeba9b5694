"""The op table a model's forward pass dispatches through.

One model definition (llama.py) computes with whichever table it is built with: ``torch``
(plain PyTorch, CPU or GPU; the numerics of Hugging Face, the oracle) or ``triton`` (the
Triton kernels in llmesh/kernels/). Both take the same tensors and return the same shapes, so the
two backends cannot drift apart in anything but the kernels themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from llmesh.engine.model.config import ModelConfig
from llmesh.engine.quant.linear import Weight
from llmesh.kernels.paged_attention import AttentionMetadata

if TYPE_CHECKING:
    from llmesh.engine.model.moe import StackedExperts

OP_TABLES = ("torch", "triton")


class ModelOps(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata) -> None:
        """Once per forward pass, before any layer (e.g. grow a table the step outgrows)."""

    def embed(self, weight: Weight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` [T] of the embedding table → [T, H]."""

    def linear(self, x: torch.Tensor, w: Weight | list[Weight], bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        """x [..., K] @ W^T (+ bias) → [..., N]; a list is a fused weight whose parts could
        not share one kernel, their outputs concatenated."""

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); with no residual, (norm(x), x)."""

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    w: Weight | list[Weight], bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear(rmsnorm(x + residual), w, bias), x + residual): ``rmsnorm`` then ``linear``
        (the triton table fuses them into one kernel at decode sizes)."""

    def act_linear(self, gate_up: torch.Tensor, w: Weight | list[Weight], bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """linear(silu_and_mul(gate_up), w, bias) (fused likewise by the triton table)."""

    def rope_and_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                          k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                          qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, H_q, D] and k [T, H_kv, D] (views into the fused projection) at
        positions [T] and store the rotated k and v [T, H_kv, D] at meta.slot_mapping (-1
        skipped); returns the rotated pair (the Triton table rotates in place, one kernel).
        qk_norm = (q weight [D], k weight [D], eps): Qwen3's per-head RMSNorm of q and k first
        (inside the same kernel in the Triton table).
        An FP8 pool is quantized on store, its scales [num_blocks, block_size, H_kv] in k_scales, v_scales."""

    def norm_qkv_rope(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      w: Weight | list[Weight], bias: torch.Tensor | None, heads: tuple[int, int, int],
                      positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, k_scales: torch.Tensor | None = None,
                      v_scales: torch.Tensor | None = None,
                      qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An attention block's inputs: ``norm_linear`` into the fused q/k/v projection w, its
        output split into heads = (H_q, H_kv, D), then ``rope_and_write_kv`` → (q, k, v,
        x + residual) (``compose_norm_qkv_rope``; the triton table runs the projection, RoPE
        and the K/V write as one kernel at batch 1)."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x[..., :I]) * x[..., I:] → [..., I]."""

    def select_experts(self, router_logits: torch.Tensor, top_k: int, renormalize: bool,
                       weights_dtype: torch.dtype, counts: torch.Tensor, counted: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MoE router: softmax over router_logits [T, E] in float32, the top k, renormalised
        when asked → (weights [T, k] in weights_dtype, expert ids int64 [T, k]); each chosen
        expert's counts [E] (int64) grows by its token's counted [T] (1, or 0 for padding)."""

    def norm_router(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    router: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                    counts: torch.Tensor, counted: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An MoE layer's entry: ``rmsnorm``, the router's ``linear`` [E, H] and ``select_experts``
        → (h = norm(x + residual), x + residual, weights, ids) (``compose_norm_router``; the
        triton table runs them as one kernel at decode sizes, moe_norm_router.py)."""

    def moe(self, x: torch.Tensor, experts: StackedExperts, topk_weights: torch.Tensor, topk_ids: torch.Tensor
            ) -> torch.Tensor:
        """The routed experts of a mixture-of-experts layer: x [T, H] through each token's
        experts topk_ids [T, k], weighted by topk_weights [T, k] and summed → [T, H]."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                  k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Causal paged attention of q [T, H_q, D] over the pool → [T, H_q, D]; k, v [T, H_kv, D]
        are the step's own (already in the pool), for paths that need no gather. An FP8 pool
        (with its scales) is dequantized on load."""


def compose_norm_qkv_rope(ops: ModelOps, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                         eps: float, w: Weight | list[Weight], bias: torch.Tensor | None,
                         heads: tuple[int, int, int], positions: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, meta: AttentionMetadata, k_scales: torch.Tensor | None = None,
                         v_scales: torch.Tensor | None = None,
                         qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOps.norm_qkv_rope as the three ops it stands for."""
    qkv, residual = ops.norm_linear(x, residual, norm_weight, eps, w, bias)  # [T, (H_q + 2 H_kv) D]
    nq, nkv, d = heads
    q, k, v = qkv.view(qkv.shape[0], nq + 2 * nkv, d).split_with_sizes((nq, nkv, nkv), 1)  # views of qkv
    q, k = ops.rope_and_write_kv(positions, q, k, v, k_cache, v_cache, meta, k_scales, v_scales, qk_norm)
    return q, k, v, residual


def compose_norm_router(ops: ModelOps, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                        eps: float, router: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                        counts: torch.Tensor, counted: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOps.norm_router as the three ops it stands for."""
    h, residual = ops.rmsnorm(x, norm_weight, eps, residual)
    router_logits = ops.linear(h, router)  # [T, E]
    weights, ids = ops.select_experts(router_logits, top_k, renormalize, weights_dtype, counts, counted)
    return h, residual, weights, ids


def make_ops(name: str, cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype,
             max_positions: int) -> ModelOps:
    if name == "torch":
        from llmesh.engine.model.ops_torch import TorchOps

        return TorchOps(cfg, device=device, dtype=dtype, max_positions=max_positions)
    if name == "triton":
        from llmesh.engine.model.ops_triton import TritonOps

        return TritonOps(cfg, device=device, max_positions=max_positions)
    raise ValueError(f"model op table {name!r} is unknown (known: {', '.join(OP_TABLES)})")

"""The torch op table: plain PyTorch in Hugging Face's order of operations (the oracle).

Runs on the CPU or a GPU. What it caches is what HF would recompute identically each
step (RoPE cos/sin per position), so caching changes speed, not a single bit.
"""

from __future__ import annotations

import torch

from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.layers import apply_rotary_signed, rms_norm, rope_inv_freq, signed_sin
from llmesh.engine.model.ops import compose_norm_qkv_rope, compose_norm_router
from llmesh.engine.quant.linear import Weight, dequantize_rows, linear
from llmesh.kernels.fused_moe_ref import fused_moe_ref
from llmesh.kernels.moe_router import topk_softmax_ref
from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref, write_kv_ref


class TorchOps:
    name = "torch"

    def __init__(self, cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype, max_positions: int) -> None:
        self.device, self.dtype = device, dtype
        self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """(positions, cos rows, signed sin rows) [T, 1, D] of the step running: every layer
        rotates at the same positions."""
        self._grow_rope(max_positions)

    def _grow_rope(self, positions: int) -> None:
        # As RotaryEmbedding: float32 frequencies, cos/sin rounded to the model dtype.
        pos = torch.arange(positions, device=self.device).to(torch.float32)
        freqs = pos[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.max_seq_len > self._cos.shape[0]:  # positions < seq_lens <= max_seq_len
            self._grow_rope(max(meta.max_seq_len, 2 * self._cos.shape[0]))
        self._rows = None  # gathered again by the step's first layer

    def embed(self, weight: Weight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(weight, ids, dtype)

    def linear(self, x: torch.Tensor, w: Weight | list[Weight], bias: torch.Tensor | None = None) -> torch.Tensor:
        # Packed weights on a GPU use the Triton GEMMs; on the CPU PyTorch's packed kernels
        # where the format has one (float32 accumulation, like the dequantizing reference).
        kernels = x.is_cuda
        if isinstance(w, list):
            y = torch.cat([linear(x, part, kernels=kernels, cpu_kernels=True) for part in w], dim=-1)
            return y if bias is None else y + bias
        return linear(x, w, bias, kernels=kernels, cpu_kernels=True)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = residual + x  # HF: hidden = residual + hidden, in the model dtype
        return rms_norm(x, weight, eps), x

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    w: Weight | list[Weight], bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.rmsnorm(x, norm_weight, eps, residual)
        return self.linear(h, w, bias), residual

    def act_linear(self, gate_up: torch.Tensor, w: Weight | list[Weight], bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
        return self.linear(self.silu_and_mul(gate_up), w, bias)

    norm_qkv_rope = compose_norm_qkv_rope
    norm_router = compose_norm_router

    def rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows
        if rows is None or rows[0] is not positions:
            rows = self._rows = (positions, self._cos.index_select(0, positions)[:, None],
                                 signed_sin(self._sin.index_select(0, positions))[:, None])
        _, cos, sin_signed = rows  # [T, 1, D]
        if (qk := _side_by_side(q, k)) is not None:
            # One rotation over both heads' sets: the same elementwise ops, half the dispatches.
            rotated = apply_rotary_signed(qk, cos, sin_signed)
            return rotated.split_with_sizes((q.shape[1], k.shape[1]), 1)
        return apply_rotary_signed(q, cos, sin_signed), apply_rotary_signed(k, cos, sin_signed)

    def select_experts(self, router_logits: torch.Tensor, top_k: int, renormalize: bool,
                       weights_dtype: torch.dtype, counts: torch.Tensor, counted: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_softmax_ref(router_logits, top_k, renormalize, weights_dtype, counts, counted)

    def moe(self, x: torch.Tensor, experts, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_moe_ref(x, experts.w13, experts.w2, topk_weights, topk_ids, **experts.quant_args())

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        i = x.shape[-1] // 2
        return torch.nn.functional.silu(x[..., :i]) * x[..., i:]

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata, k_scales: torch.Tensor | None = None,
                 v_scales: torch.Tensor | None = None) -> None:
        slots = meta.slot_mapping
        if meta.host_seq_lens is None:  # device-built metadata may carry -1 padding
            keep = slots >= 0
            k, v, slots = k[keep], v[keep], slots[keep]
        write_kv_ref(k_cache, v_cache, k, v, slots, k_scales, v_scales)

    def rope_and_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                          k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                          qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q [T, H_q, D] and k [T, H_kv, D] (after Qwen3's per-head q/k RMSNorm when
        ``qk_norm`` = (q weight, k weight, eps)), and the rotated k and v into the pool."""
        if qk_norm is not None:
            q_w, k_w, eps = qk_norm
            q, k = self.rmsnorm(q, q_w, eps)[0], self.rmsnorm(k, k_w, eps)[0]
        q, k = self.rope(positions, q, k)
        self.write_kv(k_cache, v_cache, k, v, meta, k_scales, v_scales)
        return q, k

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                  k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
        # k, v: the step's own keys (the triton table's dense prefill path reads them); the
        # reference reads everything through the pool.
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, k_scales, v_scales)


def _side_by_side(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, H_q, D] and k [T, H_kv, D] as one [T, H_q + H_kv, D] view where k's heads follow
    q's in memory (both views into the fused qkv projection); None otherwise."""
    t, h_q, d = q.shape
    if (q.stride() != k.stride() or q.stride(2) != 1 or q.stride(1) != d or q.dtype != k.dtype
            or k.data_ptr() != q.data_ptr() + h_q * d * q.element_size()):
        return None
    return q.as_strided((t, h_q + k.shape[1], d), q.stride())

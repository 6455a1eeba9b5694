"""The triton op table: the Triton kernels of llmesh/kernels/ (the ``triton`` backend).

Same contract as the torch table, rearranged for speed: RMSNorm fused with the residual
add, RoPE applied in place on the fused q/k/v projection and K/V written in the same
kernel, dense weights through the skinny GEMM where it beats cuBLAS (quant/linear.py),
packed weights through our quantized GEMMs, and attention by one dispatch function.

At decode sizes the RMSNorm before the qkv and gate_up projections and the SiLU-and-mul before
the down projection run inside the skinny GEMV's prologue (llmesh/kernels/fused_skinny.py), one kernel
instead of two, wherever linear() would pick the skinny kernel for that weight anyway (the
measured table), and inside the INT4 / INT8 fragment-order kernel's where the table's ``+silu_mul`` /
``+rmsnorm`` entries pick it (llmesh/kernels/w4a16_mma.py; the norm's only where LLMESH_MMA_FUSED
names it: it lengthened the H100's batch-1 step, quant_gemm_config.FUSED_INPUTS_DEFAULT); where the
qkv projection's GEMV keeps its norm separate (measured faster at batch 1), RoPE and the K/V write
run in its epilogue instead (llmesh/kernels/skinny_rope_kv.py); everywhere else they stay separate
ops. Before an FP8 linear layer, at any size, they end with the per-token FP8 quantization of their output (rmsnorm_fp8,
silu_and_mul_fp8; per token and 128-channel group before a block-scaled one), so quantizing the
activations costs no kernel of its own.
``LLMESH_FUSED_DECODE=0`` in the environment keeps all of them separate (to A/B the fusions on
one GPU); ``LLMESH_QKV_ROPE=0`` only the RoPE epilogue; ``LLMESH_MMA_FUSED`` names the fragment-order
kernel's fused inputs the table may pick (quant_gemm_config.fused_input_allowed). All are read once,
when the op table is made.
"""

from __future__ import annotations

import os

import torch

from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.ops import compose_norm_qkv_rope, compose_norm_router
from llmesh.engine.quant.linear import Weight, dequantize_rows, fp8_matmul, linear, norm_matmul, silu_mul_matmul
from llmesh.engine.quant.packed import Fp8BlockWeight, Fp8Weight, W4A8Weight
from llmesh.kernels.activation import silu_and_mul, silu_and_mul_fp8
from llmesh.kernels.fused_moe import fused_moe
from llmesh.kernels import moe_norm_router, router_gemv
from llmesh.kernels.moe_router import select_experts
from llmesh.kernels.quant_gemm_config import RMSNORM, SILU_MUL, fused_input_allowed
from llmesh.kernels.attention_config import decode_partition_size
from llmesh.kernels.paged_attention import AttentionMetadata
from llmesh.kernels.dense_causal_attention import dense_causal_attention
from llmesh.kernels.extend_attention import extend_attention
from llmesh.kernels.paged_decode_attention import paged_decode_attention
from llmesh.kernels.prefill_attention import prefill_attention
from llmesh.kernels.common import interpreting
from llmesh.kernels.rmsnorm import rmsnorm, rmsnorm_fp8
from llmesh.kernels.rope import rope_cos_sin_cache
from llmesh.kernels.rope_kv_write import rope_kv_write
from llmesh.kernels.skinny_gemm_config import MAX_M as SKINNY_MAX_M
from llmesh.kernels.skinny_gemm_config import SkinnyConfig, fused_prologue_config, prologue_slower, tuned_config
from llmesh.kernels.skinny_rope_kv import rope_kv_fusable, skinny_rope_kv
from llmesh.kernels.unified_attention import unified_attention

FUSED_DECODE_ENV = "LLMESH_FUSED_DECODE"
QKV_ROPE_ENV = "LLMESH_QKV_ROPE"
"""=0 keeps RoPE and the K/V write out of the qkv GEMV's epilogue (the A/B of that fusion alone)."""


def fused_decode_enabled() -> bool:
    """False when the environment sets LLMESH_FUSED_DECODE=0."""
    return os.environ.get(FUSED_DECODE_ENV, "1").strip() != "0"


def fused_config(a: torch.Tensor, w: Weight | list[Weight], k: int, prologue: bool = True) -> SkinnyConfig | None:
    """The skinny config for a GEMV with a fused prologue reading a: [M, *] into w: [N, k], or
    None where linear() would not use the skinny kernel for w at M rows (not CUDA, packed or
    split weights, not 16-bit, M past the table, no measured entry for (N, k, M bucket)) or,
    with `prologue`, where the fused prologue was measured slower than the separate ops
    (FUSED_SLOWER)."""
    if (not isinstance(w, torch.Tensor) or not a.is_cuda or a.dim() != 2 or w.dim() != 2
            or a.dtype not in (torch.float16, torch.bfloat16) or w.dtype != a.dtype or w.shape[1] != k
            or w.stride(-1) != 1 or a.stride(-1) != 1 or not 0 < a.shape[0] <= SKINNY_MAX_M):
        return None
    if not prologue:
        return tuned_config(a.device, a.shape[0], w.shape[0], k)
    return fused_prologue_config(a.device, a.shape[0], w.shape[0], k)


def rope_epilogue_config(x: torch.Tensor, w: Weight | list[Weight], head_dim: int, k_cache: torch.Tensor,
                         fp8_pool: bool, qk_norm: bool) -> SkinnyConfig | None:
    """The skinny config with which the q/k/v projection of x: [M, K] can carry RoPE and the
    K/V write (skinny_rope_kv), or None: where linear() would not use the skinny GEMV for w at
    M rows, where the RMSNorm prologue is fused instead (it would lose its own fusion), or
    where the epilogue cannot run (skinny_rope_kv.rope_kv_fusable)."""
    config = fused_config(x, w, x.shape[-1], prologue=False)
    if config is None or not prologue_slower(x.device, x.shape[0], w.shape[0], x.shape[-1]):
        return None
    return config if rope_kv_fusable(config, head_dim, k_cache, fp8_pool, qk_norm) else None


def fp8_input(a: torch.Tensor, w: Weight | list[Weight]) -> bool:
    """Whether the op producing a: [M, *] for the FP8 activations of w quantizes its output itself
    (rmsnorm_fp8, silu_and_mul_fp8): one FP8 (per-channel or block-scaled) or W4A8 weight, 16-bit
    2-D a, on a GPU (or the interpreter)."""
    return (isinstance(w, (Fp8Weight, Fp8BlockWeight, W4A8Weight)) and a.dim() == 2
            and a.dtype in (torch.float16, torch.bfloat16) and a.stride(-1) == 1 and (a.is_cuda or interpreting()))


def fp8_group(w: Weight) -> int:
    """Channels per activation scale for w's FP8 input: a block-scaled weight's block width, else
    0 (per token)."""
    return w.block[1] if isinstance(w, Fp8BlockWeight) else 0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              meta: AttentionMetadata, scale: float, k_scales: torch.Tensor | None = None,
              v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal paged attention of q [T, H_q, D] → [T, H_q, D], by the batch's shape:

    - a mixed batch replayed from a CUDA graph: the unified kernel (grid from shapes only);
    - a decode-only batch: the paged decode kernel (no host reads, graph friendly);
    - a batch of prefill chunks that all start at position 0 (nothing cached before them,
      known from the host lists): dense causal attention over the step's own k/v, which
      dispatches to FlashAttention-3 or cuDNN where that was measured faster
      (llmesh/kernels/dense_causal_attention.py);
    - anything else (extends after a cached prefix, chunks beside decodes): extend attention,
      FlashAttention-3 over the contexts gathered out of the pool where that was measured faster
      (llmesh/kernels/extend_attention.py), else the paged prefill kernel, which takes any mix.

    An FP8 pool (k_scales, v_scales given) skips the dense path: attention reads the quantized
    K/V through the pool (extend attention, fresh prompts included), so a prompt sees the keys
    its later decodes and prefix-cache hits see (and the torch reference computes), not their
    unquantized originals.
    """
    scales = dict(k_scales=k_scales, v_scales=v_scales)
    if meta.unified:
        return unified_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                 scale, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, **scales)
    qsl, lens = meta.host_query_start_loc, meta.host_seq_lens
    if (k_scales is None and qsl is not None and lens is not None and meta.query_start_loc is not None
            and all(qsl[s + 1] - qsl[s] == n for s, n in enumerate(lens))):
        return dense_causal_attention(q, k, v, qsl, scale, cu_seqlens=meta.query_start_loc)
    if meta.query_start_loc is None:
        size = decode_partition_size(q.device, q.shape[0] * k_cache.shape[2], meta.max_seq_len)
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                      max_seq_len=meta.max_seq_len, partition_size=size, **scales)
    if qsl is not None and lens is not None:
        return extend_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
                                host_query_start_loc=qsl, host_seq_lens=lens, **scales)
    return prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
                             max_query_len=meta.max_query_len, **scales)


def _plus(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


class TritonOps:
    name = "triton"

    def __init__(self, cfg: ModelConfig, *, device: torch.device, max_positions: int) -> None:
        self.fused_decode = fused_decode_enabled()
        self.qkv_rope = self.fused_decode and os.environ.get(QKV_ROPE_ENV, "1").strip() != "0"
        self.mma_silu_mul, self.mma_rmsnorm = fused_input_allowed(SILU_MUL), fused_input_allowed(RMSNORM)
        # Fixed size: a table that grew would move under a captured CUDA graph.
        self.cos_sin = rope_cos_sin_cache(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions,
                                          device=device)  # [P, D] float32

    def prepare(self, meta: AttentionMetadata) -> None:
        return None

    def embed(self, weight: Weight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(weight, ids, dtype)

    def linear(self, x: torch.Tensor, w: Weight | list[Weight], bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, list):
            y = torch.cat([linear(x, part) for part in w], dim=-1)
            return y if bias is None else y + bias
        return linear(x, w, bias)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rmsnorm(x, weight, eps), x
        return rmsnorm(x, weight, eps, residual=residual)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    def select_experts(self, router_logits: torch.Tensor, top_k: int, renormalize: bool,
                       weights_dtype: torch.dtype, counts: torch.Tensor, counted: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(router_logits, top_k, renormalize, weights_dtype, counts, counted)

    def norm_router(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    router: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                    counts: torch.Tensor, counted: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if moe_norm_router.fusable(x, residual, norm_weight, router):
            h, residual, _, weights, ids = moe_norm_router.norm_router(x, residual, norm_weight, eps, router, top_k,
                                                                       renormalize, weights_dtype, counts, counted)
            return h, residual, weights, ids
        if router_gemv.chosen(x, router, top_k, weights_dtype):  # one token: the GEMV and the choice in one launch
            h, residual = self.rmsnorm(x, norm_weight, eps, residual)
            weights, ids = router_gemv.router(h, router, top_k, renormalize, weights_dtype, counts, counted)
            return h, residual, weights, ids
        return compose_norm_router(self, x, residual, norm_weight, eps, router, top_k, renormalize, weights_dtype,
                                   counts, counted)

    def moe(self, x: torch.Tensor, experts, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, experts.w13, experts.w2, topk_weights, topk_ids, **experts.quant_args())

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    w: Weight | list[Weight], bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        fusable = (self.fused_decode and norm_weight.dtype == x.dtype
                   and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                             and residual.stride(-1) == 1)))
        if fusable and (config := fused_config(x, w, x.shape[-1])) is not None:
            from llmesh.kernels.fused_skinny import rmsnorm_linear

            return rmsnorm_linear(x, residual, norm_weight, eps, w, bias, config=config)
        if (fusable and self.mma_rmsnorm and not isinstance(w, list)
                and (fused := norm_matmul(x, residual, norm_weight, eps, w)) is not None):
            return _plus(fused[0], bias), fused[1]
        if fusable and fp8_input(x, w):
            rows, summed = rmsnorm_fp8(x, norm_weight, eps, residual, group=fp8_group(w))
            return _plus(fp8_matmul(rows, w, x.dtype), bias), x if summed is None else summed
        h, residual = self.rmsnorm(x, norm_weight, eps, residual)
        return self.linear(h, w, bias), residual

    def act_linear(self, gate_up: torch.Tensor, w: Weight | list[Weight], bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
        if (self.fused_decode and gate_up.shape[-1] % 2 == 0
                and (config := fused_config(gate_up, w, gate_up.shape[-1] // 2)) is not None):
            from llmesh.kernels.fused_skinny import silu_mul_linear

            return silu_mul_linear(gate_up, w, bias, config=config)
        if (self.fused_decode and self.mma_silu_mul and not isinstance(w, list)
                and (y := silu_mul_matmul(gate_up, w)) is not None):
            return _plus(y, bias)
        if self.fused_decode and fp8_input(gate_up, w) and gate_up.shape[-1] % 2 == 0:
            return _plus(fp8_matmul(silu_and_mul_fp8(gate_up, group=fp8_group(w)), w, gate_up.dtype), bias)
        return self.linear(self.silu_and_mul(gate_up), w, bias)

    def norm_qkv_rope(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      w: Weight | list[Weight], bias: torch.Tensor | None, heads: tuple[int, int, int],
                      positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, k_scales: torch.Tensor | None = None,
                      v_scales: torch.Tensor | None = None,
                      qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Where the projection runs the skinny GEMV without a norm prologue (batch 1 on the
        # H200), RoPE and the K/V write ride in its epilogue: one launch instead of two.
        config = (rope_epilogue_config(x, w, heads[2], k_cache, k_scales is not None, qk_norm is not None)
                  if self.qkv_rope else None)
        if config is None:
            return compose_norm_qkv_rope(self, x, residual, norm_weight, eps, w, bias, heads, positions, k_cache,
                                         v_cache, meta, k_scales, v_scales, qk_norm)
        h, residual = self.rmsnorm(x, norm_weight, eps, residual)
        nq, nkv, d = heads
        qkv = skinny_rope_kv(h, w, bias, positions, self.cos_sin, k_cache, v_cache, meta.slot_mapping, nq, nkv,
                             config=config)
        q, k, v = qkv.view(qkv.shape[0], nq + 2 * nkv, d).split_with_sizes((nq, nkv, nkv), 1)
        return q, k, v, residual

    def rope_and_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                          k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                          qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        # One kernel: q and k normed per head (Qwen3) and rotated in place, k and v stored (an
        # FP8 pool quantized) in their slots.
        norms = {}
        if qk_norm is not None:
            q_w, k_w, eps = qk_norm
            if q_w.dtype == q.dtype and k_w.dtype == q.dtype:
                norms = dict(q_norm=q_w, k_norm=k_w, eps=eps)
            else:  # the fused norm rounds in q's dtype; a promoting weight keeps the separate op
                q, k = self.rmsnorm(q.contiguous(), q_w, eps)[0], self.rmsnorm(k.contiguous(), k_w, eps)[0]
        return rope_kv_write(positions, q, k, v, self.cos_sin, k_cache, v_cache, meta.slot_mapping, q_out=q, k_out=k,
                             k_scales=k_scales, v_scales=v_scales, **norms)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                  k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
        return attention(q, k, v, k_cache, v_cache, meta, scale, k_scales, v_scales)

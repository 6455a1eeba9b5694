"""ModelConfig: the architecture-neutral description of a Llama-family decoder.

Loaders (HF folder, GGUF) produce it; the model and the KV cache are built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
"""SmolLM2 is a Llama (with tied embeddings); Llama 2/3/3.1 are ``llama``. The last three are
mixtures of experts (model/moe.py): Mixtral on Llama attention, Qwen2-MoE on Qwen2's (qkv
bias, a gated shared expert), Qwen3-MoE on Qwen3's (q/k norm)."""


@dataclass
class ModelConfig:
    architecture: str
    """One of SUPPORTED_ARCHITECTURES."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None, or {"rope_type": "llama3" | "linear", "factor": ..., ...} as in HF configs."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""
    sliding_window: int | None = None
    """Mistral-style window; llmesh caps the served window at it rather than masking."""
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"
    """The checkpoint's own dtype (``bfloat16``, ``float16`` or ``float32``)."""
    name: str = "model"
    """Served model name; the prefix-cache namespace starts from it."""
    num_experts: int = 0
    """Routed experts per sparse layer; 0: a dense model."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int = 0
    """Hidden size of one routed expert's SwiGLU (``intermediate_size`` stays the dense MLP's)."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to 1 (Mixtral always does)."""
    shared_expert_intermediate_size: int = 0
    """A shared expert every token goes through, scaled by sigmoid(shared_expert_gate(x))
    (Qwen2-MoE); 0: none."""
    decoder_sparse_step: int = 1
    """Layer i is sparse when (i + 1) % decoder_sparse_step == 0 (and not in mlp_only_layers)."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """Layers that keep a dense MLP in a model of experts."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` runs a mixture of experts instead of the dense MLP
        (the rule of HF's Qwen2/3-MoE decoder layer; Mixtral's layers are all sparse)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_sparse_layer(i)]

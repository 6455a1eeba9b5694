"""ModelConfig: the architecture-neutral description of a Llama-family decoder.

Loaders (HF folder, GGUF) produce it; the model and the KV cache are built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
"""SmolLM2 is a Llama (with tied embeddings); Llama 2/3/3.1 are ``llama``."""


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

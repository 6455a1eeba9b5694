"""Building blocks of a Llama-family decoder, written to match Hugging Face numerics.

Each op computes in the order HF does (RMSNorm in float32, RoPE cos/sin from float32
frequencies) so greedy tokens agree token for token and float32 logits within 1e-4.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmesh.engine.errors import UnsupportedModelError


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: statistics in float32, the normalised value cast back before the weight."""
    # x: [..., dim]
    dtype = x.dtype
    if x.device.type == "cpu" and dtype == torch.float32 and weight.dtype == torch.float32:
        # In float32 the cast back is the identity and `weight * n` is `n * weight`: the
        # composite's own weight multiply is the same bits in one dispatch instead of three.
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.to(torch.float32)
    if x32.device.type == "cpu":
        # The same ops (pow, mean, add, rsqrt, mul) run by PyTorch's C++ composite: bit for bit
        # HF's value (tests/engine/test_model_ops.py), without five Python-level dispatches a call.
        x32 = torch.nn.functional.rms_norm(x32, (x32.shape[-1],), None, eps)
    else:
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3.1 or linear scaling applied."""
    # Built on the CPU explicitly: models are constructed under torch.device("meta").
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: llama3, linear)")


class RotaryEmbedding:
    """Neox-style (rotate-half) rotary embedding on HF-layout q/k.

    Not an nn.Module on purpose: its frequencies are derived, never loaded, so a model
    built on the meta device and materialised later keeps them.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        self._inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, head_dim]
        inv_freq = self._by_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._by_device[positions.device] = self._inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [T, D] with its first half negated, for `apply_rotary_signed`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def apply_rotary_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` to the last bit in four dispatches instead of nine: rotate_half(x) * sin
    is cat(-x2 * s1, x1 * s2), and (-a) * b rounds exactly as a * (-b), so swapping the halves
    and multiplying by the signed sine is the same product. x: [T, H, D]; cos, sin_signed:
    [T, 1, D] (broadcast over heads)."""
    t, h, d = x.shape
    swapped = x.view(t, h, 2, d // 2).flip(2).view(t, h, d)
    return x * cos + swapped * sin_signed

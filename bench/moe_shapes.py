"""The MoE benchmarks' shapes and random experts (bench/moe_gpu.py, moe_steps.py, moe_autotune.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shapes:
    hidden: int
    experts: int
    top_k: int
    inter: int
    decode_batch: int
    prefill_tokens: int


QWEN3_30B_A3B = Shapes(hidden=2048, experts=128, top_k=8, inter=768, decode_batch=64, prefill_tokens=4096)
SMOKE = Shapes(hidden=64, experts=8, top_k=2, inter=32, decode_batch=4, prefill_tokens=24)


def experts(s: Shapes, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.randn(s.experts, 2 * s.inter, s.hidden, generator=gen, device=device).mul_(0.02).bfloat16()
    w2 = torch.randn(s.experts, s.hidden, s.inter, generator=gen, device=device).mul_(0.02).bfloat16()
    return w13, w2


def expert_bytes(s: Shapes, elem: float) -> float:
    return 3 * s.inter * s.hidden * elem

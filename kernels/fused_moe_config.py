"""Tile configurations of the fused MoE GEMMs (kernels/fused_moe.py).

A table keyed by (E, N, K, M bucket) — E experts, N output columns of one GEMM (I for the
gate/up GEMM, whose program computes both the gate and the up tile; H for the down GEMM), K
its reduction length, M the tokens of the batch rounded up to a bucket — holds measured
winners; any shape it lacks gets the default heuristic (vLLM's ``get_default_config``
reasoning: at decode sizes each expert sees few rows, so BLOCK_M is small and the weights
stream in wide tiles; at prefill sizes BLOCK_M grows to reuse each weight tile across rows).

``bench/moe_gpu.py --autotune`` sweeps CANDIDATES on a GPU and prints entries in the form
TABLE takes; entries are added here only from such a measured run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class MoEConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"MoEConfig.{name} must be a power of two >= 16 (tl.dot tiles), got {v}")


TABLE: dict[tuple[int, int, int, int], MoEConfig] = {}
"""(E, N, K, M bucket) → measured config (empty until a GPU autotune run fills it)."""


def m_bucket(m: int) -> int:
    """The smallest bucket holding ``m`` tokens (the largest bucket past it)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def default_config(m: int, num_experts: int, n: int, k: int, top_k: int) -> MoEConfig:
    """The heuristic for shapes the table lacks.

    Rows per expert average m * top_k / E: below a 16-row tile the GEMM is a weight stream
    (small BLOCK_M, so padding wastes little); past it the tile grows so each weight tile
    loaded serves more rows.
    """
    rows_per_expert = m * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=128 if k >= 128 else 64, num_warps=4, num_stages=3)
    if rows_per_expert <= 64:
        return MoEConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)
    return MoEConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def pick_config(m: int, num_experts: int, n: int, k: int, top_k: int) -> MoEConfig:
    return TABLE.get((num_experts, n, k, m_bucket(m))) or default_config(m, num_experts, n, k, top_k)


CANDIDATES = tuple(
    MoEConfig(bm, bn, bk, w, s)
    for bm, bn, bk, w, s in itertools.product((16, 32, 64, 128), (64, 128), (64, 128), (4, 8), (3, 4))
)
"""What an autotune run sweeps (64 configs: a few minutes per M on a GPU, compiles included)."""

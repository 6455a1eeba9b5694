"""Launch configurations of the skinny dense GEMM (skinny_gemm.py) and the table that says,
per device, weight shape and batch size, whether it beats cuBLAS at all.

At decode sizes (M <= 16 rows) y = x @ W^T streams the whole weight once for a handful of
rows, so its speed is the fraction of the memory bandwidth the kernel sustains. That depends
on the tile shape, the split of K and the number of loads in flight in ways no formula
predicts well, so the choice is measured: bench/gemm_sweep.py times F.linear and a grid of
configs per (N, K, M) on a device and prints `TUNED` entries for the winners. A shape, batch
bucket or device without an entry keeps F.linear: dispatch never guesses. This module does
not import Triton (the engine consults the table on every dense linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmesh.kernels.common import cuda_device_tag, interpreting

MAX_M = 16
"""Rows up to which the skinny kernel is considered; past this cuBLAS's tiles are not wasted."""

M_BUCKETS = (1, 2, 4, 8, 16)
"""A batch of M rows uses the entry of the smallest bucket >= M (tiles are padded to it)."""


@dataclass(frozen=True)
class SkinnyConfig:
    """block_m: rows of x per program (a power of two; >= 16 when `dot`); block_n: weight rows
    (outputs) per program; block_k: K columns per loop step; split_k: programs sharing one
    output tile's K range (partials summed in a fixed order); dot: tl.dot (tensor cores) or
    per-element fused multiply-adds summed once at the end."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    dot: bool

    def short(self) -> str:
        return (f"{'dot' if self.dot else 'fma'} m{self.block_m} n{self.block_n} k{self.block_k} "
                f"s{self.split_k} w{self.num_warps} st{self.num_stages}")


# ---- measured table -----------------------------------------------------------------------
# device tag (llmesh.bench_results.device_tag) -> {(N, K, M bucket): config fields in
# SkinnyConfig order}. Only entries where the kernel beat F.linear in bench/gemm_sweep.py;
# bench/paste_tables.py writes the device's table from the sweep's result file.
TUNED: dict[str, dict[tuple[int, int, int], tuple[int, int, int, int, int, int, bool]]] = {}
TUNED["h100"] = {
    (128, 2048, 1): (1, 4, 1024, 1, 4, 1, False),
    (2048, 4096, 1): (1, 4, 1024, 1, 4, 1, False),
    (4096, 4096, 1): (1, 8, 512, 1, 4, 1, False),
    (4096, 14336, 1): (1, 8, 512, 1, 4, 3, False),
    (5120, 2048, 1): (1, 4, 1024, 1, 4, 1, False),
    (6144, 4096, 1): (1, 4, 1024, 1, 4, 1, False),
    (128256, 4096, 1): (1, 4, 1024, 1, 4, 1, False),
}
# bench/results/gemm_sweep_h200.json (H200, 2026-11-29): M = 1 wins 1.04-1.24x (0.73-0.99 of copy
# bandwidth against cuBLAS's 0.59-0.95); from M = 2 cuBLAS mostly wins, the LM head excepted.
# Qwen3-30B-A3B's dense projections (bench/results/gemm_sweep_h200_moe.json, H200, 2026-11-30):
# at M = 1 the router (128 x 2048) 2.7 us against cuBLAS's 5.3, o (2048 x 4096) 6.4 against 9.3,
# qkv (5120 x 2048) 7.3 against 8.7; from M = 2 cuBLAS keeps qkv.
# One statement a device: gemm_sweep.py prints the device's whole table (the cells it swept
# re-decided, the rest kept) and bench/paste_tables.py replaces this statement with it.
TUNED["h200"] = {(128, 2048, 1): (1, 4, 1024, 1, 4, 1, False),
                 (128, 2048, 2): (1, 4, 1024, 1, 4, 1, False),
                 (128, 2048, 4): (1, 4, 1024, 1, 4, 1, False),
                 (128, 2048, 8): (1, 4, 1024, 1, 4, 1, False),
                 (128, 2048, 16): (16, 16, 128, 8, 4, 4, True),
                 (2048, 4096, 1): (1, 4, 1024, 1, 4, 1, False),
                 (2048, 4096, 2): (1, 8, 1024, 1, 4, 1, False),
                 (2048, 4096, 4): (16, 64, 64, 8, 4, 6, True),
                 (2048, 4096, 8): (16, 64, 64, 8, 4, 6, True),
                 (2048, 4096, 16): (16, 64, 64, 8, 4, 6, True),
                 (4096, 4096, 1): (1, 8, 1024, 1, 4, 1, False),
                 (4096, 4096, 8): (16, 32, 128, 3, 4, 4, True),
                 (4096, 4096, 16): (16, 32, 128, 3, 4, 4, True),
                 (4096, 14336, 1): (1, 8, 1024, 1, 4, 1, False),
                 (5120, 2048, 1): (1, 8, 512, 1, 4, 3, False),
                 (6144, 4096, 1): (1, 8, 512, 1, 4, 1, False),
                 (28672, 4096, 1): (1, 4, 1024, 1, 4, 1, False),
                 (128256, 4096, 1): (1, 4, 1024, 1, 4, 1, False),
                 (128256, 4096, 2): (16, 64, 128, 1, 4, 4, True),
                 (128256, 4096, 4): (16, 64, 128, 1, 4, 4, True),
                 (128256, 4096, 8): (16, 64, 128, 1, 4, 4, True),
                 (128256, 4096, 16): (16, 64, 128, 1, 4, 4, True)}

_INTERPRET_DOT = SkinnyConfig(16, 16, 32, 1, 1, 1, True)

# device tag -> {(N, K, M bucket)} where `bench/gemm_sweep.py --ab-fused` measured the skinny
# GEMV with the fused RMSNorm / SiLU-and-mul prologue (fused_skinny.py) slower than the two
# separate kernels: those shapes keep the separate ops. Empty until a GPU run says otherwise.
FUSED_SLOWER: dict[str, set[tuple[int, int, int]]] = {}
FUSED_SLOWER["h100"] = {(4096, 14336, 1), (5120, 2048, 1), (6144, 4096, 1), (28672, 4096, 1)}
# bench/results/gemm_fused_ab_h200.json: at M = 1 the RMSNorm prologue costs more than the
# separate norm kernel for qkv (-5.9 us) and gate_up (-3.8 us, whose programs read 40 KB of
# activation row for a 32 KB weight slice); the SiLU prologue of down saves 2.2 us.
# Qwen3-30B-A3B's qkv (5120 x 2048): 8.80 us fused against 8.73 separate (same file, 2026-11-30).
FUSED_SLOWER["h200"] = {(6144, 4096, 1), (28672, 4096, 1), (5120, 2048, 1)}


def m_bucket(m: int) -> int | None:
    """The table's batch bucket for M rows (None past MAX_M)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return None


def default_config(m: int, n: int, k: int) -> SkinnyConfig:
    """A config that runs anywhere (tests, the interpreter, shapes the sweep has not seen): FMA
    tiles of one x row for M = 1, tl.dot tiles of 16 rows above. Correct, not tuned."""
    if interpreting():
        return SkinnyConfig(1, 16, 32, 1, 1, 1, False) if m == 1 else _INTERPRET_DOT
    if m == 1:
        return SkinnyConfig(1, 16, 256, 1, 4, 3, False)
    return SkinnyConfig(16, 32, 128, 1, 4, 4, True)


def tuned_config(device: torch.device, m: int, n: int, k: int) -> SkinnyConfig | None:
    """The measured winner for y[M, N] = x[M, K] @ W[N, K]^T on `device`, or None where the
    sweep found cuBLAS faster or never ran (then the caller uses F.linear)."""
    bucket = m_bucket(m)
    if bucket is None or device.type != "cuda":
        return None
    table = TUNED.get(cuda_device_tag(device))
    if not table:
        return None
    fields = table.get((n, k, bucket))
    return SkinnyConfig(*fields) if fields is not None else None


def prologue_slower(device: torch.device, m: int, n: int, k: int) -> bool:
    """Whether FUSED_SLOWER says a fused prologue lost to the separate op for this shape here."""
    slower = FUSED_SLOWER.get(cuda_device_tag(device))
    return bool(slower) and (n, k, m_bucket(m)) in slower


def fused_prologue_config(device: torch.device, m: int, n: int, k: int) -> SkinnyConfig | None:
    """tuned_config, except where FUSED_SLOWER says the fused prologue lost on this device."""
    config = tuned_config(device, m, n, k)
    return None if config is None or prologue_slower(device, m, n, k) else config


def _is_pow2(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def check_config(config: SkinnyConfig) -> None:
    if not isinstance(config, SkinnyConfig):
        raise ValueError(f"config must be a SkinnyConfig, got {type(config).__name__}")
    for name in ("block_m", "block_n", "block_k", "num_warps"):
        if not _is_pow2(getattr(config, name)):
            raise ValueError(f"config.{name} must be a power of two, got {getattr(config, name)!r}")
    if config.dot and min(config.block_m, config.block_n, config.block_k) < 16:
        raise ValueError(f"tl.dot tiles need block_m, block_n, block_k >= 16, got {config.short()}")
    if not isinstance(config.split_k, int) or config.split_k < 1:
        raise ValueError(f"config.split_k must be an int >= 1, got {config.split_k!r}")
    if not isinstance(config.num_stages, int) or config.num_stages < 1:
        raise ValueError(f"config.num_stages must be an int >= 1, got {config.num_stages!r}")


def split_plan(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(splits, K columns per split): whole tiles per split, no split empty, so every partial
    the reduction reads is written."""
    tiles = max(1, -(-k // block_k))
    per_split = -(-tiles // max(1, split_k))
    return -(-tiles // per_split), per_split * block_k

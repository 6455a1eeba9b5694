"""Tile shapes and split-K for the weight-only quantized GEMMs (w4a16_gemm, w8a16_gemm).

Decode (M <= 16 tokens) is memory bound: the whole weight is streamed once for a handful
of rows, so what matters is keeping every SM loading. A 16-row tile (tl.dot's minimum)
wastes no bandwidth, and split-K cuts the K range into chunks so that even a layer with few
N tiles launches at least ~2 programs per SM; deep pipelining (num_stages 4) keeps several
weight tiles in flight. Larger M becomes compute bound, so tiles grow to 64/128 rows and
split-K is dropped (the grid is already large, and partials cost memory traffic).

`block_k` counts rows of the *stored* weight: byte rows for INT4 (each holds two K values),
K rows for INT8. A grouped weight needs block_k <= group_size and group_size % block_k == 0,
so each tile uses a single scale row; `pick_config` clamps to that.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from llmesh.kernels.common import cuda_device_tag, interpreting

H100_SMS = 132
_PROGRAMS_PER_SM = 2
_MIN_ITERS_PER_SPLIT = 2  # below this a split's prologue and epilogue outweigh its loads

KINDS = ("w4a16", "w8a16")

FACTORED_MAX_BLOCK_M = 32
"""Tiles of at most this many rows apply grouped INT8 scales after the dot (see w8a16_gemm)."""


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    words: bool = False
    """W4A16: read the codes as int32 words and convert them by bit moves (int_words.py); the
    four byte positions of a word are four dots of block_n / 4 columns (block_n >= 64)."""


# (max M, block_m, block_n, block_k, num_warps, num_stages, fill the GPU with split-K, words),
# per kind. The M <= 16 rows were the best of the sweep in bench/quant_gpu.py on an H100
# (bench/results/quant_h100.json: all four Llama shapes, M = 1, 4, 16; split-K filling ~2
# programs per SM reproduces each shape's best split); the INT4 one is now the int32-word
# kernel: the H200 sweep of 4096x14336 at M = 1 put word kernels in its top four (0.0298 and
# 0.0305 ms, this config the second, against the byte kernel's 0.0348; quant_h200_sweep.json).
_TABLES = {
    "w4a16": (
        (16, 16, 128, 128, 4, 3, True, True),      # decode: memory bound
        (64, 64, 128, 64, 4, 4, True, False),      # small batches: still mostly memory bound
        (None, 128, 128, 64, 8, 3, False, False),  # prefill: compute bound
    ),
    "w8a16": (
        (16, 16, 128, 64, 4, 4, True, False),
        (64, 64, 128, 64, 4, 4, True, False),
        (None, 128, 128, 64, 8, 3, False, False),
    ),
}
_INTERPRET = GemmConfig(block_m=16, block_n=32, block_k=32, split_k=1, num_warps=1, num_stages=1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def largest_pow2_divisor(n: int) -> int:
    return n & -n


def clamp_block_k(block_k: int, group_size: int, grouped: bool) -> int:
    """block_k capped so a tile spans one scale group (a power of two dividing group_size)."""
    return min(block_k, largest_pow2_divisor(group_size)) if grouped else block_k


def k_rows(kind: str, k: int, group_size: int) -> int:
    """Rows of the stored weight along K: Kp/2 byte rows for INT4, K rows for INT8."""
    if kind == "w4a16":
        step = 2 * group_size
        return _cdiv(k, step) * step // 2
    return k


def pick_config(kind: str, m: int, n: int, k: int, group_size: int) -> GemmConfig:
    """Launch configuration for y[M, N] = x[M, K] @ W[K, N] (k: the true in_features)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    grouped = kind == "w4a16" or group_size != k
    if interpreting():
        return GemmConfig(_INTERPRET.block_m, _INTERPRET.block_n,
                          clamp_block_k(_INTERPRET.block_k, group_size, grouped), 1, 1, 1)
    for max_m, block_m, block_n, block_k, num_warps, num_stages, fill, words in _TABLES[kind]:
        if max_m is None or m <= max_m:
            break
    block_k = clamp_block_k(block_k, group_size, grouped)
    split_k = 1
    if fill:
        tiles = max(1, _cdiv(m, block_m) * _cdiv(n, block_n))  # M = 0: an empty launch
        iters = _cdiv(k_rows(kind, k, group_size), block_k)
        want = _cdiv(_PROGRAMS_PER_SM * H100_SMS, tiles)
        split_k = max(1, min(want, iters // _MIN_ITERS_PER_SPLIT, 16))
    return GemmConfig(block_m, block_n, block_k, split_k, num_warps, num_stages, words)


def _is_pow2(v: object) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def check_config(config: GemmConfig, group_size: int, grouped: bool) -> None:
    """A config the kernels can run: power-of-two tiles of at least 16 (tl.dot's minimum) and,
    for grouped scales, block_k dividing group_size."""
    if not isinstance(config, GemmConfig):
        raise ValueError(f"config must be a GemmConfig, got {type(config).__name__}")
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(config, name)
        if not _is_pow2(v) or v < 16:
            raise ValueError(f"config.{name} must be a power of two >= 16, got {v}")
    if grouped and group_size % config.block_k:
        raise ValueError(f"config.block_k={config.block_k} must divide group_size={group_size} "
                         "(one scale row per tile)")
    if not isinstance(config.split_k, int) or config.split_k < 1:
        raise ValueError(f"config.split_k must be an int >= 1, got {config.split_k}")
    if config.words and config.block_n < 64:
        raise ValueError(f"config.block_n must be >= 64 with words (four dots of block_n / 4 >= 16 columns), "
                         f"got {config.block_n}")
    if not _is_pow2(config.num_warps) or not isinstance(config.num_stages, int) or config.num_stages < 1:
        raise ValueError(f"config.num_warps must be a power of two and num_stages >= 1, got "
                         f"{config.num_warps} / {config.num_stages}")


def split_plan(rows: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(splits, rows per split): the K rows cut into at most split_k chunks of whole tiles,
    none empty, so every partial the reduction sums is written."""
    iters = max(1, _cdiv(rows, block_k))
    per_split = _cdiv(iters, max(1, split_k))
    return _cdiv(iters, per_split), per_split * block_k


# ---- measured dispatch table ------------------------------------------------------------------
# Which kernel runs a quantized linear is measured, not guessed: bench/quant_gemm.py times every
# candidate per (kind, N, K, M) on a device and writes the winner to TUNED_FILE under the
# device's tag. Candidates: "dot" (w4a16_gemm / w8a16_gemm with a GemmConfig), "gemv"
# (quant_gemv.py with a GemvConfig), "swapped" (w4a16_swapped.py, its GemmConfig as a string;
# a transposed copy of the codes), "mma" (w4a16_mma.py, the CUDA C++ INT4/INT8 kernel with the codes in
# mma.sync's fragment order, its MmaConfig as a string; a copy in that order), and for fp8 "fp8" (fp8_gemm) or "scaled_mm"
# (torch._scaled_mm, cuBLASLt); and three libraries' kernels, "int4pack" (PyTorch's tinygemm),
# "gemlite" and "fbgemm" (FBGEMM GenAI's CUTLASS INT4 and FP8 GEMMs; services/engine/quant/);
# and "dequant" (the weight expanded to x's dtype, then cuBLAS: linear.py's default from
# DEQUANT_GEMM_MIN_M rows, measured against the others at prefill sizes). The "w4a8" kind's
# entries choose between "fbgemm" (f8i4bf16_shuffled, the format's default) and "mma" (the
# fragment-order kernel's W4A8 instance, w4a8_mma.py; bench/quant_w4a8_sweep.py).
# A device, shape or M without an entry keeps the default path.

TUNED_FILE = Path(__file__).with_name("quant_gemm_tuned.json")
CHOICES = ("dot", "gemv", "swapped", "mma", "fp8", "scaled_mm", "int4pack", "gemlite", "fbgemm", "dequant",
           "unfused")
SILU_MUL = "+silu_mul"
"""Suffix of a kind whose entries choose how a down projection takes a fused gate/up output:
["mma", [config]] the fragment-order kernel making silu(gate) * up as it reads x (one launch), or
["unfused", []] silu_and_mul and then the plain kind's own entry. Measured, not assumed: with x
loaded with the codes (xload) every warp redoes the activation of its whole K range."""
RMSNORM = "+rmsnorm"
"""Suffix of a kind whose entries choose how a qkv or gate/up projection takes the hidden state
before its RMSNorm: ["mma", [config]] the fragment-order kernel normalising x (+ residual) as it
reads it, or ["unfused", []] rmsnorm and then the plain kind's entry. Measured: every block of
the fused kernel first reads its rows over the whole K for their statistics."""
FUSED_INPUTS = (SILU_MUL, RMSNORM)
FUSED_INPUTS_ENV = "LLMESH_MMA_FUSED"
"""Which fused inputs the table's entries may pick (comma-separated, e.g. ``silu_mul,rmsnorm``;
``none``: neither): the A/B of each fusion inside the engine's step (bench/decode_ab.sh)."""
FUSED_INPUTS_DEFAULT = "silu_mul"
"""The fusions the engine takes by default: those that won inside the step, not only alone. The
norm did not: with its M = 1 entry (a tie alone, 0.0089 against 0.0090 ms) the 8B INT4 batch-1
step went from 2.618 to 2.790 ms on the H100, where SiLU-mul's took it to 2.582
(kernel_profile_h100_b1_int4_ab_*.json)."""


def fused_input_allowed(suffix: str) -> bool:
    """Whether LLMESH_MMA_FUSED (default FUSED_INPUTS_DEFAULT) lets a ``+silu_mul`` / ``+rmsnorm``
    entry be used."""
    allowed = os.environ.get(FUSED_INPUTS_ENV, FUSED_INPUTS_DEFAULT)
    return suffix.lstrip("+") in {a.strip() for a in allowed.split(",")}


def table_key(kind: str, n: int, k: int, m: int) -> str:
    return f"{kind} {n}x{k} m{m}"


@functools.lru_cache(maxsize=1)
def load_tuned(path: Path = TUNED_FILE) -> dict[str, dict[str, list]]:
    """{device tag: {table_key: [choice, config fields]}} from the file ({} without one)."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def lookup(table: dict[str, list], kind: str, m: int, n: int, k: int) -> tuple[str, tuple] | None:
    """The entry of the smallest measured M >= m for this (kind, N, K), or None when the shape
    was never measured or m lies past the largest measured M (a decode-tuned choice says
    nothing about a prefill's M; the default path's size rules decide there)."""
    prefix = f"{kind} {n}x{k} m"
    measured = sorted(int(key[len(prefix):]) for key in table if key.startswith(prefix))
    pick = next((mm for mm in measured if mm >= m), None)
    if pick is None:
        return None
    choice, fields = table[prefix + str(pick)]
    if choice not in CHOICES:
        raise ValueError(f"{TUNED_FILE.name}: entry {prefix}{pick} names an unknown kernel {choice!r}")
    return choice, tuple(fields)


def tuned_choices_any_m(device, kind: str, n: int, k: int) -> set[tuple[str, tuple]]:
    """Every (choice, fields) the table holds for (kind, N, K) at some M on ``device``: what a
    weight may be dispatched to, so a library kernel's copy of it is made at load."""
    if device.type != "cuda" or interpreting():
        return set()
    prefix = f"{kind} {n}x{k} m"
    table = load_tuned().get(cuda_device_tag(device)) or {}
    return {(choice, tuple(fields)) for key, (choice, fields) in table.items() if key.startswith(prefix)}


def tuned_choice(device, kind: str, m: int, n: int, k: int) -> tuple[str, tuple] | None:
    """The measured kernel for y[M, N] = x[M, K] @ W on ``device`` (None: the default path)."""
    if device.type != "cuda" or interpreting():
        return None
    table = load_tuned().get(cuda_device_tag(device))
    return lookup(table, kind, m, n, k) if table else None

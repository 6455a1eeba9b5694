"""Tile configurations of the fused MoE GEMMs (llmesh/kernels/fused_moe.py).

A table per device (TUNED_FILE, keyed by the device tag, h200 for an H200) maps (E, N, K, M
bucket) — E experts, N output columns of one GEMM (I for the gate/up GEMM, whose program
computes both the gate and the up tile; H for the down GEMM), K its reduction length, M the
tokens of the batch rounded up to a bucket — to measured winners; any shape or device it
lacks gets the default heuristic (vLLM's ``get_default_config``
reasoning: at decode sizes each expert sees few rows, so BLOCK_M is small and the weights
stream in wide tiles; at prefill sizes BLOCK_M grows to reuse each weight tile across rows).

INT4 experts (fused_moe.py's INT4 path) have tables of their own, under the device tag with
":int4" appended (``h200:int4``): their K loop widens codes and scales each group's product,
so the tile that streams bf16 weights best is not the one that streams nibbles best, and
their BLOCK_K counts the rows of each half of the packed codes (a K step covers 2 BLOCK_K).

``bench/moe_gpu.py --autotune`` sweeps CANDIDATES (INT4_CANDIDATES) on a GPU and merges its
winners into TUNED_FILE under the table's tag; entries come only from such a measured run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from dataclasses import astuple, dataclass
from pathlib import Path

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
WARP_SPEC_MAX_ROWS = 64
"""The tallest tiles MoEConfig.warp_spec takes: 64-row tiles ran on an H100 (moe_h100_sorted.json),
16-row ones in the GPU tests on H100 and H200; the down GEMM's 128-row tiles (128 x 128 x 64, 4 warps,
3 stages), which Triton 3.6 compiles and partitions in a second on the CPU, never returned on an H100
(session 48: two autotune calls were cut inside that one change, one 90 s into it), and Triton 3.9's
pass refuses them."""


@dataclass(frozen=True)
class MoEConfig:
    block_m: int
    """Sorted rows a block (a power of two >= 16, tl.dot's tiles), or 1: the GEMV form (``gemv``),
    for blocks of one pair, whose column tiles (block_n) may then be narrower than 16."""
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1
    """Pieces of the K loop run by separate programs (float32 partials, the last to arrive sums
    them and runs the epilogue): more programs for decode batches whose few expert blocks
    leave SMs idle, at the price of the partials' traffic."""
    group_m: int = 0
    """Program order. 0: the sorted blocks fastest, so the programs running together share a
    column tile and each read a different block's rows. g >= 1: g consecutive sorted blocks
    take every column tile before the next g start (Triton's grouped ordering), so a block's
    rows and an expert's weight columns are reused from L2 while they are there: at prefill
    sizes the down GEMM's [T*k, I] input is larger than L2."""
    weight_tma: int = 0
    """1: the weight tiles come in through the tensor memory accelerator (a host-built TMA
    descriptor over the stacked experts; Hopper and later, float / INT8 / FP8 experts), so the
    pipeline's weight loads are bulk copies that take no registers or address arithmetic. 0:
    plain pointer loads. The token rows are a gather (sorted pairs), which stays a plain load
    either way."""
    a_tma: int = 0
    """The down GEMM's (float / INT8 / FP8 experts, tiles of 16 rows or more). 1: the sorted hidden
    layout: the gate/up GEMM writes its rows at their sorted positions, padding rows as zeros, so the
    down GEMM's activation tiles are whole contiguous [block_m, block_k] tiles, read through a TMA
    descriptor instead of gathered by pair; the hidden buffer grows to the padded length. 0: hidden
    rows by pair, gathered."""
    warp_spec: int = 0
    """1 (with a_tma and weight_tma, split_k 1): the down GEMM's K loop warp-specialized by Triton (producer
    warps issue the TMA copies while the rest run the MMAs, as CUTLASS's grouped GEMMs do); Triton
    3.6 partitions such a loop on sm90 at 4 warps and declines at 8 (bench/warp_spec_probe.py)."""
    persistent: int = 0
    """p >= 1 (with a_tma and weight_tma, split_k 1): the down GEMM as a persistent kernel of p
    programs per SM walking the live tiles (fused_moe_persistent.py), its tile loop warp-specialized
    with warp_spec, so the next tile's loads overlap this one's epilogue; the top-k sum is then the
    separate launch. 0: one program per tile."""

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if self.gemv and name == "block_m":
                continue
            least = 1 if self.gemv and name == "block_n" else 16
            if not isinstance(v, int) or v < least or v & (v - 1):
                form = "the GEMV form's column tiles" if least == 1 else "tl.dot tiles; block_m may also be 1"
                raise ValueError(f"MoEConfig.{name} must be a power of two >= {least} ({form}), got {v!r}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"MoEConfig.split_k must be a positive int, got {self.split_k!r}")
        if not isinstance(self.group_m, int) or self.group_m < 0:
            raise ValueError(f"MoEConfig.group_m must be an int >= 0, got {self.group_m!r}")
        if self.weight_tma not in (0, 1):
            raise ValueError(f"MoEConfig.weight_tma must be 0 or 1, got {self.weight_tma!r}")
        if self.weight_tma and max(self.block_n, self.block_k) > 256:
            raise ValueError(f"MoEConfig.weight_tma reads [block_n, block_k] tiles as TMA boxes, at most 256 "
                             f"elements a side; got {self.block_n} x {self.block_k}")
        for name in ("a_tma", "warp_spec"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"MoEConfig.{name} must be 0 or 1, got {getattr(self, name)!r}")
        if self.persistent not in range(5):
            raise ValueError(f"MoEConfig.persistent must be programs per SM in [0, 4], got {self.persistent!r}")
        if self.persistent and not (self.a_tma and self.weight_tma and self.split_k == 1):
            raise ValueError(f"MoEConfig.persistent needs a_tma and weight_tma and no split_k: the persistent down "
                             f"GEMM reads both operands through TMA in whole tiles; got {self}")
        if self.a_tma and (self.gemv or max(self.block_m, self.block_k) > 256):
            raise ValueError(f"MoEConfig.a_tma reads [block_m, block_k] tiles as TMA boxes: tiles of 16 to 256 "
                             f"rows and columns, not the GEMV form; got {self.block_m} x {self.block_k}")
        if self.warp_spec and not (self.a_tma and self.weight_tma and self.split_k == 1):
            raise ValueError("MoEConfig.warp_spec needs a_tma and weight_tma and no split_k: Triton warp-specializes "
                             "a K loop whose operands both come through TMA, not one with gathered rows, and the "
                             f"kernel runs it without split-K's arrivals; got {self}")
        if self.warp_spec and self.block_m > WARP_SPEC_MAX_ROWS:
            raise ValueError(f"MoEConfig.warp_spec takes tiles of at most {WARP_SPEC_MAX_ROWS} rows: a "
                             f"warp-specialized down loop of 128-row tiles hung an H100 under Triton 3.6 and "
                             f"fails Triton 3.9's pass; got {self}")

    @property
    def gemv(self) -> bool:
        """block_m 1: one (token, slot) pair a program, its products summed by FMAs, not tl.dot
        (fused_moe_dense.py's and fused_moe_int4.py's GEMV forms)."""
        return self.block_m == 1


TUNED_FILE = Path(__file__).with_name("fused_moe_tuned.json")
"""{table tag: {"E,N,K,M bucket": [block_m, block_n, block_k, num_warps, num_stages(, split_k(, group_m(,
weight_tma(, a_tma(, warp_spec(, persistent))))))]}}."""

WEIGHT_FORMATS = ("dense", "int4")
"""Expert formats with a table of their own: "dense" (bfloat16 / float16, and the INT8 and FP8
codes, which stream through the same K loop), "int4"."""


def table_tag(device: str, weights: str = "dense") -> str:
    """The key of a device's table for one expert format (``h200``, ``h200:int4``)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown expert weight format {weights!r}; expected one of {WEIGHT_FORMATS}")
    return device if weights == "dense" else f"{device}:{weights}"

Key = tuple[int, int, int, int]


@functools.lru_cache(maxsize=1)
def load_tuned(path: Path = TUNED_FILE) -> dict[str, dict[Key, MoEConfig]]:
    """The measured tables by device tag ({} without the file)."""
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    return {tag: {tuple(int(v) for v in key.split(",")): MoEConfig(*fields) for key, fields in entries.items()}
            for tag, entries in doc.items()}


def merge_tuned(path: Path, tag: str, entries: dict[Key, MoEConfig]) -> None:
    """Write ``entries`` into the file at ``path`` under ``tag`` (other devices' entries kept)."""
    doc = json.loads(path.read_text()) if path.is_file() else {}
    mine = doc.get(tag, {})
    mine.update({",".join(map(str, key)): _fields(cfg) for key, cfg in entries.items()})
    doc[tag] = dict(sorted(mine.items(), key=lambda kv: tuple(int(v) for v in kv[0].split(","))))
    path.write_text(json.dumps(doc, indent=1) + "\n")
    load_tuned.cache_clear()
    _device_table.cache_clear()  # pick_config reads the new entries in this process too


def _fields(cfg: MoEConfig) -> list[int]:
    """A table entry: the fields after split_k (group_m, weight_tma, ...) only up to the last that is
    not 0, as the entries written before them read."""
    fields = list(astuple(cfg))
    while len(fields) > 6 and not fields[-1]:
        fields.pop()
    return fields


@functools.lru_cache(maxsize=8)
def _device_table(device_type: str, index: int | None, weights: str = "dense") -> dict[Key, MoEConfig]:
    if device_type != "cuda":
        return {}
    import torch

    from llmesh.bench_results import device_tag

    return load_tuned().get(table_tag(device_tag(torch.device("cuda", index)), weights), {})


def m_bucket(m: int) -> int:
    """The smallest bucket holding ``m`` tokens (the largest bucket past it)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def default_config(m: int, num_experts: int, n: int, k: int, top_k: int, weights: str = "dense") -> MoEConfig:
    """The heuristic for shapes the table lacks.

    Rows per expert average m * top_k / E: below a 16-row tile the GEMM is a weight stream
    (small BLOCK_M, so padding wastes little); past it the tile grows so each weight tile
    loaded serves more rows. An INT4 K step covers 2 BLOCK_K rows (both halves), so its
    BLOCK_K is half the dense one.
    """
    rows_per_expert = m * top_k / max(num_experts, 1)
    if weights == "int4":
        if rows_per_expert <= 16:
            return MoEConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)
        if rows_per_expert <= 64:
            return MoEConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)
        # the dense table's H200 prefill winner, which ran INT4 experts at 1.67 ms a 4k-token layer
        # (moe_h200_int4.json at 6b9d9ee) where 64 x 128 x 32 tiles took 3.6
        return MoEConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)
    if rows_per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=128 if k >= 128 else 64, num_warps=4, num_stages=3)
    if rows_per_expert <= 64:
        return MoEConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)
    return MoEConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


SHARED_MEMORY_LIMIT = 232448
"""Shared memory one block may opt into on Hopper, where a device reports none (the interpreter)."""


def shared_memory_estimate(config: MoEConfig, act_bytes: int, weight_bytes: int, gated: bool, int4: bool) -> int:
    """Bytes of shared memory one program of this tile takes: Triton's pipeline keeps
    num_stages - 1 copies of the activation and weight tiles in flight, and a dot operand made
    in registers (INT4 codes widened, or any operand cast to float32) is staged once more. On
    the H200 the INT4 gate/up tile 128 x 128 x 64 with 4 stages and float32 activations asked
    for 311,296 bytes, which this gives exactly. The GEMV form stages nothing (Triton pipelines
    only loads that feed tl.dot; its reductions' scratch is a few hundred bytes)."""
    if config.gemv:
        return 0
    k_rows = 2 * config.block_k if int4 else config.block_k  # an INT4 step covers both halves
    b_cols = config.block_n * (2 if gated else 1)  # the gate and up tiles
    a = config.block_m * k_rows * act_bytes
    b = config.block_k * b_cols if int4 else k_rows * b_cols * weight_bytes
    staged = k_rows * config.block_n * act_bytes if int4 or act_bytes == 4 else 0
    return (config.num_stages - 1) * (a + b) + staged


def fit_shared_memory(config: MoEConfig, limit: int, act_bytes: int, weight_bytes: int, gated: bool,
                      int4: bool) -> MoEConfig:
    """``config`` with fewer stages, then shorter K steps, until its estimate fits ``limit``.

    The tables and the heuristic are measured with 16-bit activations; float32 ones (the GPU
    fidelity runs) double the activation tiles, and a prefill tile that fits in bfloat16 does
    not. BLOCK_M stays: the down GEMM shares the gate/up GEMM's sorted blocks."""
    def fits(c: MoEConfig) -> bool:
        return shared_memory_estimate(c, act_bytes, weight_bytes, gated, int4) <= limit

    while not fits(config) and config.num_stages > 2:
        config = dataclasses.replace(config, num_stages=config.num_stages - 1)
    while not fits(config) and config.block_k > 16:
        config = dataclasses.replace(config, block_k=config.block_k // 2)
    return config


def shared_memory_limit(device) -> int:
    """The opt-in shared memory a block of ``device`` (a torch.device) may use."""
    if device is None or device.type != "cuda":
        return SHARED_MEMORY_LIMIT
    import torch

    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_shared_memory(index: int) -> int:  # read once per GPU: fused_moe asks on every launch
    import torch

    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY_LIMIT)


def pick_config(m: int, num_experts: int, n: int, k: int, top_k: int, device=None,
                weights: str = "dense") -> MoEConfig:
    """The measured config for this shape and expert format on ``device`` (a torch.device),
    else the heuristic."""
    table = {}
    if device is not None and device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        table = _device_table("cuda", index, weights)
    return (table.get((num_experts, n, k, m_bucket(m)))
            or default_config(m, num_experts, n, k, top_k, weights))


GEMV_CANDIDATES = tuple(
    MoEConfig(1, bn, bk, w, s)
    for bn, bk, w, s in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (1, 2))
)
"""The GEMV form's sweep (48 configs; blocks of one pair): around the dense projections' measured
FMA winners (skinny_gemm_config.TUNED: 4-8 rows, K steps of 512-1024, 4 warps). Triton (3.6 and
3.9) pipelines only loads that feed tl.dot, so in this form num_stages is ours: 1 loads each K
step's weight tile when the step runs, 2 a step ahead (fused_moe_dense._dense_gemv_loop's
PREFETCH: two steps of the weight stream in flight, at twice the registers for the tiles)."""

CANDIDATES = tuple(
    MoEConfig(bm, bn, bk, w, s)
    for bm, bn, bk, w, s in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (64, 128), (4, 8), (3, 4))
    if bn < 256 or bm >= 64
) + GEMV_CANDIDATES
"""What an autotune run sweeps (112 tiles and the GEMV form's 48, of which bench/moe_gpu.py
compiles those whose BLOCK_M suits the rows per expert). BLOCK_N 32 is for the smallest batches:
at T = 1 the gate/up GEMM has only top-k blocks of rows, and narrower column tiles give more
programs; 256 only with tall tiles (prefill), where each weight tile loaded serves 64-128 rows."""

INT4_GEMV_CANDIDATES = tuple(
    MoEConfig(1, bn, bk, w, s)
    for bn, bk, w, s in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2))
)
"""The INT4 GEMV form's sweep (36 configs): codes are [K rows, N] with N contiguous, so a column
tile of 32-128 bytes a row; K steps of 32-128 code rows (64-256 weights of each column); num_stages
2 loads each step's codes a step ahead (fused_moe_int4._int4_gemv_loop's PREFETCH)."""

INT4_CANDIDATES = tuple(
    MoEConfig(bm, bn, bk, w, s)
    for bm, bn, bk, w, s in itertools.product((16, 32, 64, 128), (32, 64, 128), (32, 64, 128), (4, 8), (3, 4))
) + INT4_GEMV_CANDIDATES
"""The INT4 sweep: BLOCK_K 32 to 128 rows of each half (64 to 256 rows a K step; fused_moe
clamps it to the group)."""

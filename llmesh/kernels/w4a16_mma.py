"""W4A16 at decode sizes with the codes in mma.sync's fragment order: a CUDA C++ kernel.

Our Triton INT4 kernels read the weight at about 1.1 TB/s on the H200 whichever operand it is
(w4a16_gemm.py, quant_gemv.py, w4a16_swapped.py): Triton stages a widened tile through shared
memory or registers in layouts it chooses, and the widening costs per weight. Marlin's answer
is to store the codes so that each lane's 16-byte load *is* its MMA fragments: one load, a lop3
per two codes, no shuffles. Triton cannot place fragments, so this kernel is CUDA C++
(llmesh/kernels/cuda/w4a16_mma.cu, compiled at run time by NVRTC: cuda_rtc.py); the layout idea is
Marlin's, the code ours, the scales are applied after the MMAs (below) rather than before, and
the weight is the MMA's A operand (16 output columns) and x its B (8 rows): at decode sizes an
MMA then wastes no rows of 16 on padding, and a lane holds half the accumulators (so more warps
fit an SM).

Layouts (made once at load from an Int4Weight or Int8Weight, services/engine/quant/mma_weights.py):

codes   int32 [N / 64, Kp / 16, 32, 4]: for column strip c (64 columns), K step s (16 rows),
        lane l = 4 g + t, word w: what would be the lane's B fragments of the m16n8k16 MMAs of
        column groups 2w and 2w + 1 (columns 64 c + 8 (2w + h) + g), which are also its A
        fragment of the MMA of columns 16w..16w+15 (A rows g and g + 8). Within a word, the
        r-th nibble pair (bits 4r..4r+3 and 16+4r..19+4r, r = 0..3) holds column group
        2w + r // 2, rows k = 2t + 8 (r % 2) and k + 1 of the step. The kernel widens a pair
        with one lop3 into bf16 (128 + q_lo, 128 + q_hi) after a shift by 4r.
codes8  int32 [N / 64, Kp / 16, 2, 32, 4] (W8A16, ``pack_codes_int8``): a signed 8-bit
        weight q as u = q + 128 = 16 hi + lo, plane 0 the high nibbles and plane 1 the low, each
        in the 4-bit layout above. The kernel widens hi to bf16 2048 + 16 hi (exact: bf16's
        spacing in [2048, 4096) is 16) and lo to 128 + lo, and both planes' MMAs add into one
        accumulator, x . (u + 2176): two loads and eight MMAs a step where INT4 takes one and
        four, and no extra registers. Its scales are the INT4 form with m = -128 s and groups
        of at most 128 rows (a per-channel scale repeated: ``int8_scales``).
scales  float16 [N / 64, Kp / G, 8, 4, 2, 2]: per strip and group, for g = 0..7 the 32 bytes
        lanes 4g..4g+3 read as two 16-byte loads: for MMA q the scales of columns 16q + g and
        16q + 8 + g (the lane's C-fragment rows), then their mins.

Arithmetic: the MMAs multiply x by (128 + q), exact in bf16 (8-bit codes: by u + 2176); the
block sums each row of x over each group in float32 after staging x; at the end of each group
y += s * acc + (m - 128 s) * sum(x) in float32 (2176 for 128 with 8-bit codes). So w = q * s + m is applied in float32 per output, not rounded to bf16 per weight:
the result is at least as close to x @ W as the reference (quant_ref's dequantize-then-
matmul), not bit-equal to it.

Work: a warp owns a strip over a run of K steps; a block is WN strips x WK warps along K
(summed in shared memory); ``split`` blocks share a strip's K range (float32 partials, the
last to arrive adds them: split_k.py's scheme). Rows come in tiles of 8 (one n8 tile of the
MMA) or 16 (two n8 tiles sharing each widened weight fragment; ``rows``, by default 8 up to 8
rows); each tile re-reads the codes, and the grid runs a strip's tiles side by side (the tile
is the fastest index) so that the first read comes from memory and the others mostly from L2.
The kernel is for M up to a few tiles (decode).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from llmesh.kernels.common import check_out, check_size, check_tensor, pdl_launch
from llmesh.kernels.quant_gemm_config import split_plan
from llmesh.kernels.split_k import split_buffers

MAX_M = 64
"""Rows up to which the dispatch table considers it (four 16-row tiles, each reading the codes)."""

STRIP = 64
GROUP_STEPS = (1, 2, 4, 8, 16)
"""Groups of 16 to 256 input rows (a group is a whole number of 16-row MMA steps)."""


@dataclass(frozen=True)
class MmaConfig:
    wn: int
    """column strips (64 columns each) a block"""
    wk: int
    """warps a strip along K in a block (their sums meet in shared memory)"""
    stages: int
    """bulk = 0: K steps whose codes a lane holds in registers ahead of use (1-8, dividing the
    group's steps); bulk > 0: ring slots a warp (2-16), one being read"""
    split: int
    """blocks along K (float32 partials; the last to arrive adds them)"""
    bulk: int = 0
    """0: each lane loads its 16 bytes a step straight into registers (no shared memory for the
    weight); 1-8 (Hopper): a warp's lane 0 copies this many steps of its codes with one bulk
    copy (TMA's 1-D form) into a ring in shared memory, completion on an mbarrier a slot"""
    rows: int = 0
    """x rows a block: 8 (one n8 tile of the MMA) or 16 (two sharing each widened weight
    fragment); 0: 8 up to 8 rows, else 16. The tiles of a strip run side by side, so past the
    first the codes come from L2"""
    xload: int = 0
    """1 (tiles of 8 rows, bulk 0 only): each lane loads its B fragments of x from global memory
    with its codes, ``stages`` steps ahead, and x's sums come from an MMA against ones: no x tile
    in shared memory and no barrier before the K loop (0: x staged, its sums taken once).
    2 (any tiles, not with the fused activation): x staged a group at a time, one group ahead
    of the MMAs (cp.async, each warp its own K range), its sums from MMAs against ones: the
    weight stream runs while x comes in, where the whole-tile staging held it back"""
    round: int = 0
    """W4A8 only: 0 rounds each widened product to E4M3 by two conversions a pair, 1 by four
    integer operations on its float16 bits (exact for group scales up to 56, which
    w4a8_mma.int_rounding_exact checks; the engine falls back to 0 for others)"""


def config_str(config: MmaConfig) -> str:
    """The dispatch table's form: "wn,wk,stages,split" then ",bulk", ",rows", ",xload" and
    ",round" as far as the last that is not 0."""
    fields = [config.wn, config.wk, config.stages, config.split, config.bulk, config.rows, config.xload, config.round]
    while len(fields) > 4 and not fields[-1]:
        fields.pop()
    return ",".join(str(v) for v in fields)


@functools.lru_cache(maxsize=256)
def parse_config(text: str) -> MmaConfig:
    fields = [int(v) for v in str(text).split(",")]
    if len(fields) not in (4, 5, 6, 7, 8):
        raise ValueError(f"a w4a16_mma config is four to eight integers "
                         f"'wn,wk,stages,split[,bulk[,rows[,xload[,round]]]]', got {text!r}")
    return check_config(MmaConfig(*fields))


def check_config(config: MmaConfig) -> MmaConfig:
    if config.wn < 1 or config.wk < 1 or config.wn * config.wk > 16 or config.wn * config.wk * 32 < 32:
        raise ValueError(f"{config}: wn * wk warps must be 1..16")
    if config.bulk and not 2 <= config.stages <= 16:
        raise ValueError(f"{config}: stages (ring slots) must be 2..16 with bulk copies")
    if not config.bulk and config.stages not in (1, 2, 4, 8):
        raise ValueError(f"{config}: stages (steps held in registers) must be 1, 2, 4 or 8 without bulk copies")
    if config.split < 1:
        raise ValueError(f"{config}: split must be >= 1")
    if config.bulk not in (0, 1, 2, 4, 8):
        raise ValueError(f"{config}: bulk must be 0, 1, 2, 4 or 8 steps")
    if config.rows not in (0, 8, 16):
        raise ValueError(f"{config}: rows must be 0 (by M), 8 or 16")
    if config.xload not in (0, 1, 2) or (config.xload == 1 and (config.bulk or config.rows == 16)):
        raise ValueError(f"{config}: xload is 0, 1 or 2, and 1 only with bulk 0 and tiles of 8 rows")
    if config.round not in (0, 1):
        raise ValueError(f"{config}: round is 0 (conversions) or 1 (integer operations)")
    return config


def default_config(m: int, n: int, kp: int, group: int, sms: int = 132) -> MmaConfig:
    """Eight warps along K per strip, four steps loaded ahead, K split until about two blocks
    per SM (all resident at once: then every block streams at the same share of bandwidth)."""
    wn, wk = 1, 8
    blocks = -(-n // (STRIP * wn)) * -(-m // row_tile(m))
    unit = wk * (group // 16)
    units = max(1, kp // 16 // unit)
    split = max(1, min(units, 2 * sms // blocks))
    return MmaConfig(wn, wk, min(4, group // 16), split)


def split_steps(config: MmaConfig, kp: int, group: int) -> tuple[int, int]:
    """(K steps a split, splits launched): whole groups for each of the WK warps
    (quant_gemm_config.split_plan over K steps in units of WK groups)."""
    splits, per = split_plan(kp // 16, config.wk * (group // 16), config.split)
    return per, splits


RED_ROW = 68
"""Floats a row of the warps' sums in shared memory (64 columns, padded against bank conflicts)."""


def row_tile(m: int, rows: int = 0) -> int:
    """x rows a tile: ``rows`` when set, else 8 (one n8 tile of the MMA) up to 8 rows and 16
    (two) past."""
    return rows or (8 if m <= 8 else 16)


def smem_bytes(config: MmaConfig, rows: int, steps: int, group_steps: int = 1, planes: int = 1) -> int:
    """Shared memory of a block: the bulk-copy ring (none without), x's rows over the block's
    K (16-byte padded rows), a row of zeros and x's float32 sums over each group of ``group_steps``
    K steps (none of those with xload 1; xload 2 stages the tile a group at a time and leaves
the sums' rows unused); the warps' sums reuse it at the end."""
    threads = config.wn * config.wk * 32
    ring = config.stages * threads * 16 * config.bulk * planes
    x_tile = 0 if config.xload == 1 else rows * (steps * 16 + 8) * 2 + 16 + rows * (steps // group_steps) * 4
    return max(ring + x_tile, config.wk * config.wn * rows * RED_ROW * 4)


@dataclass(frozen=True)
class Launch:
    """One call's launch: the template instance, grid (row tiles x strip blocks, splits, 1),
    threads, shared memory and the K steps of a split (the kernel's last argument)."""

    name: str
    grid: tuple[int, int, int]
    threads: int
    smem: int
    split_steps: int


def _template_tail(values: list[int], defaults: tuple[int, ...]) -> str:
    """Template arguments past the fixed ones, as far as the last that is not its default: one
    name, so one compiled instance, per distinct kernel."""
    values = list(values)
    while values and values[-1] == defaults[len(values) - 1]:
        values.pop()
    return "".join(f", {v}" for v in values) + ">"


def plan_launch(config: MmaConfig, m: int, n: int, kp: int, group: int, planes: int = 1, act: int = 0,
                w4a8: bool = False) -> Launch:
    """``planes``: 1 for 4-bit codes, 2 for 8-bit ones (``pack_codes_int8``); ``act``: ACT_CODES of
    ``w4a16_mma``'s ``act`` (1: x is [gate | up] and the input silu(gate) * up; 2: the input is
    rmsnorm(x + residual)); ``w4a8``: the W4A8 instance (w4a8_mma.py: FP8 rows, 4-bit codes, x
    staged whole)."""
    per, splits = split_steps(config, kp, group)
    tile = row_tile(m, config.rows)
    if config.xload == 1 and tile != 8:
        raise ValueError(f"{config}: xload takes tiles of 8 rows ({m} rows ask for 16: set rows to 8)")
    if config.xload == 2 and act:
        raise ValueError(f"{config}: xload 2 copies x as it is; a fused activation or norm is made while staging")
    if w4a8 and (planes != 1 or act or config.xload):
        raise ValueError(f"{config}: the W4A8 instance takes 4-bit codes and stages x whole (xload 0, no act)")
    if config.round and not w4a8:
        raise ValueError(f"{config}: round chooses how the W4A8 instance rounds its products; this is not it")
    grid = (-(-(n // STRIP) // config.wn) * -(-m // tile), splits, 1)
    name = f"w4a16_mma<{config.wn}, {config.wk}, {config.stages}, {group // 16}, {config.bulk}, {tile // 8}"
    # PLANES, XLOAD, ACT, W4A8 (1: products rounded by conversions, 2: by integer operations)
    name += _template_tail([planes, config.xload, act, 1 + config.round if w4a8 else 0], (1, 0, 0, 0))
    smem = smem_bytes(config, min(m, tile), per, group // 16, planes)
    return Launch(name, grid, config.wn * config.wk * 32, smem, per)


# ---- layouts ----

def _fragment_index(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For (t, word, nibble position p = 0..7): the row within the step and the column group
    that nibble holds (the module docstring's rule), and its shift."""
    t = torch.arange(4, device=device).view(4, 1, 1)
    w = torch.arange(4, device=device).view(1, 4, 1)
    p = torch.arange(8, device=device).view(1, 1, 8)
    r, hi = p % 4, p // 4  # nibble pair r, low (k) or high (k + 1) half of the bf16x2
    k = 2 * t + 8 * (r % 2) + hi
    group = 2 * w + r // 2
    shift = 4 * r + 16 * hi
    return k.expand(4, 4, 8), group.expand(4, 4, 8), shift.expand(4, 4, 8)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [Kp, N] (0..15, Int4Weight.codes()) → int32 [N / 64, Kp / 16, 32, 4]."""
    kp, n = codes.shape
    if kp % 16 or n % STRIP:
        raise ValueError(f"codes [Kp, N]={list(codes.shape)}: Kp must be a multiple of 16 and N of {STRIP}")
    c = codes.view(kp // 16, 16, n // STRIP, 8, 8).permute(2, 0, 4, 1, 3)  # [strip, step, g, k, group]
    k, grp, shift = _fragment_index(codes.device)
    nib = c[:, :, :, k, grp].to(torch.int64)                                  # [strip, step, g, t, w, p]
    words = (nib << shift).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.reshape(n // STRIP, kp // 16, 32, 4).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_codes`` read as the kernel reads it: uint8 [Kp, N]."""
    strips, steps = packed.shape[:2]
    k, grp, shift = _fragment_index(packed.device)
    words = packed.view(strips, steps, 8, 4, 4, 1).to(torch.int64) & 0xFFFFFFFF
    nib = (words >> shift) & 0xF                                                # [strip, step, g, t, w, p]
    out = torch.empty(strips, steps, 8, 16, 8, dtype=torch.uint8, device=packed.device)  # [.., g, k, group]
    out[:, :, :, k, grp] = nib.to(torch.uint8)
    return out.permute(1, 3, 0, 4, 2).reshape(steps * 16, strips * STRIP)


def pack_codes_int8(qweight: torch.Tensor, kp: int) -> torch.Tensor:
    """int8 weights [K, N] → int32 [N / 64, Kp / 16, 2, 32, 4]: u = q + 128 as its high nibble
    plane then its low, each in ``pack_codes``'s layout; rows past K are 0 (x is zero there)."""
    k, n = qweight.shape
    if kp < k or kp % 16:
        raise ValueError(f"int8 weight [K, N]={list(qweight.shape)}: Kp={kp} must be >= K and a multiple of 16")
    u = torch.full((kp, n), 128, dtype=torch.int32, device=qweight.device)  # q = 0 past K
    u[:k] += qweight.to(torch.int32)
    return torch.stack([pack_codes((u >> 4).to(torch.uint8)), pack_codes((u & 15).to(torch.uint8))], dim=2)


def int8_group(group: int, k: int) -> int | None:
    """The kernel's group for an int8 weight of K rows and ``group_size`` ``group``: 128 for a
    per-channel scale (group >= K: one scale, repeated every 128 rows), the group itself up to
    128 rows (a multiple of 16), 128 for a multiple of it past; None otherwise."""
    if group >= k:
        return 128
    if group % 16:
        return None
    return group if group <= 128 else (128 if group % 128 == 0 else None)


def int8_scales(scales: torch.Tensor, group: int, k: int, kp: int) -> torch.Tensor:
    """An int8 weight's scales [K / G, N] → ``pack_scales`` of s and m = -128 s over groups of
    ``int8_group(G, K)`` rows through Kp (rows past K get s = 0)."""
    g = int8_group(group, k)
    s = scales.float()
    s = s[:1].expand(kp // g, -1) if group >= k else s.repeat_interleave(group // g, dim=0)
    s = torch.nn.functional.pad(s, (0, 0, 0, kp // g - s.shape[0]))
    return pack_scales(s.half().contiguous(), (-128.0 * s).half().contiguous())


SCALES_SHAPE = "[N/64, Kp/G, 8, 4, 2, 2]"


def pack_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """float16 scales and mins [Kp / G, N] → float16 [N / 64, Kp / G, 8, 4, 2, 2] (g, q,
    scale-or-min, column 16q + g or 16q + 8 + g)."""
    groups, n = scales.shape
    if n % STRIP:
        raise ValueError(f"scales [Kp/G, N]={list(scales.shape)}: N must be a multiple of {STRIP}")
    s = scales.view(groups, n // STRIP, 4, 2, 8)  # [group, strip, q, h, g]: column 16q + 8h + g
    m = mins.view(groups, n // STRIP, 4, 2, 8)
    both = torch.stack([s, m], dim=-1)            # [group, strip, q, h, g, sm]
    return both.permute(1, 0, 4, 2, 5, 3).contiguous()


def unpack_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_scales``: (scales, mins) [Kp / G, N]."""
    strips, groups = packed.shape[:2]
    both = packed.permute(1, 0, 3, 5, 2, 4)       # [group, strip, q, h, g, sm]
    return (both[..., 0].reshape(groups, strips * STRIP), both[..., 1].reshape(groups, strips * STRIP))


def emulate(x: torch.Tensor, packed_codes: torch.Tensor, packed_scales: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernel computes, in torch (float32): per group, x @ (OFF + q) and x's row sums,
    folded by s and m - OFF s (OFF = 128 for 4-bit codes; for 8-bit ones q = 16 hi + lo and
    OFF = 2048 + 128, what widening both planes adds); the CPU tests hold the layouts and the
    fold to the reference."""
    if packed_codes.dim() == 5:
        q = 16 * unpack_codes(packed_codes[:, :, 0]).float() + unpack_codes(packed_codes[:, :, 1]).float()
        off = 2176.0
    else:
        q, off = unpack_codes(packed_codes).float(), 128.0
    s, m = (v.float() for v in unpack_scales(packed_scales))
    kp, k = q.shape[0], x.shape[1]
    xp = torch.nn.functional.pad(x.float(), (0, kp - k))
    y = torch.zeros(x.shape[0], q.shape[1], dtype=torch.float32, device=x.device)
    for gi in range(kp // group):
        xg = xp[:, gi * group:(gi + 1) * group]
        acc = xg @ (off + q[gi * group:(gi + 1) * group])
        y += s[gi] * acc + (m[gi] - off * s[gi]) * xg.sum(1, keepdim=True)
    return y


# ---- launch ----

def shape_unsupported(n: int, k: int, group: int) -> str | None:
    """Why the kernel cannot take a weight of this shape and (kernel) group, or None."""
    if n % STRIP or k % 8 or group % 16 or group // 16 not in GROUP_STEPS:
        return f"needs N % {STRIP} == 0, K % 8 == 0 and a group of 16..256 rows in steps of 16"
    return None


_ACTIVATIONS = {torch.bfloat16: ("bf16", (8, 0), "bf16 mma.sync (sm_80 or newer)"),
                torch.float8_e4m3fn: ("E4M3", (8, 9), "the paired E4M3 conversions (sm_89 or newer)")}
"""Per activation dtype an instance takes (bf16; E4M3 for the W4A8 one): its name, the least
compute capability and what needs it."""


def unsupported(x: torch.Tensor, n: int, group: int, k: int | None = None,
                dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why the kernel cannot serve this call (``k``: its input width, x's by default; ``dtype``:
    the activations the instance takes), or None."""
    if not x.is_cuda:
        return "a CUDA kernel"
    name, capability, needs = _ACTIVATIONS[dtype]
    if x.dtype != dtype:
        return f"{name} activations only (got {x.dtype})"
    if torch.cuda.get_device_capability(x.device) < capability:
        return f"needs {needs}"
    return shape_unsupported(n, x.shape[1] if k is None else k, group)


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


ACT_CODES = {None: 0, "silu_mul": 1, "rmsnorm": 2}
"""What ``w4a16_mma`` may apply to x as it reads it (its ``act``), as the kernel's ACT template argument."""
ACTS = tuple(ACT_CODES)
_NULL = ctypes.c_void_p(0)


def _norm_operands(x: torch.Tensor, k: int, norm, residual, residual_out) -> list:
    """The kernel's last four arguments (residual, residual_out, norm weight, eps): nulls and 0
    without a norm; checked with one."""
    if norm is None:
        if residual is not None or residual_out is not None:
            raise ValueError("w4a16_mma: residual and residual_out come with act='rmsnorm'")
        return [_NULL, _NULL, _NULL, ctypes.c_float(0.0)]
    weight, eps = norm
    check_tensor("norm weight", weight, "[K]", 1, (x.dtype,), device=x.device)
    check_size("norm weight", "K", weight.shape[0], k, "x's K")
    if not weight.is_contiguous() or weight.data_ptr() % 16:  # read as 16-byte vectors
        weight = weight.clone(memory_format=torch.contiguous_format)
    if residual is None:
        if residual_out is not None:
            raise ValueError("w4a16_mma: residual_out without a residual")
        return [_NULL, _NULL, weight, ctypes.c_float(float(eps))]
    for name, t in (("residual", residual), ("residual_out", residual_out)):
        if t is None:
            raise ValueError("w4a16_mma: a residual needs residual_out (x + residual is stored there)")
        check_tensor(name, t, "[M, K]", 2, (x.dtype,), device=x.device)
        check_size(name, "shape", tuple(t.shape), tuple(x.shape), "x's")
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"w4a16_mma: {name} must be contiguous and 16-byte aligned")
    if residual_out.data_ptr() in (residual.data_ptr(), x.data_ptr()):
        raise ValueError("w4a16_mma: residual_out must be a buffer of its own (other blocks still read x "
                         "and the residual while one stores the sum)")
    return [residual, residual_out, weight, ctypes.c_float(float(eps))]


def w4a16_mma(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int, *,
              out: torch.Tensor | None = None, config: MmaConfig | None = None,
              pdl: bool | None = None, act: str | None = None,
              norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
              residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W for W in this kernel's layouts (``pack_codes`` int32 [N / 64, Kp /
    16, 32, 4] or ``pack_codes_int8`` [N / 64, Kp / 16, 2, 32, 4], ``pack_scales`` float16 [N /
    64, Kp / G, 8, 4, 2, 2]); x bf16 on a GPU.

    ``pdl`` (default: common.pdl_launch's rule): programmatic dependent launch, the weight
    copies in flight while the previous kernel drains (the kernel waits before reading x).
    ``act="silu_mul"``: x is [M, 2K], gate then up (a fused gate/up projection's output), and
    y = (silu(gate) * up) @ W, rounded as silu_and_mul rounds, without its launch.
    ``act="rmsnorm"`` with ``norm=(weight [K], eps)``: y = rmsnorm(x + residual) @ W, rounded as
    rmsnorm.rmsnorm rounds, without its launch; with a residual [M, K], x + residual is stored to
    ``residual_out`` [M, K] (contiguous, a buffer of its own), as rmsnorm's second result."""
    if act not in ACTS:
        raise ValueError(f"w4a16_mma: act must be one of {ACTS}, got {act!r}")
    if (act == "rmsnorm") != (norm is not None):
        raise ValueError("w4a16_mma: norm=(weight, eps) goes with act='rmsnorm', and only with it")
    check_tensor("x", x, "[M, 2K] (gate | up)" if act == "silu_mul" else "[M, K]", 2)
    planes = 2 if codes.dim() == 5 else 1  # 8-bit codes as two nibble planes
    codes_shape = "[N/64, Kp/16, 2, 32, 4]" if planes == 2 else "[N/64, Kp/16, 32, 4]"
    check_tensor("codes", codes, codes_shape, 3 + planes, (torch.int32,), device=x.device)
    check_tensor("scales", scales, SCALES_SHAPE, 6, (torch.float16,), device=x.device)
    m, k = x.shape
    if act == "silu_mul":
        if k % 2:
            raise ValueError(f"w4a16_mma: act={act!r} reads x as [gate | up]: its width must be even, got {k}")
        k //= 2
    strips, steps = codes.shape[:2]
    n, kp = strips * STRIP, steps * 16
    if (why := unsupported(x, n, group_size, k)) is not None:
        raise ValueError(f"w4a16_mma: {why}")
    if kp % (2 * group_size) or not kp - 2 * group_size < k <= kp:
        raise ValueError(f"codes hold Kp={kp} input rows; x has K={k}: expected Kp a multiple of "
                         f"2*group_size={2 * group_size} and {kp - 2 * group_size} < K <= {kp}")
    check_size("codes", "shape", tuple(codes.shape), (strips, steps, *((2,) if planes == 2 else ()), 32, 4),
               codes_shape)
    check_size("scales", "shape", tuple(scales.shape), (strips, kp // group_size, 8, 4, 2, 2),
               f"{SCALES_SHAPE} of Kp={kp}, G={group_size}")
    if not (codes.is_contiguous() and scales.is_contiguous()):
        raise ValueError("w4a16_mma: codes and scales must be contiguous")
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)  # rows are read as 16-byte vectors
    norm_args = _norm_operands(x, k, norm, residual, residual_out)
    out = check_out("out", out, (m, n), x.dtype, x.device)
    if out.stride(-1) != 1 or out.stride(0) % 2:
        raise ValueError(f"out must have unit last stride and an even row stride, got {out.stride()}")
    if m == 0:
        return out
    launch(x, out, codes, scales, k, group_size, config, pdl, [*norm_args, _NULL, _NULL],  # no W4A8 scales
           planes=planes, act=ACT_CODES[act])
    return out


def launch(x: torch.Tensor, out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, k: int, group_size: int,
           config: MmaConfig | None, pdl: bool | None, tail: list, *, planes: int = 1, act: int = 0,
           w4a8: bool = False) -> None:
    """Launch the instance for these arguments (checked by the caller: ``w4a16_mma``,
    ``w4a8_mma.w4a8_mma``) with ``config`` (default_config's when None) after checking it
    against the group and the device; ``tail``: the kernel's last six arguments (the fused
    norm's four, W4A8's two scale vectors)."""
    from llmesh.kernels import cuda_rtc

    m, n = out.shape
    kp = codes.shape[1] * 16
    config = check_config(config or default_config(m, n, kp, group_size, _sms(x.device.index or 0)))
    if config.bulk and ((group_size // 16) % config.bulk or torch.cuda.get_device_capability(x.device) < (9, 0)):
        raise ValueError(f"{config}: bulk copies need Hopper (sm_90) and a bulk dividing the group's "
                         f"{group_size // 16} steps")
    if not config.bulk and (group_size // 16) % config.stages:
        raise ValueError(f"{config}: the steps held in registers (stages) must divide the group's "
                         f"{group_size // 16} steps")
    plan = plan_launch(config, m, n, kp, group_size, planes, act, w4a8)
    kernel = cuda_rtc.load("w4a16_mma.cu", plan.name, x.device)
    part, counters = split_buffers("w4a16_mma", out, m, n, plan.grid[1], plan.grid[0])
    if pdl is None:
        pdl = pdl_launch(x.device)["PDL"]
    kernel.launch(plan.grid, plan.threads, plan.smem,
                  [codes, scales, x, out, part, counters, m, n, k, kp, x.stride(0), out.stride(0), plan.split_steps,
                   *tail], pdl=pdl)

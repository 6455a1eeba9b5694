"""The library kernels bench/quant_gemm.py times beside ours: tinygemm, GemLite and FBGEMM as
candidates of the weight-only sweep (LibraryConfig), cuBLASLt's and FBGEMM's FP8 GEMMs as
columns of the main grid, from which the FP8 table's choice per cell is made, and FBGEMM's
W4A8 GEMM (that format's only kernel) as a column of its own."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from quant_common import Run


@dataclass(frozen=True)
class LibraryConfig:
    """A kernel with a weight layout of its own as a candidate, in the dispatch table's terms:
    ``choice`` "int4pack" (PyTorch's tinygemm, ``arg`` its inner-k tiling), "gemlite" (``arg`` its
    matmul type), "fbgemm" (``arg`` its kernel, "shuffled"), "swapped" (our swapped-operand
    INT4 kernel, ``arg`` its config as w4a16_swapped.config_str writes it), "mma" (our CUDA C++
    fragment-order INT4 kernel, ``arg`` as w4a16_mma.config_str writes it) or "dequant" (the
    weight expanded, then cuBLAS; no ``arg``)."""

    choice: str
    arg: int | str

    def short(self) -> str:
        return f"{self.choice} {self.arg}"


def int4pack_candidates(kind: str, q, qs: list, x: torch.Tensor, smoke: bool) -> list:
    """(config, calls) for tinygemm at each tiling the weight takes (CUDA, bfloat16 x only);
    each ring copy is packed once, outside the timing (the engine packs at load)."""
    from llmesh.engine.quant.int4pack import INNER_K_TILES, int4pack_matmul, pack, supported

    if kind != "w4a16" or smoke or not x.is_cuda or x.dtype != torch.bfloat16:
        return []
    out = []
    for tiles in INNER_K_TILES:
        if not supported(q, tiles):
            continue
        for qc in qs:
            pack(qc, tiles)
        out.append((LibraryConfig("int4pack", tiles), [lambda cfg, qc=qc: int4pack_matmul(x, qc, cfg.arg)
                                                        for qc in qs]))
    return out


def gemlite_candidates(kind: str, q, qs: list, x: torch.Tensor, smoke: bool) -> list:
    """(config, calls) for each gemlite kernel that serves this M (its GEMVs up to M = 4, as its
    own dispatch does, its split-K GEMM above); each ring copy is packed once, outside the timing.
    Its autotuner picks the tiles on the first call (the sweep's correctness check)."""
    from llmesh.engine.quant import gemlite_kernels

    if kind not in ("w4a16", "w8a16") or smoke or not gemlite_kernels.supported(q, x.dtype):
        return []
    if (why := gemlite_kernels.unavailable_reason()) is not None:
        raise RuntimeError(why)
    for qc in qs:
        gemlite_kernels.layer(qc, x.dtype)
    types = [t for t in gemlite_kernels.MATMUL_TYPES if (t.startswith("GEMV") and x.shape[0] <= 4)
             or (t == "GEMM_SPLITK" and x.shape[0] > 1)]
    return [(LibraryConfig("gemlite", t), [lambda cfg, qc=qc: gemlite_kernels.gemlite_matmul(x, qc, cfg.arg)
                                           for qc in qs]) for t in types]


def fbgemm_candidates(kind: str, q, qs: list, x: torch.Tensor, smoke: bool) -> list:
    """(config, calls) for FBGEMM's INT4 GEMM (bf16i4bf16_shuffled; CUDA sm_90+, bfloat16 x);
    each ring copy is shuffled once, outside the timing."""
    from llmesh.engine.quant import fbgemm_kernels

    if kind != "w4a16" or smoke or not x.is_cuda or x.dtype != torch.bfloat16 or not fbgemm_kernels.int4_supported(q):
        return []
    if (why := fbgemm_kernels.unavailable_reason()) is not None:
        raise RuntimeError(why)
    for qc in qs:
        fbgemm_kernels.int4_pack(qc)
    return [(LibraryConfig("fbgemm", fbgemm_kernels.INT4_KERNEL),
             [lambda cfg, qc=qc: fbgemm_kernels.int4_matmul(x, qc) for qc in qs])]


def dequant_candidates(kind: str, q, qs: list, x: torch.Tensor, smoke: bool) -> list:
    """(config, calls) for the weight expanded to bf16 by our kernel, then cuBLAS
    (quant.linear's default past DEQUANT_GEMM_MIN_M rows): the expansion is timed, as the
    engine pays it every call."""
    from llmesh.engine.quant.linear import dequant_matmul

    if kind not in ("w4a16", "w8a16") or not x.is_cuda:
        return []
    return [(LibraryConfig("dequant", ""), [lambda cfg, qc=qc: dequant_matmul(x, qc) for qc in qs])]


SWAPPED_SWEEP = tuple((bn, bk, split, 4, stages) for bn in (64, 128) for bk in (64, 128) for split in (1, 2, 4, 8)
                      for stages in (3, 4)) + ((128, 64, 2, 8, 4), (128, 64, 4, 8, 4), (128, 128, 2, 8, 3),
                                               (128, 128, 4, 8, 3))
"""The swapped kernel's candidates (block_n, block_k, split_k, num_warps, num_stages); block_m is
M rounded up to 16-64. K steps larger than the group are clamped to it."""
SMOKE_SWAPPED_SWEEP = ((64, 16, 2, 4, 2),)


def swapped_candidates(kind: str, q, qs: list, x: torch.Tensor, smoke: bool) -> list:
    """(config, calls) for our swapped-operand INT4 kernel (llmesh/kernels/w4a16_swapped.py: the weight
    on the dot's left, wgmma from registers on Hopper) at each swept tile; each ring copy's codes
    are transposed once, outside the timing (the engine does it at load). ``arg`` is the config
    as the table stores it."""
    from llmesh.engine.quant import swapped_int4
    from llmesh.kernels.quant_gemm_config import GemmConfig
    from llmesh.kernels.w4a16_swapped import MAX_M, config_str, parse_config, w4a16_swapped

    m = x.shape[0]
    if kind != "w4a16" or m > MAX_M or q.group_size % 16 or not (x.is_cuda or smoke):
        return []
    for qc in qs:
        swapped_int4.codes(qc)
    block_m = max(16, 1 << (m - 1).bit_length())
    out, seen = [], set()
    for bn, bk, split, warps, stages in SMOKE_SWAPPED_SWEEP if smoke else SWAPPED_SWEEP:
        bk = min(bk, q.group_size)
        if q.group_size % bk:
            continue
        cfg = config_str(GemmConfig(block_m, bn, bk, split, warps, stages))
        if cfg in seen:
            continue
        seen.add(cfg)
        out.append((LibraryConfig("swapped", cfg),
                    [lambda c, qc=qc: w4a16_swapped(x, swapped_int4.codes(qc), qc.scales, qc.mins, qc.group_size,
                                                    config=parse_config(c.arg)) for qc in qs]))
    return out


MMA_SWEEP = tuple((wn, wk, stages, split, 0) for wn, wk in ((1, 8), (2, 4), (1, 4), (2, 8), (4, 4))
                  for stages in (1, 2, 4, 8) for split in (1, 2, 4, 8)) + \
    tuple((wn, wk, stages, split, bulk) for wn, wk in ((1, 8), (2, 4), (4, 4), (2, 8)) for stages in (2, 4)
          for bulk in (2, 4, 8) for split in (1, 4))
"""The fragment-order kernel's candidates (wn, wk, stages, split, bulk); a split past the K
range's whole groups launches fewer blocks (the same config as a smaller split: tried once);
bulk copies only where the device is Hopper and the bulk divides the group's steps; steps held
in registers (bulk 0) only where they divide the group's steps; none whose shared memory does not
fit a block."""
SMOKE_MMA_SWEEP = ((1, 8, 8, 1, 0), (1, 4, 4, 2, 0))


def mma_configs(m: int, n: int, kp: int, group: int, device: torch.device, smoke: bool, planes: int = 1,
                act: int = 0, w4a8: bool = False, int_round: bool = False) -> list:
    """The fragment-order kernel's candidate MmaConfigs for m rows of a [kp, n] weight in groups
    of ``group``: the sweep's (wn, wk, stages, split, bulk) rows crossed with the x-loading
    variants that suit m, less those the device cannot run (bulk copies off Hopper), whose
    register ring or bulk does not divide the group's steps, whose shared memory does not fit a
    block, or that launch the same blocks as one already listed. Past 8 rows, tiles of 16 rows
    (the default) and of 8 (twice the reads, the repeats from L2); up to 8, x staged and x loaded
    with the codes (xload 1, register loads only); at any size x staged a group ahead of the MMAs
    (xload 2; not with the fused activation). The W4A8 instance stages x whole (xload 0), and with
    ``int_round`` (its weight's scales make it exact) each config comes again with the products
    rounded by integer operations (round 1)."""
    from llmesh.kernels.w4a16_mma import MmaConfig, plan_launch, split_steps

    hopper = torch.cuda.get_device_capability(device) >= (9, 0)
    smem_limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    variants = ((0, 0), (8, 0)) if m > 8 else ((0, 0), (0, 1))
    if not act:
        variants += ((0, 2),)
    if w4a8:
        variants = tuple(v for v in variants if v[1] == 0)
    rounds = (0, 1) if w4a8 and int_round else (0,)
    out, seen = [], set()
    for (wn, wk, stages, split, bulk), (rows, xload), rnd in itertools.product(
            SMOKE_MMA_SWEEP if smoke else MMA_SWEEP, variants, rounds):
        if (bulk and (not hopper or (group // 16) % bulk)) or (not bulk and (group // 16) % stages):
            continue
        if xload == 1 and bulk:
            continue
        cfg = MmaConfig(wn, wk, stages, split, bulk, rows, xload, rnd)
        if plan_launch(cfg, m, n, kp, group, planes, act, w4a8).smem > smem_limit:
            continue  # a ring this deep does not fit: not a candidate here
        launched = (wn, wk, stages, bulk, rows, xload, rnd, split_steps(cfg, kp, group))
        if launched not in seen:
            seen.add(launched)
            out.append(cfg)
    return out


def mma_candidates(kind: str, q, qs: list, x: torch.Tensor, smoke: bool, act: str | None = None,
                   norm: tuple | None = None) -> list:
    """(config, calls) for our CUDA C++ INT4/INT8 kernel with the codes in mma.sync's fragment
    order (llmesh/kernels/w4a16_mma.py) at each of ``mma_configs``; each ring copy is re-laid once,
    outside the timing (the engine does it at load). ``arg`` is the config as the table stores it.
    ``act="silu_mul"``: x is [gate | up] and the kernel makes its input silu(gate) * up;
    ``act="rmsnorm"`` with ``norm`` (residual, weight, eps): the kernel makes rmsnorm(x + residual)
    (bench/quant_act.py)."""
    from llmesh.engine.quant import mma_weights
    from llmesh.kernels.w4a16_mma import ACT_CODES, MAX_M, config_str

    if kind not in ("w4a16", "w8a16") or x.shape[0] > MAX_M or not x.is_cuda or not mma_weights.supported(q, x, act):
        return []
    for qc in qs:
        mma_weights.layout(qc)
    lay = mma_weights.layout(q)
    kp, group, planes = lay.codes.shape[1] * 16, lay.group, lay.codes.dim() - 3
    out = []
    for cfg in mma_configs(x.shape[0], q.out_features, kp, group, x.device, smoke, planes, ACT_CODES[act]):
        if act == "rmsnorm":
            calls = [lambda c, qc=qc: mma_weights.norm_mma_matmul(x, norm[0], norm[1], norm[2], qc, c.arg)[0]
                     for qc in qs]
        else:
            calls = [lambda c, qc=qc: mma_weights.mma_matmul(x, qc, c.arg, act) for qc in qs]
        out.append((LibraryConfig("mma", config_str(cfg)), calls))
    return out


LIBRARIES = (("int4pack", int4pack_candidates), ("gemlite", gemlite_candidates), ("fbgemm", fbgemm_candidates),
             ("swapped", swapped_candidates), ("mma", mma_candidates), ("dequant", dequant_candidates))


def scaled_mm_call(x: torch.Tensor, q) -> Callable[[], torch.Tensor]:
    """torch._scaled_mm with per-row / per-column scales on x quantized beforehand (so only the GEMM)."""
    from llmesh.kernels.fp8_gemm import quantize_fp8_per_token_ref

    xq, xs = quantize_fp8_per_token_ref(x)
    ws = q.scales[None, :]  # [1, N]
    fn = lambda: torch._scaled_mm(xq, q.qweight.t(), xs[:, None], ws, out_dtype=x.dtype)  # noqa: E731
    fn()  # raises here when this torch / device / shape has no such GEMM
    return fn


def scaled_mm_cell(run: Run, x: torch.Tensor, qs: list | None, tag: str, bf16_ms: float) -> str:
    if qs is None:
        return f"{'-':>16}"
    try:
        s_ms = run.timer([scaled_mm_call(x, q) for q in qs])
    except Exception as e:  # a reference only: not a failure, the reason is recorded
        run.workload["gemm"].setdefault("scaled_mm_errors", []).append(f"{tag}: {type(e).__name__}: {str(e)[:160]}")
        return f"{'n/a':>16}"
    run.metrics.update({f"gemm_scaled_mm_{tag}_ms": s_ms, f"gemm_scaled_mm_{tag}_speedup_x": bf16_ms / s_ms})
    return f"{s_ms:>9.4f} {bf16_ms / s_ms:>5.2f}x"


def fbgemm_fp8_cell(run: Run, x: torch.Tensor, qs: list | None, tag: str, bf16_ms: float) -> str:
    """FBGEMM's f8f8bf16_rowwise on x quantized beforehand (as scaled_mm_cell), checked against
    our kernel's result before it is timed."""
    from llmesh.engine.quant import fbgemm_kernels
    from llmesh.kernels.fp8_gemm import fp8_gemm, quantize_fp8_per_token_ref

    if qs is None or x.dtype != torch.bfloat16 or not x.is_cuda:
        return f"{'-':>16}"
    try:
        if (why := fbgemm_kernels.unavailable_reason()) is not None:
            raise RuntimeError(why)
        xq, xs = quantize_fp8_per_token_ref(x)
        ref = fp8_gemm(x, qs[0].qweight, qs[0].scales).float()
        got = fbgemm_kernels.fp8_matmul(xq, xs, qs[0], x.dtype).float()
        if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            raise ValueError(f"wrong result: max |diff| {(got - ref).abs().max().item():.3g}")
        f_ms = run.timer([partial(fbgemm_kernels.fp8_matmul, xq, xs, q, x.dtype) for q in qs])
    except Exception as e:  # a candidate: not a failure, the reason is recorded
        run.workload["gemm"].setdefault("fbgemm_fp8_errors", []).append(f"{tag}: {type(e).__name__}: {str(e)[:160]}")
        return f"{'n/a':>16}"
    run.metrics.update({f"gemm_fbgemm_fp8_{tag}_ms": f_ms, f"gemm_fbgemm_fp8_{tag}_speedup_x": bf16_ms / f_ms})
    return f"{f_ms:>9.4f} {bf16_ms / f_ms:>5.2f}x"


def w4a8_ring(run: Run, w: torch.Tensor, ring) -> tuple[list | None, object]:
    """(copies of w quantized to W4A8 and shuffled for FBGEMM, one unshuffled for the reference),
    or (None, None) where FBGEMM's kernel cannot run."""
    from llmesh.engine.quant import fbgemm_kernels
    from llmesh.engine.quant.quantize import quantize_w4a8

    if not w.is_cuda or (why := fbgemm_kernels.unavailable_reason()) is not None:
        if w.is_cuda:
            run.skipped.append(f"gemm w4a8: {why}")
        return None, None
    ref = quantize_w4a8(w)
    first = fbgemm_kernels.w4a8_shuffle(ref.map_tensors(torch.clone))
    return ring(first, first.nbytes(), lambda p: p.map_tensors(torch.clone)), ref


def fbgemm_w4a8_cell(run: Run, x: torch.Tensor, qs: list | None, ref, tag: str, bf16_ms: float,
                     copy_gb_s: float) -> str:
    """FBGEMM's f8i4bf16_shuffled (W4A8, the format's only GPU kernel) on x quantized beforehand,
    checked against linear.w4a8_matmul_ref before it is timed."""
    from llmesh.engine.quant import fbgemm_kernels
    from llmesh.engine.quant.linear import w4a8_matmul_ref
    from llmesh.kernels.fp8_gemm import quantize_fp8_per_token_ref

    if qs is None or x.dtype != torch.bfloat16:
        return f"{'-':>16}"
    try:
        rows = quantize_fp8_per_token_ref(x)
        want = w4a8_matmul_ref(rows, ref, torch.float32)
        got = fbgemm_kernels.w4a8_matmul(rows.xq, rows.scale, qs[0]).float()
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
            raise ValueError(f"wrong result: max |diff| {(got - want).abs().max().item():.3g}")
        ms = run.timer([partial(fbgemm_kernels.w4a8_matmul, rows.xq, rows.scale, q) for q in qs])
    except Exception as e:
        run.fail(f"gemm w4a8 {tag}: {type(e).__name__}: {str(e)[:160]}")
        return f"{'FAILED':>16}"
    gb_s = qs[0].nbytes() / (ms * 1e-3) / 1e9
    run.metrics.update({f"gemm_w4a8_{tag}_ms": ms, f"gemm_w4a8_{tag}_speedup_x": bf16_ms / ms,
                        f"gemm_w4a8_{tag}_gb_s": gb_s, f"gemm_w4a8_{tag}_bw_frac": gb_s / copy_gb_s})
    return f"{ms:>9.4f} {bf16_ms / ms:>5.2f}x"


FP8_CANDIDATES = (("fp8", "gemm_fp8"), ("scaled_mm", "gemm_scaled_mm"), ("fbgemm", "gemm_fbgemm_fp8"))
"""The FP8 table's choices and the main grid's metric that times each."""


def fp8_choices(run: Run, shapes, ms) -> dict[str, list]:
    """fp8_gemm, torch._scaled_mm or FBGEMM's rowwise GEMM per (N, K, M), whichever the main
    table timed fastest (our kernel must have run: it is the fallback)."""
    from llmesh.kernels.quant_gemm_config import table_key

    met, out = run.metrics, {}
    for k, n in shapes:
        for m in ms:
            tag = f"{k}x{n}_m{m}"
            times = [(met[f"{metric}_{tag}_ms"], choice) for choice, metric in FP8_CANDIDATES
                     if f"{metric}_{tag}_ms" in met]
            if f"gemm_fp8_{tag}_ms" in met and len(times) > 1:
                out[table_key("fp8", n, k, m)] = [min(times)[1], []]
    return out

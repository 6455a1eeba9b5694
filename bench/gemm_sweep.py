"""Skinny dense GEMM sweep: kernels/skinny_gemm.py against F.linear (cuBLAS) at decode sizes.

For each Llama-3-8B bf16 projection (weights [N, K] like nn.Linear) — qkv [6144 x 4096],
o [4096 x 4096], gate_up [28672 x 4096], down [4096 x 14336], lm_head [128256 x 4096] — and
M = 1, 2, 4, 8, 16 rows: times F.linear and the kernel over a grid of SkinnyConfigs (FMA
rows, FMA tiles, tl.dot tiles; each without split-K and with the splits that fill the GPU),
checks every config once against F.linear in float32, and reports the best config per
(shape, M): its GB/s (weight bytes / time), that as a fraction of the device-to-device copy
bandwidth measured in the same run, and its speedup over F.linear.

Timing: the calls replayed from one CUDA graph (how the engine runs decode steps: host launch
overhead out, the split-K reduce kernel's launch in) over a ring of weight copies that
together exceed 3x the L2 cache, so every call reads its weight from memory; mean of the
replays (quant_common.graph_ms).

Output: a table, bench/results/gemm_sweep_<dev>.json (metrics skinny_gemm_m<M>_bw_frac_<shape>,
skinny_gemm_m<M>_speedup_x_<shape>, flinear_m<M>_bw_frac_<shape>, copy_tb_s, ...; every
config's time in workload.configs) and the `TUNED` literal for kernels/skinny_gemm_config.py:
the (N, K, M bucket) entries where the best config beat F.linear by at least MIN_SPEEDUP.

Usage (GPU, about 2-3 minutes, mostly Triton compiles): python bench/gemm_sweep.py
  [--out DIR] [--budget-s 150] [--shapes qkv,o,gate_up,down,lm_head] [--ms 1,2,4,8,16]
--smoke: tiny shapes through Triton's interpreter on the CPU, results to a scratch folder.
"""

from __future__ import annotations

import argparse
import os
import pprint
import sys
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import torch

if "--smoke" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs: before any kernel import

import torch.nn.functional as F  # noqa: E402
from gpu_ceilings import (device_name, device_tag, measure_copy_tb_s, pick_device, rounded,  # noqa: E402
                          software_versions, time_ms)
from quant_common import Budget, graph_ms  # noqa: E402

from llmesh.bench_results import RESULTS_DIR, write_result  # noqa: E402
from llmesh.kernels.skinny_gemm import skinny_gemm  # noqa: E402
from llmesh.kernels.skinny_gemm_config import SkinnyConfig, m_bucket, split_plan  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # name -> (N, K)
MS = (1, 2, 4, 8, 16)
SMOKE_SHAPES = {"a": (48, 96), "b": (40, 64)}
SMOKE_MS = (1, 3)

L2_BYTES = 60 << 20
"""H200 L2 (50 MB on an H100): the ring of weight copies a timing cycles through is >= 3x this."""
MIN_SPEEDUP = 1.03
"""A config enters TUNED only this much faster than F.linear: a tie stays with cuBLAS, so run
to run noise cannot flip the dispatch."""
TOL = 1e-2
"""|y - ref| / max|ref| allowed against F.linear in float32: about a bf16 ulp of the output."""

# (block_m, block_n, block_k, num_warps, num_stages, dot); block_m 0 = the M bucket (FMA tiles).
# FMA rows: a [BLOCK_N, BLOCK_K] W tile of 16-byte vectors, 32-64 W elements per thread per step.
FMA_ROWS = ((1, 4, 1024, 4, 1, False), (1, 8, 512, 4, 1, False), (1, 8, 512, 4, 3, False),
            (1, 16, 256, 4, 1, False), (1, 16, 256, 4, 3, False), (1, 16, 512, 8, 1, False),
            (1, 8, 1024, 8, 2, False), (1, 32, 256, 8, 1, False), (1, 16, 512, 4, 1, False),
            (1, 8, 1024, 4, 1, False))
FMA_TILES = ((0, 4, 512, 4, 1, False), (0, 8, 256, 4, 1, False), (0, 8, 256, 8, 3, False))
DOTS = ((16, 16, 128, 4, 4, True), (16, 16, 256, 4, 3, True), (16, 32, 128, 4, 4, True),
        (16, 32, 256, 4, 3, True), (16, 64, 128, 4, 4, True), (16, 16, 512, 4, 2, True),
        (16, 32, 128, 8, 6, True), (16, 64, 64, 4, 6, True))
SMOKE_GRID = ((1, 16, 32, 1, 1, False), (0, 8, 16, 1, 1, False), (16, 16, 32, 1, 1, True))
FMA_ROW_MAX_M = 8     # past this the FMA rows re-read each W tile too often (from L2, but still)
FMA_TILE_MAX_M = 8    # the [M, BN, BK] float32 accumulator outgrows the registers past this


@dataclass
class Cell:
    """One (shape, M): F.linear's time and the configs' times."""

    shape: str
    m: int
    flinear_ms: float
    times: list[tuple[float, SkinnyConfig]]


def candidates(m: int, n: int, k: int, sms: int, smoke: bool) -> list[SkinnyConfig]:
    """The grid for M rows: each base tile without split-K and with the splits that bring the
    launch to >= 2 and >= 4 programs per SM (whole K tiles, at least 2 per split)."""
    out: list[SkinnyConfig] = []
    for block_m, block_n, block_k, warps, stages, dot in (SMOKE_GRID if smoke else FMA_ROWS + FMA_TILES + DOTS):
        if not dot and block_m == 1 and m > FMA_ROW_MAX_M:
            continue
        if block_m == 0:
            if m == 1 or m > FMA_TILE_MAX_M:
                continue
            block_m = m_bucket(m)
        programs = -(-m // block_m) * -(-n // block_n)
        tiles = -(-k // block_k)
        splits = {1}
        for per_sm in (2, 4):
            want = -(-per_sm * sms // programs)
            splits.add(max(1, min(want, tiles // 2)))
        for s in sorted(splits):
            cfg = SkinnyConfig(block_m, block_n, block_k, split_plan(k, block_k, s)[0], warps, stages, dot)
            if cfg not in out:
                out.append(cfg)
    return out


def ring(w: torch.Tensor, cuda: bool) -> list[torch.Tensor]:
    """w and clones of it: at least 2, together >= 3x L2, so cycling through them reads memory."""
    if not cuda:
        return [w]
    copies = max(2, -(-3 * L2_BYTES // (w.numel() * w.element_size())))
    return [w] + [w.clone() for _ in range(copies - 1)]


def timer(fns, cuda: bool, device: torch.device) -> float:
    return graph_ms(fns, reps=20) if cuda else time_ms(fns[0], device, cpu_reps=1)


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] [gemm_sweep] {msg}", flush=True)


def sweep(args: argparse.Namespace, device: torch.device, t0: float) -> tuple[list[Cell], dict]:
    cuda = device.type == "cuda"
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes}
    ms = SMOKE_MS if args.smoke else tuple(args.ms)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    gen = torch.Generator(device).manual_seed(0)
    weights = {name: ring((0.02 * torch.randn(n, k, generator=gen, device=device)).to(torch.bfloat16), cuda)
               for name, (n, k) in shapes.items()}
    log(t0, "weight rings: " + ", ".join(f"{s} x{len(r)}" for s, r in weights.items()))
    info: dict = {"configs": {}, "errors": [], "wrong": [], "skipped": []}
    cells: list[Cell] = []
    budget = Budget(args.budget_s)
    for m in ms:  # M-major: if the budget runs out, every shape has its M = 1 row
        for name, (n, k) in shapes.items():
            if not budget.allows():
                info["skipped"].append(f"{name} m{m}")
                continue
            with budget.item():
                cells.append(measure(name, m, n, k, weights[name], sms, args.smoke, device, gen, info))
            c = cells[-1]
            best = min(c.times, key=lambda t: t[0]) if c.times else None
            log(t0, f"{name:<8} m{m:<3} F.linear {c.flinear_ms * 1e3:8.1f} us  "
                    + (f"best {best[0] * 1e3:8.1f} us [{best[1].short()}] of {len(c.times)}" if best else "no config ran"))
    return cells, info


def measure(name: str, m: int, n: int, k: int, ws: list[torch.Tensor], sms: int, smoke: bool,
            device: torch.device, gen: torch.Generator, info: dict) -> Cell:
    cuda = device.type == "cuda"
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)  # [M, K]
    ref = (x.float() @ ws[0].float().t())  # [M, N]: F.linear in float32
    scale = ref.abs().max().clamp_min(1e-6)
    cell = Cell(name, m, timer([lambda w=w: F.linear(x, w) for w in ws], cuda, device), [])
    for cfg in candidates(m, n, k, sms, smoke):
        key = f"{name} m{m} {cfg.short()}"
        try:
            err = ((skinny_gemm(x, ws[0], config=cfg).float() - ref).abs().max() / scale).item()
            if not err <= TOL:  # NaN fails too
                info["wrong"].append(f"{key}: max error {err:.3g} of max |y|")
                continue
            ms_ = timer([lambda w=w, cfg=cfg: skinny_gemm(x, w, config=cfg) for w in ws], cuda, device)
        except Exception as e:  # a config the compiler or the device refuses (shared memory, registers)
            info["errors"].append(f"{key}: {type(e).__name__}: {str(e)[:160]}")
            continue
        cell.times.append((ms_, cfg))
        info["configs"][key] = round(ms_ * 1e3, 3)
    return cell


def report(cells: list[Cell], copy_tb_s: float, shapes: dict) -> tuple[dict[str, float], dict]:
    """Metrics, the printed table, and the TUNED entries (winners by MIN_SPEEDUP)."""
    metrics: dict[str, float] = {"copy_tb_s": copy_tb_s}
    tuned: dict[tuple[int, int, int], tuple] = {}
    rows = [f"{'shape':<8}{'N x K':>14}{'M':>4}{'F.linear us':>12}{'frac':>6}{'best us':>9}{'GB/s':>7}"
            f"{'frac':>6}{'speedup':>8}  best config"]
    for c in cells:
        n, k = shapes[c.shape]
        nbytes = n * k * 2
        fl_frac = nbytes / (c.flinear_ms * 1e-3) / (copy_tb_s * 1e12)
        metrics[f"flinear_m{c.m}_us_{c.shape}"] = c.flinear_ms * 1e3
        metrics[f"flinear_m{c.m}_bw_frac_{c.shape}"] = fl_frac
        if not c.times:
            rows.append(f"{c.shape:<8}{f'{n}x{k}':>14}{c.m:>4}{c.flinear_ms * 1e3:>12.1f}{fl_frac:>6.2f}  no config ran")
            continue
        best_ms, best = min(c.times, key=lambda t: t[0])
        gb_s = nbytes / (best_ms * 1e-3) / 1e9
        frac, speedup = gb_s / (copy_tb_s * 1e3), c.flinear_ms / best_ms
        metrics.update({f"skinny_gemm_m{c.m}_us_{c.shape}": best_ms * 1e3, f"skinny_gemm_m{c.m}_gb_s_{c.shape}": gb_s,
                        f"skinny_gemm_m{c.m}_bw_frac_{c.shape}": frac,
                        f"skinny_gemm_m{c.m}_speedup_x_{c.shape}": speedup})
        if speedup >= MIN_SPEEDUP and m_bucket(c.m) == c.m:
            tuned[(n, k, c.m)] = astuple(best)
        rows.append(f"{c.shape:<8}{f'{n}x{k}':>14}{c.m:>4}{c.flinear_ms * 1e3:>12.1f}{fl_frac:>6.2f}"
                    f"{best_ms * 1e3:>9.1f}{gb_s:>7.0f}{frac:>6.2f}{speedup:>7.2f}x  {best.short()}")
    print("\n" + "\n".join(rows) + f"\n(frac = GB/s of the weight bytes / copy bandwidth {copy_tb_s:.3f} TB/s; "
          f"speedup = F.linear us / best us)\n", flush=True)
    return metrics, tuned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results; smoke: a scratch folder)")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="no further (shape, M) starts once elapsed + mean item time exceeds this")
    ap.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES), help="subset of " + ",".join(SHAPES))
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=list(MS))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    args = ap.parse_args()
    if unknown := [s for s in args.shapes if s not in SHAPES]:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    device = pick_device(args.device)
    # smoke runs write to a scratch folder so CPU numbers never replace real results
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llmesh-smoke-")) if args.smoke else RESULTS_DIR
    t0 = time.perf_counter()
    copy_tb_s = measure_copy_tb_s(device, 1 / 64 if args.smoke else 1.0)
    log(t0, f"{device_name(device)}: copy {copy_tb_s:.3f} TB/s")
    cells, info = sweep(args, device, t0)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    metrics, tuned = report(cells, copy_tb_s, shapes)
    tag = device_tag(device)
    literal = "TUNED[" + repr(tag) + "] = " + pprint.pformat(dict(sorted(tuned.items())), width=110, sort_dicts=False)
    print("# paste into kernels/skinny_gemm_config.py (fields: block_m, block_n, block_k, split_k, num_warps, "
          f"num_stages, dot); entries beat F.linear by >= {MIN_SPEEDUP}x\n{literal}\n", flush=True)
    workload = {
        "software": software_versions(), "smoke": args.smoke,
        "shapes_n_k": {s: list(v) for s, v in shapes.items()}, "m": list(SMOKE_MS if args.smoke else args.ms),
        "weights": "randn * 0.02 bf16 [N, K]; x randn bf16 [M, K]; y = x @ W^T, no bias",
        "timing": "mean of 20 replays of one CUDA graph over a ring of weight copies >= 3x L2 (>= 2 copies); "
                  "F.linear = cuBLAS; kernel = llmesh.kernels.skinny_gemm (split-K reduce launch included)",
        "bytes": "weight bytes N*K*2; bw_frac = GB/s / copy bandwidth (read + written bytes of a 1 GiB "
                 "device-to-device copy) measured in this run",
        "check": f"every config once against F.linear in float32: max |err| / max |y| <= {TOL}",
        "min_speedup_for_table": MIN_SPEEDUP, "tuned": {f"{n}x{k}_m{m}": list(v) for (n, k, m), v in tuned.items()},
        "tuned_literal": literal, **info}
    path = write_result(f"gemm_sweep_{tag}", workload, rounded(metrics), device=device_name(device),
                        results_dir=out_dir)
    log(t0, f"wrote {path}")
    if info["wrong"] or not any(c.times for c in cells):
        print("[gemm_sweep] FAILED: " + "; ".join(info["wrong"][:5] or ["no config ran"]), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Skinny dense GEMM sweep: llmesh/kernels/skinny_gemm.py against F.linear (cuBLAS) at decode sizes.

For each Llama-3-8B bf16 projection (weights [N, K] like nn.Linear) — qkv [6144 x 4096],
o [4096 x 4096], gate_up [28672 x 4096], down [4096 x 14336], lm_head [128256 x 4096] — and
Qwen3-30B-A3B's dense ones — moe_qkv [5120 x 2048], moe_o [2048 x 4096], moe_router [128 x 2048] — at
M = 1, 2, 4, 8, 16 rows: times F.linear and the kernel over a grid of SkinnyConfigs (FMA
rows, FMA tiles, tl.dot tiles; each without split-K and with the splits that fill the GPU),
checks every config once against F.linear in float32, and reports the best config per
(shape, M): its GB/s (weight bytes / time), that as a fraction of the device-to-device copy
bandwidth measured in the same run, and its speedup over F.linear.

Timing: the calls replayed from one CUDA graph (how the engine runs decode steps: host launch
overhead out, the split-K sum in: since session 44 the tile's last split, same launch) over a
ring of weight copies that together exceed 3x the L2 cache, so every call reads its weight
from memory; mean of the replays (quant_common.graph_ms).

At M = 1 it also times llmesh/kernels/moe_gemv.py's CUDA C++ GEMV (the MoE down kernel's dense
instance) in each GemvConfig, checked the same way: cuda_gemv_m1_us_<shape>, its bw_frac, and
cuda_gemv_m1_vs_best_x_<shape> against the faster of F.linear and the skinny kernel's best config;
the shapes where that reaches MIN_SPEEDUP are printed as the module's DENSE_FASTER entry.

Output: a table, bench/results/gemm_sweep_<dev><suffix>.json (metrics skinny_gemm_m<M>_bw_frac_<shape>,
skinny_gemm_m<M>_speedup_x_<shape>, flinear_m<M>_bw_frac_<shape>, copy_tb_s, ...; every
config's time in workload.configs) and the `TUNED` literal for llmesh/kernels/skinny_gemm_config.py:
the (N, K, M bucket) entries where the best config beat F.linear by at least MIN_SPEEDUP.

Usage (GPU, about 2-3 minutes, mostly Triton compiles): python bench/gemm_sweep.py
  [--out DIR] [--budget-s 150] [--shapes qkv,o,...,moe_router] [--ms 1,2,4,8,16]
--smoke: tiny shapes through Triton's interpreter on the CPU, results to a scratch folder.

--ab-fused (instead of the sweep): at M = 1 on the Llama-3-8B shapes, the decode ops that
llmesh/kernels/fused_skinny.py fuses, each pair timed the same way (one CUDA graph, weight ring):
rmsnorm (with the residual add) + skinny qkv against rmsnorm_linear, the same for gate_up, and
silu_and_mul + skinny down against silu_mul_linear; both sides use the tuned config of that
shape (llmesh/kernels/skinny_gemm_config.py; the default config where the table has none, which is
then named in the output). Prints and records the time saved per layer and per 32-layer step,
and whether the fused outputs equal the unfused ones bit for bit
(bench/results/gemm_fused_ab_<dev>.json). About a minute on a GPU.
"""

from __future__ import annotations

import argparse
import os
import pprint
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, field
from pathlib import Path

import torch

if "--smoke" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs: before any kernel import

import torch.nn.functional as F  # noqa: E402
from gpu_ceilings import (device_name, device_tag, measure_copy_tb_s, pick_device, rounded,  # noqa: E402
                          software_versions, time_ms)
from quant_common import Budget, graph_ms  # noqa: E402

from llmesh.bench_results import RESULTS_DIR, write_result  # noqa: E402
from llmesh.kernels.moe_gemv import GemvConfig, dense_unsupported, gemv  # noqa: E402
from llmesh.kernels.skinny_gemm import skinny_gemm  # noqa: E402
from llmesh.kernels.skinny_gemm_config import (FUSED_SLOWER, TUNED, SkinnyConfig, default_config,  # noqa: E402
                                               m_bucket, split_plan, tuned_config)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096),
          # Qwen3-30B-A3B's dense projections (its experts run in fused_moe): qkv, o, the router
          "moe_qkv": (5120, 2048), "moe_o": (2048, 4096), "moe_router": (128, 2048)}  # name -> (N, K)
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
GEMV_CONFIGS = tuple(GemvConfig(rows, warps, early) for rows in (1, 2) for warps in (4, 8) for early in (False, True))
FMA_ROW_MAX_M = 8     # past this the FMA rows re-read each W tile too often (from L2, but still)
FMA_TILE_MAX_M = 8    # the [M, BN, BK] float32 accumulator outgrows the registers past this


@dataclass
class Cell:
    """One (shape, M): F.linear's time and the configs' times."""

    shape: str
    m: int
    flinear_ms: float
    times: list[tuple[float, SkinnyConfig]]
    gemv: list[tuple[float, GemvConfig]] = field(default_factory=list)


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
    if m == 1 and dense_unsupported(x, ws[0]) is None:
        for cfg in GEMV_CONFIGS:
            key = f"{name} m1 cuda_gemv r{cfg.rows}w{cfg.warps}{'e' if cfg.early else ''}"
            err = ((gemv(x, ws[0], config=cfg).float() - ref).abs().max() / scale).item()
            if not err <= TOL:
                info["wrong"].append(f"{key}: max error {err:.3g} of max |y|")
                continue
            ms_ = timer([lambda w=w, cfg=cfg: gemv(x, w, config=cfg) for w in ws], cuda, device)
            cell.gemv.append((ms_, cfg))
            info["configs"][key] = round(ms_ * 1e3, 3)
    return cell


def complete_table(current: dict, measured: dict, swept: set) -> dict:
    """The device's whole table after a sweep: the cells it timed (``swept``, (N, K, M bucket))
    re-decided, a winner's entry or none where F.linear won, the others as ``current`` (the
    module's) has them. The printed literal then replaces the module's entry without dropping
    the cells another run measured (a sweep of a few shapes or Ms)."""
    table = {key: fields for key, fields in current.items() if key not in swept}
    table.update(measured)
    return dict(sorted(table.items()))


def report(cells: list[Cell], copy_tb_s: float, shapes: dict, gemv_faster: dict | None = None
           ) -> tuple[dict[str, float], dict]:
    """Metrics, the printed table, and the TUNED entries (winners by MIN_SPEEDUP); the (N, K)
    where the CUDA GEMV won by MIN_SPEEDUP go into ``gemv_faster`` with its best config."""
    metrics: dict[str, float] = {"copy_tb_s": copy_tb_s}
    tuned: dict[tuple[int, int, int], tuple] = {}
    gemv_faster = {} if gemv_faster is None else gemv_faster
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
        if c.gemv:
            g_ms, g_cfg = min(c.gemv, key=lambda t: t[0])
            vs = min(best_ms, c.flinear_ms) / g_ms
            metrics.update({f"cuda_gemv_m1_us_{c.shape}": g_ms * 1e3,
                            f"cuda_gemv_m1_bw_frac_{c.shape}": nbytes / (g_ms * 1e-3) / (copy_tb_s * 1e12),
                            f"cuda_gemv_m1_vs_best_x_{c.shape}": vs})
            if vs >= MIN_SPEEDUP:
                gemv_faster[(n, k)] = g_cfg
            rows.append(f"{'':<8}{'':>14}{'':>4}{'CUDA GEMV':>12}{'':>6}{g_ms * 1e3:>9.1f}"
                        f"{nbytes / (g_ms * 1e-3) / 1e9:>7.0f}{nbytes / (g_ms * 1e-3) / (copy_tb_s * 1e12):>6.2f}"
                        f"{vs:>7.2f}x  rows {g_cfg.rows}, warps {g_cfg.warps}{', early' if g_cfg.early else ''}"
                        " (speedup over the faster above)")
    print("\n" + "\n".join(rows) + f"\n(frac = GB/s of the weight bytes / copy bandwidth {copy_tb_s:.3f} TB/s; "
          f"speedup = F.linear us / best us)\n", flush=True)
    return metrics, tuned


AB_PAIRS = {"qkv": "norm", "gate_up": "norm", "down": "act", "moe_qkv": "norm"}  # shape -> the op fused before it
AB_SMOKE_SHAPES = {"qkv": (48, 96), "gate_up": (64, 96), "down": (40, 48), "moe_qkv": (40, 64)}
LLAMA3_8B_LAYERS = 32


def ab_fused(args: argparse.Namespace, device: torch.device, t0: float) -> tuple[dict[str, float], dict]:
    """(metrics, workload details) of the fused-prologue A/B at M = 1."""
    from llmesh.kernels.activation import silu_and_mul
    from llmesh.kernels.fused_skinny import rmsnorm_linear, silu_mul_linear
    from llmesh.kernels.rmsnorm import rmsnorm

    cuda = device.type == "cuda"
    shapes = AB_SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in AB_PAIRS}
    gen = torch.Generator(device).manual_seed(0)
    metrics: dict[str, float] = {}
    info: dict = {"configs": {}, "bit_equal": {}, "max_rel_err": {}, "wrong": []}
    saved = 0.0
    slower: set[tuple[int, int, int]] = set()
    rows = [f"{'pair':<28}{'N x K':>13}{'unfused us':>12}{'fused us':>11}{'saved us':>11}  config"]
    for name, kind in AB_PAIRS.items():
        n, k = shapes[name]
        tuned = tuned_config(device, 1, n, k)
        cfg = tuned or default_config(1, n, k)
        info["configs"][name] = cfg.short() + ("" if tuned else " (default: no TUNED entry)")
        ws = ring((0.02 * torch.randn(n, k, generator=gen, device=device)).to(torch.bfloat16), cuda)
        if kind == "norm":
            x = torch.randn(1, k, generator=gen, device=device).to(torch.bfloat16)  # [1, H]
            res = torch.randn(1, k, generator=gen, device=device).to(torch.bfloat16)
            g = (1 + 0.1 * torch.randn(k, generator=gen, device=device)).to(torch.bfloat16)

            def unfused(w):
                h, r = rmsnorm(x, g, 1e-5, residual=res)
                return skinny_gemm(h, w, config=cfg), r

            def fused(w):
                return rmsnorm_linear(x, res, g, 1e-5, w, config=cfg)
            label = f"rmsnorm+{name} / fused"
        else:
            gu = torch.randn(1, 2 * k, generator=gen, device=device).to(torch.bfloat16)  # [1, 2I]

            def unfused(w):
                return (skinny_gemm(silu_and_mul(gu), w, config=cfg),)

            def fused(w):
                return (silu_mul_linear(gu, w, config=cfg),)
            label = f"silu_and_mul+{name} / fused"
        want, got = unfused(ws[0]), fused(ws[0])
        info["bit_equal"][name] = all(torch.equal(a, b) for a, b in zip(want, got))
        err = ((got[0].float() - want[0].float()).abs().max() / want[0].float().abs().max().clamp_min(1e-6)).item()
        info["max_rel_err"][name] = err
        if not err <= TOL or not torch.equal(got[-1], want[-1]):
            info["wrong"].append(f"{name}: fused differs from unfused, max error {err:.3g} of max |y|")
        un_ms = timer([lambda w=w: unfused(w) for w in ws], cuda, device)
        fu_ms = timer([lambda w=w: fused(w) for w in ws], cuda, device)
        if not name.startswith("moe_"):  # the per-step figures are the 8B's
            saved += un_ms - fu_ms
        metrics.update({f"unfused_us_{name}": un_ms * 1e3, f"fused_us_{name}": fu_ms * 1e3,
                        f"saved_us_{name}": (un_ms - fu_ms) * 1e3, f"speedup_x_{name}": un_ms / fu_ms})
        if fu_ms > un_ms:
            slower.add((n, k, 1))
        rows.append(f"{label:<28}{f'{n}x{k}':>13}{un_ms * 1e3:>12.2f}{fu_ms * 1e3:>11.2f}"
                    f"{(un_ms - fu_ms) * 1e3:>11.2f}  {info['configs'][name]}")
        log(t0, rows[-1])
    metrics["saved_us_per_layer"] = saved * 1e3
    metrics["saved_ms_per_step_llama3_8b"] = saved * LLAMA3_8B_LAYERS
    print("\n" + "\n".join(rows) + f"\nsaved per layer {saved * 1e3:.2f} us; per {LLAMA3_8B_LAYERS}-layer step "
          f"{saved * LLAMA3_8B_LAYERS:.3f} ms; bit-equal: {info['bit_equal']}\n", flush=True)
    # The device's whole set: the shapes timed here re-decided, the others as the module has them.
    timed = {(*shapes[name], 1) for name in AB_PAIRS}
    slower |= FUSED_SLOWER.get(device_tag(device), set()) - timed
    literal = (f"FUSED_SLOWER[{device_tag(device)!r}] = "
               + ("{" + ", ".join(map(repr, sorted(slower))) + "}" if slower else "set()"))
    info["fused_slower_literal"] = literal
    print("# shapes where fusing lost, the device's whole set (bench/paste_tables.py writes it into "
          f"llmesh/kernels/skinny_gemm_config.py; an empty set: fuse all)\n{literal}\n", flush=True)
    # saved per layer counts only pairs the engine would fuse (the others keep the separate ops)
    metrics["saved_us_per_layer_dispatched"] = sum(
        max(0.0, metrics[f"saved_us_{name}"]) for name in AB_PAIRS if not name.startswith("moe_"))
    return metrics, info


def main_ab_fused(args: argparse.Namespace, device: torch.device, out_dir: Path) -> None:
    t0 = time.perf_counter()
    log(t0, f"{device_name(device)}: fused-prologue A/B at M = 1")
    metrics, info = ab_fused(args, device, t0)
    workload = {
        "software": software_versions(), "smoke": args.smoke, "m": 1,
        "pairs": {"qkv": "rmsnorm(x + residual) + skinny_gemm vs rmsnorm_linear",
                  "gate_up": "rmsnorm(x + residual) + skinny_gemm vs rmsnorm_linear",
                  "down": "silu_and_mul + skinny_gemm vs silu_mul_linear",
                  "moe_qkv": "rmsnorm(x + residual) + skinny_gemm vs rmsnorm_linear (Qwen3-30B-A3B)"},
        "shapes_n_k": {s: list(v) for s, v in (AB_SMOKE_SHAPES if args.smoke else
                                                {s: SHAPES[s] for s in AB_PAIRS}).items()},
        "timing": "mean of 20 replays of one CUDA graph over a ring of weight copies >= 3x L2 (>= 2 copies); "
                  "activations one fixed copy (L2 resident, as in a decode step)",
        "per_step": f"saved_ms_per_step_llama3_8b = saved per layer x {LLAMA3_8B_LAYERS} layers", **info}
    path = write_result(f"gemm_fused_ab_{device_tag(device)}", workload, rounded(metrics),
                        device=device_name(device), results_dir=out_dir)
    log(t0, f"wrote {path}")
    if info["wrong"]:
        print("[gemm_sweep] FAILED: " + "; ".join(info["wrong"]), flush=True)
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results; smoke: a scratch folder)")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="no further (shape, M) starts once elapsed + mean item time exceeds this")
    ap.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES), help="subset of " + ",".join(SHAPES))
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=list(MS))
    ap.add_argument("--suffix", default="", help="appended to the sweep's result file name (a partial sweep "
                    "beside the full one: --shapes moe_qkv,moe_o,moe_router --suffix _moe)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    ap.add_argument("--ab-fused", action="store_true",
                    help="instead of the sweep: unfused vs fused-prologue decode ops at M = 1 (rmsnorm + qkv / "
                         "gate_up, silu_and_mul + down)")
    args = ap.parse_args()
    if unknown := [s for s in args.shapes if s not in SHAPES]:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    device = pick_device(args.device)
    # smoke runs write to a scratch folder so CPU numbers never replace real results
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llmesh-smoke-")) if args.smoke else RESULTS_DIR
    if args.ab_fused:
        main_ab_fused(args, device, out_dir)
        return
    t0 = time.perf_counter()
    copy_tb_s = measure_copy_tb_s(device, 1 / 64 if args.smoke else 1.0)
    log(t0, f"{device_name(device)}: copy {copy_tb_s:.3f} TB/s")
    cells, info = sweep(args, device, t0)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    gemv_faster: dict = {}
    metrics, tuned = report(cells, copy_tb_s, shapes, gemv_faster)
    tag = device_tag(device)
    gemv_literal = None
    if any(c.gemv for c in cells):
        gemv_literal = f"DENSE_FASTER[{tag!r}] = {dict(sorted(gemv_faster.items()))!r}"
        print("# llmesh/kernels/moe_gemv.py: the (N, K) this sweep timed where the CUDA GEMV beat F.linear and"
              f" the skinny kernel's best by >= {MIN_SPEEDUP}x at M = 1\n{gemv_literal}\n", flush=True)
    swept = {(*shapes[c.shape], c.m) for c in cells if c.times and m_bucket(c.m) == c.m}
    table = complete_table(TUNED.get(tag, {}), tuned, swept)
    literal = "TUNED[" + repr(tag) + "] = " + pprint.pformat(table, width=110, sort_dicts=False)
    print("# the device's whole table for llmesh/kernels/skinny_gemm_config.py (bench/paste_tables.py writes it;"
          " fields: block_m, block_n, block_k, split_k, num_warps, num_stages, dot): this sweep's cells where a"
          f" config beat F.linear by >= {MIN_SPEEDUP}x, the cells it did not time as the module has them"
          f"\n{literal}\n", flush=True)
    workload = {
        "software": software_versions(), "smoke": args.smoke,
        "shapes_n_k": {s: list(v) for s, v in shapes.items()}, "m": list(SMOKE_MS if args.smoke else args.ms),
        "weights": "randn * 0.02 bf16 [N, K]; x randn bf16 [M, K]; y = x @ W^T, no bias",
        "timing": "mean of 20 replays of one CUDA graph over a ring of weight copies >= 3x L2 (>= 2 copies); "
                  "F.linear = cuBLAS; kernel = llmesh.kernels.skinny_gemm (split-K sum included)",
        "bytes": "weight bytes N*K*2; bw_frac = GB/s / copy bandwidth (read + written bytes of a 1 GiB "
                 "device-to-device copy) measured in this run",
        "check": f"every config once against F.linear in float32: max |err| / max |y| <= {TOL}",
        "min_speedup_for_table": MIN_SPEEDUP, "tuned": {f"{n}x{k}_m{m}": list(v) for (n, k, m), v in tuned.items()},
        "tuned_literal": literal, "cuda_gemv": "llmesh.kernels.moe_gemv.gemv at M = 1, configs "
        + ", ".join(f"rows {c.rows} warps {c.warps}{' early' if c.early else ''}" for c in GEMV_CONFIGS),
        "dense_faster_literal": gemv_literal,
        **info}
    path = write_result(f"gemm_sweep_{tag}{args.suffix}", workload, rounded(metrics), device=device_name(device),
                        results_dir=out_dir)
    log(t0, f"wrote {path}")
    if info["wrong"] or not any(c.times for c in cells):
        print("[gemm_sweep] FAILED: " + "; ".join(info["wrong"][:5] or ["no config ran"]), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Part 2 of bench/quant_gpu.py: the quantized GEMMs against bf16 at Llama-3-8B shapes, and
the GemmConfig sweep at decode sizes (see quant_gpu.py's docstring and bench/README.md); the
library kernels timed beside ours are in quant_libraries.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import torch
import torch.nn.functional as F
from gpu_ceilings import device_tag
from quant_act import act_kinds, act_sweep
from quant_common import Budget, Run, auto_splits
from quant_fp8_sweep import fp8_sweep
from quant_libraries import (LIBRARIES, LibraryConfig, fbgemm_fp8_cell, fbgemm_w4a8_cell, fp8_choices, scaled_mm_cell,
                             w4a8_ring)
from quant_w4a8_sweep import w4a8_sweep

HEADLINE = (4096, 14336)
SHAPES = ((4096, 4096), HEADLINE, (14336, 4096), (4096, 128256))
MS = (1, 4, 16, 32, 64, 128, 256, 2048)
SWEEP_MS = (1, 4, 16)
LIBRARY_MAX_M = 8192
"""Batch sizes past the full sweep's, up to this, still get a table entry: our default config,
the table's current entry and the library kernels are timed (FBGEMM's INT4 GEMM ran 0.7-1.0x
bf16 at M = 32-256 on the H200, where our tl.dot kernels fell to 0.2-0.5x). Past 256 rows the
"dequant" candidate (expand, then cuBLAS: the default path there) competes too, so a prefill
size's entry is a measured choice between it and the libraries."""
# (block_n, block_k, num_warps, num_stages, split): "auto" splits K until ~2 programs per SM
# (pick_config's rule), "2x" twice that, "1" no split. block_k is clamped to the scale group.
SWEEP = ((64, 128, 4, 4, "auto"), (128, 128, 4, 4, "auto"), (128, 64, 4, 4, "auto"), (256, 64, 8, 3, "auto"),
         (64, 64, 4, 6, "auto"), (64, 256, 4, 3, "auto"), (128, 128, 4, 4, "2x"), (64, 128, 8, 4, "1"))
# GEMV candidates (quant_gemv.py): (block_n, block_k, num_warps, num_stages, split_k); block_k
# counts stored rows (INT4: byte rows, two K values each) and is clamped to the scale group.
GEMV_SWEEP = ((64, 64, 4, 3, 1), (64, 64, 4, 3, 2), (64, 64, 4, 3, 4), (128, 32, 4, 3, 2), (32, 128, 4, 3, 2),
              (128, 64, 8, 3, 4), (32, 64, 2, 4, 4), (64, 128, 4, 2, 8))
# The int32-word variants (llmesh/kernels/int_words.py): the W4A16 tl.dot kernel's as SWEEP's rows
# (block_n >= 64), the GEMV's as GEMV_SWEEP's. GEMV tiles of either kind are kept to those whose
# accumulators fit in about 64 registers a thread at the batch's M (their [M, block_k, block_n]
# float32 tile lives in registers; larger ones spill, and at M = 16 took minutes to compile).
WORD_SWEEP = ((64, 128, 4, 3, "auto"), (128, 128, 4, 3, "auto"), (128, 64, 4, 4, "auto"), (256, 64, 8, 3, "auto"),
              (64, 64, 4, 4, "2x"), (128, 128, 8, 4, "1"), (128, 128, 4, 3, "2x"), (64, 128, 4, 3, "2x"),
              (128, 64, 4, 3, "4x"), (64, 64, 4, 3, "4x"))
GEMV_WORD_SWEEP = ((128, 64, 4, 3, 1), (128, 64, 4, 3, 2), (128, 64, 4, 3, 4), (256, 32, 4, 3, 2),
                   (256, 32, 8, 3, 4), (64, 128, 4, 3, 2), (128, 32, 4, 4, 8), (64, 32, 4, 3, 4),
                   (32, 32, 4, 3, 4), (64, 16, 4, 3, 8), (32, 16, 4, 3, 8), (128, 64, 4, 3, 8),
                   (64, 64, 4, 3, 8), (64, 64, 4, 3, 16), (128, 32, 4, 3, 16), (64, 32, 2, 3, 16),
                   # gemlite's GEMV shape: thousands of one- or two-warp programs, each one or two
                   # short K steps, so the warp scheduler hides the load latency that a long
                   # per-program loop must pipeline (split up to 128; the last arrival reduces)
                   (128, 16, 1, 1, 64), (256, 16, 2, 1, 64), (128, 32, 2, 1, 32), (256, 32, 4, 1, 32),
                   (512, 16, 4, 1, 64), (256, 16, 2, 1, 128))
GEMV_ACC_REGS = 64
SMOKE_SHAPES, SMOKE_MS, SMOKE_SWEEP_MS = ((64, 128), (128, 64)), (1, 4), (1,)
SMOKE_SWEEP = ((32, 32, 1, 1, "1"), (16, 32, 1, 1, "auto"))
SMOKE_GEMV_SWEEP = ((16, 32, 1, 1, 1), (16, 16, 1, 1, 2))
SMOKE_WORD_SWEEP = ((64, 32, 1, 1, "1"),)
SMOKE_GEMV_WORD_SWEEP = ((16, 16, 1, 1, 2),)
QUANT_KINDS = ("w8a16", "w4a16", "fp8")


def table_entry(cfg) -> list:
    """The dispatch table's [choice, fields] for a winning candidate."""
    if isinstance(cfg, LibraryConfig):
        return [cfg.choice, [cfg.arg] if cfg.arg != "" else []]
    return ["gemv" if hasattr(cfg, "short") else "dot", list(asdict(cfg).values())]


# ---- 2. GEMM microbenchmarks ------------------------------------------------------------------
L2_BYTES = 50 << 20
"""H100 L2 cache; the timed weight copies together are at least 3x this."""


def ring(obj, nbytes: int, clone: Callable) -> list:
    """``obj`` and enough clones of it that cycling through them never hits in L2."""
    copies = min(16, max(1, -(-3 * L2_BYTES // max(1, nbytes))))
    return [obj] + [clone(obj) for _ in range(copies - 1)]


def kernel_call(kind: str, x: torch.Tensor, q, out: torch.Tensor) -> Callable[..., torch.Tensor]:
    """config -> y [M, N] through our kernel for this packed weight (out preallocated)."""
    if kind == "w4a16":
        from llmesh.kernels.w4a16_gemm import w4a16_gemm

        return lambda config=None: w4a16_gemm(x, q.qweight, q.scales, q.mins, q.group_size, out=out, config=config)
    if kind == "w8a16":
        from llmesh.kernels.w8a16_gemm import w8a16_gemm

        return lambda config=None: w8a16_gemm(x, q.qweight, q.scales, q.group_size, out=out, config=config)
    from llmesh.kernels.fp8_gemm import fp8_gemm

    return lambda config=None: fp8_gemm(x, q.qweight, q.scales, out=out, config=config)


def _word_sum(qweight: torch.Tensor) -> Callable[[], torch.Tensor]:
    words = qweight.view(torch.int32)
    return lambda: words.sum(dtype=torch.int64)


def sweep_configs(kind: str, m: int, n: int, k: int, group: int, device: torch.device, smoke: bool) -> list:
    """The default config first, then the candidates (deduplicated)."""
    from llmesh.kernels.quant_gemm_config import GemmConfig, clamp_block_k, k_rows, pick_config

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    grouped = kind == "w4a16" or group != k
    out = [pick_config(kind, m, n, k, group)]
    rows = [(c, False) for c in (SMOKE_SWEEP if smoke else SWEEP)]
    if kind == "w4a16":
        rows += [(c, True) for c in (SMOKE_WORD_SWEEP if smoke else WORD_SWEEP)]
    for (block_n, block_k, warps, stages, split), words in rows:
        block_m = 16
        block_k = clamp_block_k(block_k, group, grouped)
        tiles = -(-m // block_m) * -(-n // block_n)
        iters = -(-k_rows(kind, k, group) // block_k)
        auto = auto_splits(tiles, iters, sms, 16)
        splits = {"auto": auto, "2x": max(1, min(2 * auto, iters // 2, 32)),
                  "4x": max(1, min(4 * auto, iters // 2, 32)), "1": 1}[split]
        cfg = GemmConfig(block_m, block_n, block_k, splits, warps, stages, words)
        if cfg not in out:
            out.append(cfg)
    return out


def gemv_configs(kind: str, m: int, k: int, group: int, smoke: bool) -> list:
    from llmesh.kernels.common import next_power_of_2
    from llmesh.kernels.quant_gemm_config import clamp_block_k
    from llmesh.kernels.quant_gemv import GemvConfig

    grouped = kind == "w4a16" or group != k
    rows = [(c, False) for c in (SMOKE_GEMV_SWEEP if smoke else GEMV_SWEEP)]
    rows += [(c, True) for c in (SMOKE_GEMV_WORD_SWEEP if smoke else GEMV_WORD_SWEEP)]
    out = []
    for (block_n, block_k, warps, stages, split), words in rows:
        block_k = clamp_block_k(block_k, group, grouped)
        if not smoke and next_power_of_2(m) * block_k * block_n > GEMV_ACC_REGS * 32 * warps:
            continue
        cfg = GemvConfig(block_n, block_k, split, warps, stages, words)
        if cfg not in out:
            out.append(cfg)
    return out


def gemv_call(kind: str, x: torch.Tensor, q, out: torch.Tensor) -> Callable[..., torch.Tensor]:
    from llmesh.kernels.quant_gemv import w4a16_gemv, w8a16_gemv

    if kind == "w4a16":
        return lambda config: w4a16_gemv(x, q.qweight, q.scales, q.mins, q.group_size, out=out, config=config)
    return lambda config: w8a16_gemv(x, q.qweight, q.scales, q.group_size, out=out, config=config)


def cfg_str(cfg) -> str:
    if hasattr(cfg, "short"):
        return cfg.short()
    return (f"{'words ' if cfg.words else ''}m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} "
            f"w{cfg.num_warps} st{cfg.num_stages}")


def tuned_path(run: Run):
    """The dispatch table this run merges its winners into (and, seeded, draws its candidates from)."""
    from pathlib import Path

    from llmesh.kernels.quant_gemm_config import TUNED_FILE

    return Path(run.args.tuned_file) if run.args.tuned_file else (
        run.results_dir / "quant_gemm_tuned_smoke.json" if run.args.smoke else TUNED_FILE)


def table_seeds(run: Run, kind: str) -> set[tuple]:
    """Every entry the dispatch table holds for ``kind``, on any device, shape or M, as
    (choice, fields): a seeded sweep's candidates besides the default config."""
    from llmesh.kernels.quant_gemm_config import load_tuned

    return {_seed(entry) for table in load_tuned(tuned_path(run)).values()
            for key, entry in table.items() if key.split(" ")[0] == kind}


def _seed(entry: list) -> tuple:
    return entry[0], tuple(entry[1])


def seeded(candidates: list, seeds: set[tuple]) -> list:
    """The default (first) candidate and those whose table entry is among ``seeds``."""
    return candidates[:1] + [c for c in candidates[1:] if _seed(table_entry(c[0])) in seeds]


def write_tuned(run: Run, entries: dict[str, list]) -> None:
    """Merge this device's measured winners into the dispatch table the engine reads."""
    import json

    from llmesh.kernels.quant_gemm_config import load_tuned

    if not entries:
        return
    path = tuned_path(run)
    tag = device_tag(run.device)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[tag] = dict(sorted({**doc.get(tag, {}), **entries}.items()))
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    load_tuned.cache_clear()  # the engine part of this run dispatches through the new table
    run.workload.setdefault("gemm_configs", {})["tuned_file"] = str(path)
    run.log(f"dispatch table: {len(entries)} entries for {tag} -> {path}")


def gemm_part(run: Run, ceilings: dict[str, float]) -> None:
    from llmesh.engine.quant.quantize import quantize_fp8, quantize_int4, quantize_int8

    smoke, dev, met = run.args.smoke, run.device, run.metrics
    budget = Budget(run.args.gemm_budget_s)  # the main table always runs; the sweep fills what is left
    shapes, ms, sweep_ms = (SMOKE_SHAPES, SMOKE_MS, SMOKE_SWEEP_MS) if smoke else (SHAPES, MS, SWEEP_MS)
    if run.args.gemm_shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in run.args.gemm_shapes.split(","))
    if run.args.gemm_ms:
        ms = tuple(int(v) for v in run.args.gemm_ms.split(","))
    if run.args.gemm_sweep_ms is not None:
        sweep_ms = tuple(int(v) for v in run.args.gemm_sweep_ms.split(",") if v)
    sweep_ms = tuple(m for m in sweep_ms if m in ms)  # none: no sweep (it needs the main grid's bf16 times)
    headline = HEADLINE if HEADLINE in shapes else shapes[0]
    copy_gb_s = ceilings["copy_tb_s"] * 1e3
    gen = torch.Generator(dev).manual_seed(run.args.seed)
    broken: set[str] = set()  # a kind that failed once is not retried at every shape
    if dev.type == "cuda":
        from llmesh.kernels.fp8_gemm import fp8_support

        if (why := fp8_support(dev)) is not None:
            broken.add("fp8")
            run.skipped.append(f"gemm fp8: {why}")
    packs: dict[tuple[int, int], dict] = {}
    ring_cache: dict[tuple[int, int], dict] = {}
    rows: list[str] = []
    run.workload["gemm"] = {
        "shapes_kxn": [list(s) for s in shapes], "m": list(ms), "headline": list(headline),
        "weights": "randn * 0.02 bf16, nn.Linear layout [N, K], quantized by quantize_int8 / quantize_int4 "
                   "(group 128) / quantize_fp8; x randn bf16 [M, K]",
        "bf16": "F.linear(x, W) (cuBLAS; the engine's dense path)",
        "scaled_mm": "torch._scaled_mm, row-wise scales, x quantized per token outside the timing",
        "timing": "CUDA graph of the call over a ring of weight copies (>= 3x L2, each call reads memory), "
                  "10 replays (sweep: 3); host launch overhead excluded, as in the engine's decode graphs",
        "bytes": "packed weight bytes (codes + scales + mins) only; bw_frac = GB/s / copy ceiling"}
    for k, n in shapes:
        w = (0.02 * torch.randn(n, k, generator=gen, device=dev)).to(torch.bfloat16)  # [N, K]
        pk: dict = {}
        for kind, quant in zip(QUANT_KINDS, (quantize_int8, quantize_int4, quantize_fp8)):
            if kind in broken:
                continue
            try:
                pk[kind] = quant(w)
            except Exception:
                broken.add(kind)
                run.fail(f"gemm quantize {kind}")
        packs[(k, n)] = pk
        w_ring = ring(w, w.numel() * 2, torch.clone) if dev.type == "cuda" else [w]
        rings = {kind: ring(q, q.nbytes(), lambda p: p.map_tensors(torch.clone)) if dev.type == "cuda" else [q] for kind, q in pk.items()}
        ring_cache[(k, n)] = rings
        w4a8s, w4a8_ref = w4a8_ring(run, w, ring)
        if w4a8s is not None and "w4a8" in run.args.gemm_sweep_kinds.split(","):
            rings["w4a8"] = (w4a8s, w4a8_ref)  # for w4a8_sweep: FBGEMM's copies and the codes unshuffled
        if "w4a16" in rings and dev.type == "cuda":
            # torch summing the packed INT4 bytes as int32 words (int64 accumulator): a reference
            # point for the harness, not a floor (on the H200 it took longer than the kernels)
            floor_ms = run.timer([_word_sum(qc.qweight) for qc in rings["w4a16"]])
            met[f"gemm_w4_read_floor_{k}x{n}_ms"] = floor_ms
            run.log(f"torch word sum of the INT4 bytes {k}x{n}: {floor_ms:.4f} ms for "
                    f"{pk['w4a16'].qweight.numel() / 1e6:.1f} MB (a harness reference; bench/read_floor.py "
                    f"measures the floor)")
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=dev, dtype=torch.bfloat16)  # [M, K]
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            tag = f"{k}x{n}_m{m}"
            bf16_ms = run.timer([partial(F.linear, x, wc) for wc in w_ring])
            gb_s = n * k * 2 / (bf16_ms * 1e-3) / 1e9
            met.update({f"gemm_bf16_{tag}_ms": bf16_ms, f"gemm_bf16_{tag}_bw_frac": gb_s / copy_gb_s})
            cells = [f"{k:>5}x{n:<6}{m:>4}{bf16_ms:>9.4f}"]
            for kind in QUANT_KINDS:
                if kind in broken or kind not in pk:
                    cells.append(f"{'-':>16}")
                    continue
                try:
                    q_ms = run.timer([kernel_call(kind, x, qc, out) for qc in rings[kind]])
                except Exception:
                    broken.add(kind)
                    run.fail(f"gemm {kind} {tag}")
                    cells.append(f"{'FAILED':>16}")
                    continue
                gb_s = pk[kind].nbytes() / (q_ms * 1e-3) / 1e9
                met.update({f"gemm_{kind}_{tag}_ms": q_ms, f"gemm_{kind}_{tag}_speedup_x": bf16_ms / q_ms,
                            f"gemm_{kind}_{tag}_gb_s": gb_s, f"gemm_{kind}_{tag}_bw_frac": gb_s / copy_gb_s})
                cells.append(f"{q_ms:>9.4f} {bf16_ms / q_ms:>5.2f}x")
            cells.append(scaled_mm_cell(run, x, rings.get("fp8"), tag, bf16_ms))
            cells.append(fbgemm_fp8_cell(run, x, rings.get("fp8"), tag, bf16_ms))
            cells.append(fbgemm_w4a8_cell(run, x, w4a8s, w4a8_ref, tag, bf16_ms, copy_gb_s))
            rows.append(" ".join(cells))
        del w, w_ring, rings, w4a8s, w4a8_ref
        run.free()
    print(f"\n{'K x N':<12}{'M':>4}{'bf16 ms':>9} {'w8a16 ms':>16} {'w4a16 ms':>16} {'fp8 ms':>16} "
          f"{'_scaled_mm':>16} {'fbgemm fp8':>16} {'fbgemm w4a8':>16}\n" + "\n".join(rows)
          + f"\n(speedup = bf16 ms / ms; copy ceiling "
          f"{ceilings['copy_tb_s']:.3f} TB/s)\n", flush=True)
    headlines(run, headline, "")
    run.save()
    tuned = fp8_choices(run, shapes, ms)
    library_ms = tuple(m for m in ms if m not in sweep_ms and m <= LIBRARY_MAX_M)
    sweep(run, ring_cache, [headline] + [s for s in shapes if s != headline], sweep_ms, library_ms, broken,
          copy_gb_s, budget, tuned)
    if "fp8" in run.args.gemm_sweep_kinds.split(",") and "fp8" not in broken:
        fp8_sweep(run, ring_cache, list(shapes), ms, budget, tuned)
    if "w4a8" in run.args.gemm_sweep_kinds.split(","):
        w4a8_sweep(run, ring_cache, [headline] + [s for s in shapes if s != headline], ms, budget, tuned, ring)
    if act_kinds(run):
        write_tuned(run, tuned)  # the unfused pair runs through the plain entries just measured
        act_sweep(run, ring_cache, shapes, ms, budget, tuned)
    write_tuned(run, tuned)
    headlines(run, headline, "_best")
    dispatched_headlines(run, ring_cache[headline], headline, copy_gb_s)
    del packs, ring_cache
    run.free()


def current_entry(device: torch.device, kind: str, m: int, n: int, k: int, calls: list, gemvs: list) -> list:
    """The table's current own-kernel entry for this exact (kind, N, K, M) as a candidate, so an
    M that only times libraries never replaces a swept config by a slower library kernel (the
    library entries are candidates anyway)."""
    from llmesh.kernels.quant_gemm_config import GemmConfig, load_tuned, table_key
    from llmesh.kernels.quant_gemv import MAX_M, GemvConfig

    entry = load_tuned().get(device_tag(device), {}).get(table_key(kind, n, k, m))
    if entry is None or entry[0] not in ("dot", "gemv") or (entry[0] == "gemv" and m > MAX_M):
        return []
    return [(GemmConfig(*entry[1]), calls)] if entry[0] == "dot" else [(GemvConfig(*entry[1]), gemvs)]


def sweep(run: Run, packs: dict, shapes: list, sweep_ms: tuple[int, ...], library_ms: tuple[int, ...],
          broken: set[str], copy_gb_s: float, budget: Budget, tuned: dict[str, list]) -> None:
    """Default vs best of the candidate configs at decode sizes (sweep_ms), and default vs the
    library kernels at library_ms; the configs go to workload.gemm_configs."""
    gen = torch.Generator(run.device)
    found = run.workload.setdefault("gemm_configs", {})
    seeds = {}
    if run.args.gemm_sweep_seeded:  # the table as the run found it (not the winners it merges as it goes)
        seeds = {kind: table_seeds(run, kind) for kind in ("w4a16", "w8a16")}
        found["seeds"] = {kind: len(v) for kind, v in seeds.items()}
    for k, n in shapes:
        for kind in (k for k in ("w4a16", "w8a16") if k in run.args.gemm_sweep_kinds.split(",")):
            qs = packs[(k, n)].get(kind)
            q = qs[0] if qs else None
            for m in sweep_ms + library_ms:
                tag = f"{k}x{n}_m{m}"
                if q is None or kind in broken or not budget.allows():
                    run.skipped.append(f"sweep {kind} {tag}")
                    continue
                with budget.item():
                    x = torch.randn(m, k, generator=gen.manual_seed(m), device=run.device, dtype=torch.bfloat16)
                    out = torch.empty(m, n, device=run.device, dtype=torch.bfloat16)
                    calls = [kernel_call(kind, x, qc, out) for qc in qs]
                    gemvs = [gemv_call(kind, x, qc, out) for qc in qs]
                    group = q.group_size
                    ref = kernel_call(kind, x, q, torch.empty_like(out))().clone()  # the default path's y
                    configs = sweep_configs(kind, m, n, k, group, run.device, run.args.smoke)
                    if m in library_ms:
                        candidates = [(configs[0], calls)] + current_entry(run.device, kind, m, n, k, calls, gemvs)
                    else:
                        candidates = [(c, calls) for c in configs]
                        candidates += [(c, gemvs) for c in gemv_configs(kind, m, k, group, run.args.smoke)]
                    for name, library in LIBRARIES:
                        if name not in run.args.gemm_libraries.split(","):
                            continue
                        try:
                            candidates += library(kind, q, qs, x, run.args.smoke)
                        except Exception as e:  # not on this torch / device / install: the others only
                            found.setdefault("errors", []).append(f"{kind} {tag} {name}: {type(e).__name__}: "
                                                                  f"{str(e)[:120]}")
                    if run.args.gemm_sweep_seeded:
                        candidates = seeded(candidates, seeds[kind])
                    times = run.time_candidates(candidates, ref, f"{kind} {tag}", cfg_str)
                    if not times:
                        run.failed.append(f"sweep {kind} {tag}: no config ran")
                        continue
                    best_ms, best = min(times, key=lambda t: t[0])
                    default_ms = times[0][0]
                    bf16_ms = run.metrics[f"gemm_bf16_{tag}_ms"]
                    found[f"{kind}_{tag}"] = {"default": asdict(times[0][1]), "default_ms": round(default_ms, 5),
                                              "best": asdict(best), "best_ms": round(best_ms, 5),
                                              "all": [[cfg_str(c), round(t, 5)] for t, c in times]}
                    from llmesh.kernels.quant_gemm_config import table_key

                    tuned[table_key(kind, n, k, m)] = table_entry(best)
                    gb_s = q.nbytes() / (best_ms * 1e-3) / 1e9
                    run.metrics.update({f"gemm_{kind}_{tag}_best_ms": best_ms,
                                        f"gemm_{kind}_{tag}_best_speedup_x": bf16_ms / best_ms,
                                        f"gemm_{kind}_{tag}_best_bw_frac": gb_s / copy_gb_s})
                    print(f"  sweep {kind} {tag:<16} default {default_ms:.4f} ms [{cfg_str(times[0][1])}]  best of "
                          f"{len(times)} {best_ms:.4f} ms [{cfg_str(best)}]  {bf16_ms / best_ms:.2f}x bf16; next: "
                          + ", ".join(f"{t:.4f} [{cfg_str(c)}]" for t, c in sorted(times, key=lambda t: t[0])[1:8]),
                          flush=True)
                    run.save()  # each cell as it is measured: a run cut short keeps what it found
                    write_tuned(run, tuned)
        run.save()


def dispatched_headlines(run: Run, rings: dict, headline: tuple[int, int], copy_gb_s: float) -> None:
    """The goal metrics (w4a16_m1_speedup_x, ...) time what the engine runs: quant.linear's
    dispatch on the headline shape, through the table this run just wrote (or the default path
    where it has no entry). The default config's figure stays as *_default_speedup_x."""
    from llmesh.engine.quant.linear import linear
    from llmesh.kernels.common import pdl_launch, pdl_off

    k, n = headline
    met = run.metrics
    gen = torch.Generator(run.device)
    for kind in ("w8a16", "w4a16"):
        qs = rings.get(kind)
        if not qs:
            continue
        for m in (1, 16):
            if f"{kind}_m{m}_speedup_x" not in met:
                continue
            x = torch.randn(m, k, generator=gen.manual_seed(m), device=run.device, dtype=torch.bfloat16)
            try:
                ms = run.timer([partial(linear, x, q) for q in qs])
            except Exception:
                run.fail(f"gemm dispatch {kind} m{m}")
                continue
            bf16_ms = met[f"gemm_bf16_{k}x{n}_m{m}_ms"]
            if pdl_launch(run.device)["PDL"]:
                # the same calls launched plainly: what programmatic dependent launch buys here
                # (each call's weight copies start during the previous call's tail, as they do
                # after the step's previous kernel in the engine); cuBLAS's bf16 runs without it
                try:
                    with pdl_off():
                        plain_ms = run.timer([partial(linear, x, q) for q in qs])
                    met[f"gemm_{kind}_{k}x{n}_m{m}_dispatch_nopdl_ms"] = plain_ms
                    met[f"{kind}_m{m}_nopdl_speedup_x"] = bf16_ms / plain_ms
                except Exception:
                    run.fail(f"gemm dispatch {kind} m{m} without PDL")
            met[f"{kind}_m{m}_default_speedup_x"] = met[f"{kind}_m{m}_speedup_x"]
            met[f"gemm_{kind}_{k}x{n}_m{m}_dispatch_ms"] = ms
            met[f"{kind}_m{m}_speedup_x"] = bf16_ms / ms
            met[f"{kind}_m{m}_bw_frac"] = qs[0].nbytes() / (ms * 1e-3) / 1e9 / copy_gb_s
            run.log(f"dispatch {kind} {k}x{n} m{m}: {ms:.4f} ms, {bf16_ms / ms:.2f}x bf16")


def headlines(run: Run, shape: tuple[int, int], best: str) -> None:
    """w4a16_m1_speedup_x etc. on the headline shape (the *_best_* ones after the sweep)."""
    k, n = shape
    met = run.metrics
    for kind in QUANT_KINDS + (("w4a8",) if not best else ()):
        for m in (1, 16):
            tag = f"gemm_{kind}_{k}x{n}_m{m}{best}"
            if f"{tag}_speedup_x" in met:
                met[f"{kind}_m{m}{best}_speedup_x"] = met[f"{tag}_speedup_x"]
                met[f"{kind}_m{m}{best}_bw_frac"] = met[f"{tag}_bw_frac"]
                if not best:
                    met[f"{kind}_m{m}_gb_s"] = met[f"{tag}_gb_s"]

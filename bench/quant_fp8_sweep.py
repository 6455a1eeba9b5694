"""The FP8 dispatch table's sweep (part of bench/quant_gemm.py, with ``--gemm-sweep-kinds fp8``):
per (N, K, M), our FP8 GEMM at each candidate tile (with split-K where the output tiles leave
SMs idle; pointer loads and TMA copies), cuBLASLt's (torch._scaled_mm) and FBGEMM's rowwise GEMM, every one on the same
activations already quantized per token, as the engine hands them over (the quantization is
fused into the producing RMSNorm or SiLU-mul there, so no candidate pays for it). The fastest
goes to the table: ``["fp8", [config fields]]``, ``["scaled_mm", []]`` or ``["fbgemm", []]``.

Why a sweep rather than the main grid's columns: at decode batches our kernel's one default
tile gave a 4096-wide layer 32 programs (M = 128, 128 x 128 tiles) on 132 SMs, 0.0222 ms where
FBGEMM took 0.0097 (quant_h200_w4a8.json), and the main grid times ours with the quantization
in, the libraries without.
"""

from __future__ import annotations

from dataclasses import astuple

import torch
from quant_common import Budget, Run, auto_splits
from quant_libraries import LibraryConfig

# (block_m, block_n, block_k, num_warps, num_stages); split-K is added per cell
FP8_TILES = ((16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (32, 64, 256, 4, 4), (32, 128, 128, 4, 4),
             (64, 64, 128, 4, 4), (64, 64, 256, 4, 3), (64, 128, 128, 4, 4), (64, 128, 128, 8, 4),
             (128, 64, 128, 4, 4), (128, 64, 128, 8, 4), (128, 128, 128, 8, 4), (128, 128, 128, 4, 3),
             (64, 256, 128, 8, 3), (128, 256, 128, 8, 3))
SMOKE_FP8_TILES = ((16, 16, 32, 1, 1),)
FP8_SWEEP_MIN_M = 16
"""Below this the weight stream is all there is and the current entries stand (GEMV-shaped
kernels' ground); the sweep starts here."""


def fp8_configs(m: int, n: int, k: int, sms: int, smoke: bool) -> list:
    """Our kernel's candidates for this cell: tiles whose rows suit M (not taller than M rounded
    up, not under an eighth of it), each unsplit and, where its output tiles fill under two
    waves, split so that they come to about two programs an SM (quant_common.auto_splits);
    each with pointer loads and with its tiles through TMA descriptors (Fp8GemmConfig.tma)."""
    from llmesh.kernels.common import next_power_of_2
    from llmesh.kernels.fp8_gemm import Fp8GemmConfig

    rows = max(16, next_power_of_2(m))
    out = []
    for bm, bn, bk, warps, stages in SMOKE_FP8_TILES if smoke else FP8_TILES:
        if not smoke and (bm > rows or bm * 8 < min(rows, 1024)):
            continue
        tiles = -(-m // bm) * -(-n // bn)
        iters = -(-k // bk)
        for s in sorted({1, auto_splits(tiles, iters, sms, 8)}):
            for tma in (0, 1):
                cfg = Fp8GemmConfig(bm, bn, bk, warps, stages, 8, s, tma)
                if cfg not in out:
                    out.append(cfg)
    return out


def fp8_sweep(run: Run, rings: dict, shapes: list, ms: tuple[int, ...], budget: Budget,
              tuned: dict[str, list]) -> None:
    """Time every candidate per (N, K, M >= FP8_SWEEP_MIN_M) and put the winner in ``tuned``."""
    from llmesh.engine.quant import fbgemm_kernels
    from llmesh.kernels.fp8_gemm import fp8_gemm_rows, fp8_scaled_mm_rows, quantize_fp8_per_token
    from llmesh.kernels.quant_gemm_config import table_key

    dev = run.device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    gen = torch.Generator(dev)
    found = run.workload.setdefault("gemm_configs", {})
    have_fbgemm = dev.type == "cuda" and fbgemm_kernels.unavailable_reason() is None
    for k, n in shapes:
        qs = rings.get((k, n), {}).get("fp8")
        for m in (m for m in ms if m >= FP8_SWEEP_MIN_M or run.args.smoke):
            tag = f"{k}x{n}_m{m}"
            if not qs or not budget.allows():
                run.skipped.append(f"sweep fp8 {tag}")
                continue
            with budget.item():
                x = torch.randn(m, k, generator=gen.manual_seed(m), device=dev, dtype=torch.bfloat16)
                rows = quantize_fp8_per_token(x)
                out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                ref = fp8_gemm_rows(rows, qs[0].qweight, qs[0].scales, out_dtype=x.dtype).clone()
                ours = [lambda cfg, q=q: fp8_gemm_rows(rows, q.qweight, q.scales, out=out, config=cfg) for q in qs]
                candidates = [(cfg, ours) for cfg in fp8_configs(m, n, k, sms, run.args.smoke)]
                if dev.type == "cuda":
                    candidates.append((LibraryConfig("scaled_mm", ""),
                                       [lambda cfg, q=q: fp8_scaled_mm_rows(rows, q.qweight, q.scales, x.dtype)
                                        for q in qs]))
                if have_fbgemm:
                    candidates.append((LibraryConfig("fbgemm", ""),
                                       [lambda cfg, q=q: fbgemm_kernels.fp8_matmul(rows.xq, rows.scale, q, x.dtype)
                                        for q in qs]))
                times = run.time_candidates(candidates, ref, f"fp8 {tag}", lambda c: c.short())
                if not times:
                    run.failed.append(f"sweep fp8 {tag}: no candidate ran")
                    continue
                best_ms, best = min(times, key=lambda t: t[0])
                bf16_ms = run.metrics.get(f"gemm_bf16_{tag}_ms")
                own = [t for t in times if not isinstance(t[1], LibraryConfig)]
                found[f"fp8_{tag}"] = {"best": best.short(), "best_ms": round(best_ms, 5),
                                       "all": [[c.short(), round(t, 5)] for t, c in times]}
                tuned[table_key("fp8", n, k, m)] = ([best.choice, []] if isinstance(best, LibraryConfig)
                                                    else ["fp8", list(astuple(best))])
                run.metrics[f"gemm_fp8_{tag}_best_ms"] = best_ms
                if own:
                    run.metrics[f"gemm_fp8_{tag}_own_best_ms"] = min(own, key=lambda t: t[0])[0]
                if bf16_ms:
                    run.metrics[f"gemm_fp8_{tag}_best_speedup_x"] = bf16_ms / best_ms
                    gb_s = qs[0].nbytes() / (best_ms * 1e-3) / 1e9
                    run.metrics[f"gemm_fp8_{tag}_best_bw_frac"] = gb_s / (run.metrics["copy_tb_s"] * 1e3)
                lib = {c.choice: t for t, c in times if isinstance(c, LibraryConfig)}
                print(f"  sweep fp8 {tag:<16} best of {len(times)} {best_ms:.4f} ms [{best.short()}]"
                      + (f" {bf16_ms / best_ms:.2f}x bf16" if bf16_ms else "")
                      + "".join(f"; {name} {t:.4f}" for name, t in sorted(lib.items()))
                      + (f"; ours best {min(own, key=lambda t: t[0])[0]:.4f} [{min(own, key=lambda t: t[0])[1].short()}]"
                         if own else ""), flush=True)
                run.save()

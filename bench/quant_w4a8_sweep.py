"""The W4A8 dispatch table's sweep (part of bench/quant_gemm.py, with ``--gemm-sweep-kinds w4a8``):
per (N, K, M) up to the fragment-order kernel's rows, FBGEMM's ``f8i4bf16_shuffled`` (the
format's default kernel) against the fragment-order kernel's W4A8 instance
(llmesh/kernels/w4a8_mma.py) at each of its candidate configs (each with the products rounded by
conversions and, where the weight's scales allow, by integer operations), all on the same activations
already quantized per token, as the engine hands them over. The fastest goes to the table:
``["fbgemm", []]`` or ``["mma", [config]]``; the engine makes the kernel's copy of a weight at
load only where some M's entry is ``mma``.

Why: at one row FBGEMM's CUTLASS GEMM read the packed weight at 0.37 of the copy bandwidth on
the H200 (1.04x bf16 at batch 1, quant_h200_w4a8.json), where ``int4``'s fragment-order kernel
gave 2.8x; the W4A8 instance is that kernel with each code widened to e4m3(q g).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from quant_common import Budget, Run
from quant_libraries import LibraryConfig, mma_configs


def w4a8_sweep(run: Run, rings: dict, shapes: list, ms: tuple[int, ...], budget: Budget, tuned: dict[str, list],
               ring: Callable) -> None:
    """Time FBGEMM's kernel and every W4A8 candidate per (N, K, M <= the kernel's rows); the
    winner goes to ``tuned``. ``rings[(K, N)]["w4a8"]`` is (FBGEMM-shuffled copies, the weight
    unshuffled), as quant_libraries.w4a8_ring made them; ``ring`` is quant_gemm.ring."""
    from llmesh.engine.quant import fbgemm_kernels
    from llmesh.engine.quant.linear import w4a8_matmul_ref
    from llmesh.engine.quant.mma_weights import MmaLayout, w4a8_can_lay_out, w4a8_layout
    from llmesh.kernels.fp8_gemm import quantize_fp8_per_token
    from llmesh.kernels.quant_gemm_config import table_key
    from llmesh.kernels.w4a8_mma import unsupported, w4a8_mma
    from llmesh.kernels.w4a16_mma import MAX_M, config_str, parse_config

    dev = run.device
    gen = torch.Generator(dev)
    found = run.workload.setdefault("gemm_configs", {})
    for k, n in shapes:
        shuffled, ref_w = rings.get((k, n), {}).get("w4a8") or (None, None)
        if ref_w is None or not w4a8_can_lay_out(ref_w):
            run.skipped.append(f"sweep w4a8 {k}x{n}: " + ("no W4A8 weight (FBGEMM not here)" if ref_w is None
                                                         else "the W4A8 instance does not take this weight"))
            continue
        first = w4a8_layout(ref_w)
        lays = ring(first, sum(t.numel() * t.element_size() for t in (first.codes, first.scales)),
                    lambda lay: MmaLayout(lay.codes.clone(), lay.scales.clone(), lay.group))
        kp = first.codes.shape[1] * 16
        for m in (m for m in ms if m <= MAX_M):
            tag = f"{k}x{n}_m{m}"
            if not budget.allows():
                run.skipped.append(f"sweep w4a8 {tag}")
                continue
            with budget.item():
                x = torch.randn(m, k, generator=gen.manual_seed(m), device=dev, dtype=torch.bfloat16)
                rows = quantize_fp8_per_token(x)
                if (why := unsupported(rows.xq, n, ref_w.group_size)) is not None:
                    run.skipped.append(f"sweep w4a8 {tag}: {why}")
                    continue
                ref = w4a8_matmul_ref(rows, ref_w, torch.float32)
                candidates = [(LibraryConfig("fbgemm", ""),
                               [lambda cfg, q=q: fbgemm_kernels.w4a8_matmul(rows.xq, rows.scale, q) for q in shuffled])]
                for cfg in mma_configs(m, n, kp, ref_w.group_size, dev, run.args.smoke, w4a8=True,
                                       int_round=first.int_round):
                    calls = [lambda c, lay=lay: w4a8_mma(rows.xq, rows.scale, lay.codes, lay.scales, ref_w.scales,
                                                         ref_w.group_size, config=parse_config(c.arg)) for lay in lays]
                    candidates.append((LibraryConfig("mma", config_str(cfg)), calls))
                times = run.time_candidates(candidates, ref, f"w4a8 {tag}", lambda c: c.short())
                if not times:
                    run.failed.append(f"sweep w4a8 {tag}: no candidate ran")
                    continue
                best_ms, best = min(times, key=lambda t: t[0])
                own = [t for t in times if t[1].choice == "mma"]
                fbgemm_ms = next((t for t, c in times if c.choice == "fbgemm"), None)
                tuned[table_key("w4a8", n, k, m)] = [best.choice, [best.arg] if best.arg else []]
                found[f"w4a8_{tag}"] = {"best": best.short(), "best_ms": round(best_ms, 5),
                                        "all": [[c.short(), round(t, 5)] for t, c in times]}
                met = run.metrics
                met[f"gemm_w4a8_{tag}_best_ms"] = best_ms
                if own:
                    met[f"gemm_w4a8_{tag}_mma_best_ms"] = min(own, key=lambda t: t[0])[0]
                if fbgemm_ms is not None:
                    met[f"gemm_w4a8_{tag}_fbgemm_ms"] = fbgemm_ms
                bf16_ms = met.get(f"gemm_bf16_{tag}_ms")
                if bf16_ms:
                    met[f"gemm_w4a8_{tag}_best_speedup_x"] = bf16_ms / best_ms
                    gb_s = ref_w.nbytes() / (best_ms * 1e-3) / 1e9
                    met[f"gemm_w4a8_{tag}_best_bw_frac"] = gb_s / (met["copy_tb_s"] * 1e3)
                    if (k, n) == shapes[0] and m in (1, 16):  # the headline shape comes first
                        met[f"w4a8_m{m}_best_speedup_x"] = bf16_ms / best_ms
                print(f"  sweep w4a8 {tag:<16} best of {len(times)} {best_ms:.4f} ms [{best.short()}]"
                      + (f" {bf16_ms / best_ms:.2f}x bf16" if bf16_ms else "")
                      + (f"; fbgemm {fbgemm_ms:.4f}" if fbgemm_ms is not None else "")
                      + (f"; mma best {min(own, key=lambda t: t[0])[0]:.4f} [{min(own, key=lambda t: t[0])[1].short()}]"
                         if own else ""), flush=True)
                run.save()

"""The down projection fed a fused gate/up output: one launch or two? (part of quant_gemm.py)

A dense MLP's down projection reads silu(gate) * up. The fragment-order kernel can make that
input itself as it reads x (``w4a16_mma(..., act="silu_mul")``), so silu_and_mul's launch and
its round trip through memory go; but with x loaded beside the codes (xload) every warp redoes
the activation over its whole K range, so fusing is not always faster. This times, per shape
and M, the unfused pair as the engine runs it (silu_and_mul, then ``linear`` through the table's
plain entry) against every fused config, and writes the winner under the ``<kind>+silu_mul`` key
(llmesh/kernels/quant_gemm_config.py SILU_MUL) that ``linear.silu_mul_matmul`` reads.

Selected with ``--gemm-sweep-kinds w4a16+silu_mul,w8a16+silu_mul``; the shapes are the down
projection's K x N (14336x4096 for Llama-3-8B).
"""

from __future__ import annotations

import torch
from quant_common import Budget, Run
from quant_libraries import LibraryConfig, mma_candidates

ACT = "silu_mul"


def act_kinds(run: Run) -> list[str]:
    """The ``+silu_mul`` kinds this run sweeps (their base kinds' weights must be in the packs)."""
    from llmesh.kernels.quant_gemm_config import SILU_MUL

    return [k for k in run.args.gemm_sweep_kinds.split(",") if k.endswith(SILU_MUL)]


def act_sweep(run: Run, packs: dict, shapes: list, ms: tuple[int, ...], budget: Budget,
              tuned: dict[str, list]) -> None:
    from llmesh.engine.quant.linear import linear
    from llmesh.kernels.activation import silu_and_mul
    from llmesh.kernels.quant_gemm_config import SILU_MUL, table_key
    from llmesh.kernels.w4a16_mma import MAX_M

    found = run.workload.setdefault("gemm_configs", {})
    gen = torch.Generator(run.device)
    for kind in act_kinds(run):
        base = kind[:-len(SILU_MUL)]
        for k, n in shapes:
            qs = packs[(k, n)].get(base)
            for m in (m for m in ms if m <= MAX_M):
                tag = f"{k}x{n}_m{m}"
                if not qs or not budget.allows():
                    run.skipped.append(f"sweep {kind} {tag}")
                    continue
                with budget.item():
                    gate_up = torch.randn(m, 2 * k, generator=gen.manual_seed(m), device=run.device,
                                          dtype=torch.bfloat16)
                    unfused = [lambda c, qc=qc: linear(silu_and_mul(gate_up), qc) for qc in qs]
                    candidates = [(LibraryConfig("unfused", ""), unfused)]
                    candidates += mma_candidates(base, qs[0], qs, gate_up, run.args.smoke, act=ACT)
                    times = run.time_candidates(candidates, unfused[0](None), f"{kind} {tag}",
                                                LibraryConfig.short)
                    if not times or times[0][1].choice != "unfused":
                        run.failed.append(f"sweep {kind} {tag}: the unfused pair did not run")
                        continue
                    unfused_ms = times[0][0]
                    best_ms, best = min(times, key=lambda t: t[0])
                    tuned[table_key(kind, n, k, m)] = [best.choice, [best.arg] if best.arg else []]
                    found[f"{kind}_{tag}"] = {"unfused_ms": round(unfused_ms, 5), "best": best.choice,
                                              "best_arg": best.arg, "best_ms": round(best_ms, 5),
                                              "all": [[c.choice, c.arg, round(t, 5)] for t, c in times]}
                    run.metrics.update({f"gemm_{kind}_{tag}_unfused_ms": unfused_ms,
                                        f"gemm_{kind}_{tag}_best_ms": best_ms,
                                        f"gemm_{kind}_{tag}_fused_gain_x": unfused_ms / best_ms})
                    fused = sorted((t, c.arg) for t, c in times if c.choice == "mma")
                    print(f"  sweep {kind} {tag:<16} unfused {unfused_ms:.4f} ms  best {best_ms:.4f} ms "
                          f"[{best.choice} {best.arg}]; fused: "
                          + ", ".join(f"{t:.4f} [{a}]" for t, a in fused[:6]), flush=True)
                    run.save()

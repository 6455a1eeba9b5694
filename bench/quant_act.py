"""A projection fed what the op before it would make: one launch or two? (part of quant_gemm.py)

A dense MLP's down projection reads silu(gate) * up, and the qkv and gate/up projections read
rmsnorm(x + residual). The fragment-order kernel can make either input itself as it reads x
(``w4a16_mma(..., act="silu_mul")`` / ``act="rmsnorm"``), so the other op's launch and its round
trip through memory go; but with x loaded beside the codes (xload) every warp redoes the
activation over its whole K range, and the fused norm has every block read its rows over the
whole K for their statistics first, so fusing is not always faster. This times, per shape and
M, the unfused pair as the engine runs it (silu_and_mul or rmsnorm, then ``linear`` through the
table's plain entry) against every fused config, and writes the winner under the ``<kind>+silu_mul``
or ``<kind>+rmsnorm`` key (llmesh/kernels/quant_gemm_config.py SILU_MUL, RMSNORM) that
``linear.silu_mul_matmul`` / ``linear.norm_matmul`` read.

Selected with ``--gemm-sweep-kinds w4a16+silu_mul,w8a16+rmsnorm,...``. Of the ``--gemm-shapes``
(K x N), ``+silu_mul`` takes those with K > N (a down projection: 14336x4096 for Llama-3-8B) and
``+rmsnorm`` those with K < N (the qkv and gate/up projections: 4096x6144, 4096x28672), the only
places the engine asks for either.
"""

from __future__ import annotations

import torch
from quant_common import Budget, Run
from quant_libraries import LibraryConfig, mma_candidates

NORM_EPS = 1e-5


def act_kinds(run: Run) -> list[str]:
    """The ``+silu_mul`` / ``+rmsnorm`` kinds this run sweeps (their base kinds' weights must be in
    the packs)."""
    from llmesh.kernels.quant_gemm_config import FUSED_INPUTS

    return [k for k in run.args.gemm_sweep_kinds.split(",") if k.endswith(FUSED_INPUTS)]


def fed_shape(kind: str, k: int, n: int) -> bool:
    """Whether the engine asks for this fused kind at K x N: the activation feeds a narrowing
    projection (down), the norm a widening one (qkv, gate/up)."""
    from llmesh.kernels.quant_gemm_config import SILU_MUL

    return k > n if kind.endswith(SILU_MUL) else k < n


def _pair(kind: str, m: int, k: int, qs: list, gen: torch.Generator, device, smoke: bool):
    """(unfused calls, fused candidates, reference output) for one fused kind at M rows."""
    from llmesh.engine.quant.linear import linear
    from llmesh.kernels.activation import silu_and_mul
    from llmesh.kernels.quant_gemm_config import SILU_MUL
    from llmesh.kernels.rmsnorm import rmsnorm

    base = kind.rsplit("+", 1)[0]
    if kind.endswith(SILU_MUL):
        gate_up = torch.randn(m, 2 * k, generator=gen.manual_seed(m), device=device, dtype=torch.bfloat16)
        unfused = [lambda c, qc=qc: linear(silu_and_mul(gate_up), qc) for qc in qs]
        return unfused, mma_candidates(base, qs[0], qs, gate_up, smoke, act="silu_mul")
    x = torch.randn(m, k, generator=gen.manual_seed(m), device=device, dtype=torch.bfloat16)
    residual = torch.randn(m, k, generator=gen, device=device, dtype=torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(k, generator=gen, device=device)).to(torch.bfloat16)
    unfused = [lambda c, qc=qc: linear(rmsnorm(x, weight, NORM_EPS, residual)[0], qc) for qc in qs]
    return unfused, mma_candidates(base, qs[0], qs, x, smoke, act="rmsnorm", norm=(residual, weight, NORM_EPS))


def act_sweep(run: Run, packs: dict, shapes: list, ms: tuple[int, ...], budget: Budget,
              tuned: dict[str, list]) -> None:
    from llmesh.kernels.quant_gemm_config import table_key
    from llmesh.kernels.w4a16_mma import MAX_M

    found = run.workload.setdefault("gemm_configs", {})
    gen = torch.Generator(run.device)
    for kind in act_kinds(run):
        base = kind.rsplit("+", 1)[0]
        for k, n in (s for s in shapes if fed_shape(kind, *s)):
            qs = packs[(k, n)].get(base)
            for m in (m for m in ms if m <= MAX_M):
                tag = f"{k}x{n}_m{m}"
                if not qs or not budget.allows():
                    run.skipped.append(f"sweep {kind} {tag}")
                    continue
                with budget.item():
                    unfused, fused = _pair(kind, m, k, qs, gen, run.device, run.args.smoke)
                    candidates = [(LibraryConfig("unfused", ""), unfused)] + fused
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
                    fused_ms = sorted((t, c.arg) for t, c in times if c.choice == "mma")
                    print(f"  sweep {kind} {tag:<16} unfused {unfused_ms:.4f} ms  best {best_ms:.4f} ms "
                          f"[{best.choice} {best.arg}]; fused: "
                          + ", ".join(f"{t:.4f} [{a}]" for t, a in fused_ms[:6]), flush=True)
                    run.save()

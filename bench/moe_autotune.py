"""bench/moe_gpu.py --autotune: the fused MoE layer's tile sweep and the refinements tried on its
winners (split-K, program order, TMA, the sorted hidden layout), merged into the tile table."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from gpu_ceilings import device_tag, graph_time_ms
from moe_shapes import Shapes, experts
from moe_steps import routing

SPLIT_CANDIDATES = (2, 4, 8)
"""split_k values the autotune tries on its winners at decode sizes."""
GROUP_CANDIDATES = (1, 2, 4, 8, 16)
"""group_m values (the grouped program order) the autotune tries on its winners at prefill sizes."""
SPLIT_MAX_PAIRS_PER_EXPERT = 4
"""Batches with at most this many (token, slot) pairs an expert on average count as decode sizes."""


def is_prefill(t: int, s: Shapes) -> bool:
    """Whether T tokens on these shapes are a prefill size (program order tried) or a decode one (split K)."""
    return t * s.top_k > SPLIT_MAX_PAIRS_PER_EXPERT * s.experts


def smoke_sizes(m_values: list[int], real: Shapes, smoke: Shapes) -> list[int]:
    """The smoke run's token counts for the real sizes asked: each decode size capped at the smoke
    shapes' decode batch, each prefill size their prefill (one of each kind: a size twice would be
    swept twice)."""
    return sorted({smoke.prefill_tokens if is_prefill(v, real) else min(v, smoke.decode_batch) for v in m_values})


def tune_candidates(t: int, s: Shapes, smoke: bool, weights: str = "dense") -> list:
    """The format's candidates whose BLOCK_M fits the rows an expert sees (T * k / E): a tile far
    taller pads most rows, one far shorter re-reads each weight tile; neither can win, both cost
    a compile."""
    from llmesh.kernels.fused_moe_config import CANDIDATES, INT4_CANDIDATES

    pool = INT4_CANDIDATES if weights == "int4" else CANDIDATES
    if smoke:
        return list(pool[:3]) + [c for c in pool if c.gemv][:1]
    rows = t * s.top_k / s.experts

    def suits(c) -> bool:  # the GEMV form (one pair a block) re-reads an expert's weights for each pair
        return rows <= 1 if c.gemv else max(16, rows) >= c.block_m >= min(64, rows / 4)

    return [c for c in pool if suits(c)]


def tune_weights(weights: str, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The experts in the swept format: (w13, w2, fused_moe's quantization keywords)."""
    if weights == "dense":
        return w13, w2, {}
    from llmesh.engine.model.moe import quantize_experts_int4

    c13, cs13, cm13 = quantize_experts_int4(w13)
    c2, cs2, cm2 = quantize_experts_int4(w2)
    return c13, c2, dict(w13_scale=cs13, w2_scale=cs2, w13_min=cm13, w2_min=cm2)


SORTED_CHANGES = ({"a_tma": 1, "weight_tma": 1},
                  {"a_tma": 1, "weight_tma": 1, "warp_spec": 1, "num_warps": 4, "split_k": 1},
                  {"a_tma": 1, "weight_tma": 1, "warp_spec": 1, "num_warps": 4, "split_k": 1, "persistent": 1})
"""The down GEMM's sorted hidden layout (MoEConfig.a_tma), then its K loop warp-specialized (at 4
warps: Triton 3.6's pass declines 8), then as a persistent kernel with a warp-specialized tile loop."""


class Budget:
    """The sweep's time budget. A stage (one candidate or one change) is begun only while the
    longest stage so far would still end before the deadline: an H100 call with a 240 s budget was
    cut at 533 s inside a warp-specialized change, before any winner was kept."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.deadline = self.start + seconds
        self.longest = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self, what: str) -> bool:
        """Whether the budget is spent for a stage about to begin (said for each skipped stage)."""
        if time.perf_counter() + self.longest < self.deadline:
            return False
        print(f"[moe] autotune budget spent at {self.elapsed():.0f}s (longest stage {self.longest:.0f}s): "
              f"{what} skipped", flush=True)
        return True

    def timed(self, fn, *args):
        """fn(*args), its duration counted towards the longest stage (also when it raises)."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.longest = max(self.longest, time.perf_counter() - t0)


def _refine(run, changes, best_up, best_down, best_ms: float, tag: str, which_gemms=("up", "down"),
            budget: Budget | None = None, retime: bool = False, keep=None):
    """Each of ``changes`` (MoEConfig fields to replace, a dict each) on the gate/up winner, then
    on the down one (of ``which_gemms``), each timed against the layer's best total so far:
    (best_up, best_down, best_ms). ``retime``: the winners timed together once more before the
    first change, as its baseline. Changes ``budget`` has no room for are skipped (with the
    retiming). ``keep(best_up, best_down)`` is called on each new winner, so a call cut later keeps it."""
    budget = budget or Budget(float("inf"))
    for change in changes:
        label = ",".join(f"{k}={v}" for k, v in change.items())
        if budget.spent(f"{tag} {label}"):
            break
        if retime:
            best_ms, retime = budget.timed(run, best_up, best_down), False
        for which in which_gemms:
            try:  # a combination MoEConfig refuses (TMA boxes past 256) is skipped like one that cannot run
                c = replace(best_up if which == "up" else best_down, **change)
                ms = budget.timed(run, c, best_down) if which == "up" else budget.timed(run, best_up, c)
            except Exception as exc:  # out of shared memory / registers: skip it
                print(f"[moe] autotune {tag} {which} {label}: {type(exc).__name__}: {exc}", flush=True)
                continue
            print(f"[moe] autotune [{budget.elapsed():.0f}s] {tag} {which} {label}: {ms:.3f} ms "
                  f"(best {best_ms:.3f})", flush=True)
            if ms < best_ms:
                best_ms = ms
                if which == "up":
                    best_up = c
                else:
                    best_down = c
                if keep is not None:
                    keep(best_up, best_down)
    return best_up, best_down, best_ms


def autotune(s: Shapes, device: torch.device, m_values: list[int], smoke: bool, tuned_file: Path,
             weights: str = "dense", tiles: bool = True, gemv_only: bool = False,
             budget_s: float = float("inf")) -> list[str]:
    """Time the candidate configs per GEMM and M for one expert format (fused_moe_config's
    WEIGHT_FORMATS); the winners go into ``tuned_file`` under the table tag of this device and
    format (what fused_moe's pick_config reads). Returns one line per winner. ``tiles`` False:
    no tile sweep; the table's (or the heuristic's) tiles are the winners whose split and
    program order are tried. ``gemv_only``: each GEMM's GEMV candidates against its table entry (a
    GEMV config replaces it only where it measured faster), a few minutes' sweep less.
    ``budget_s``: past it, the candidates and refinements not yet begun are skipped and each size
    keeps the best measured so far; a size's winners are merged into the table after its tile sweep
    and again on each refinement that beats them, so a call cut short keeps what it measured."""
    from llmesh.kernels.fused_moe import fused_moe, weight_tma_supported
    from llmesh.kernels.fused_moe_config import m_bucket, merge_tuned, pick_config, table_tag

    gen = torch.Generator(device).manual_seed(1)
    w13, w2, quant = tune_weights(weights, *experts(s, device, gen))
    lines = []
    budget = Budget(budget_s)
    tag = table_tag(device_tag(device), weights)
    for t in m_values:
        x = torch.randn(t, s.hidden, generator=gen, device=device).bfloat16()
        topk_w, ids = routing(t, s, device, gen)
        candidates = tune_candidates(t, s, smoke, weights)
        prefill = is_prefill(t, s)
        if prefill:  # the tiles swept in the grouped order (moe_h200_order.json: group_m 1 took 0.985 to 0.813 ms)
            candidates = [replace(c, group_m=1) for c in candidates]
        default_down = pick_config(t, s.experts, s.hidden, s.inter, s.top_k, weights=weights)
        down_candidates = candidates
        if gemv_only:  # each GEMM's GEMV candidates and its table entry
            default_down = pick_config(t, s.experts, s.hidden, s.inter, s.top_k, device, weights)
            gemv = [c for c in candidates if c.gemv]
            candidates = gemv + [pick_config(t, s.experts, s.inter, s.hidden, s.top_k, device, weights)]
            down_candidates = gemv + [default_down]
        if not tiles:
            candidates = [pick_config(t, s.experts, s.inter, s.hidden, s.top_k, device, weights)]
            default_down = pick_config(t, s.experts, s.hidden, s.inter, s.top_k, device, weights)

        def run(up, down):
            return graph_time_ms(lambda: fused_moe(x, w13, w2, topk_w, ids, config=up, down_config=down, **quant),
                                 device)

        # The gate/up GEMM first (down at its default); then the down GEMM with the same BLOCK_M.
        best_up, best_up_ms = None, float("inf")
        for i, c in enumerate(candidates):
            if best_up is not None and budget.spent(f"{weights} T={t}: {len(candidates) - i} gate/up candidates"):
                break
            try:
                ms = budget.timed(run, c, replace(default_down, block_m=c.block_m))
            except Exception as exc:  # out of shared memory / registers for this tile: skip it
                print(f"[moe] autotune {weights} T={t} {c}: {type(exc).__name__}", flush=True)
                continue
            if ms < best_up_ms:
                best_up, best_up_ms = c, ms
        if best_up is None:
            lines.append(f"{weights} T={t}: no gate/up config ran")
            continue
        best_down, best_down_ms = None, float("inf")
        for c in down_candidates if tiles else [default_down]:
            if c.block_m != best_up.block_m:
                continue
            if best_down is not None and budget.spent(f"{weights} T={t}: the rest of the down candidates"):
                break
            try:
                ms = budget.timed(run, best_up, c)
            except Exception as exc:
                print(f"[moe] autotune {weights} T={t} down {c}: {type(exc).__name__}", flush=True)
                continue
            if ms < best_down_ms:
                best_down, best_down_ms = c, ms
        b = m_bucket(t)

        def keep(up, down):  # this size's winners so far into the table (a later cut keeps them)
            entries = {(s.experts, s.inter, s.hidden, b): up}
            if down is not None:
                entries[(s.experts, s.hidden, s.inter, b)] = down
            merge_tuned(tuned_file, tag, entries)

        print(f"[moe] autotune [{budget.elapsed():.0f}s] {weights} T={t} tile sweep: gate/up {best_up!r} "
              f"{best_up_ms:.3f} ms, down {best_down!r} {best_down_ms:.3f} ms", flush=True)
        keep(best_up, best_down)
        tag_t = f"{weights} T={t}"
        if best_down is not None and not prefill:
            # decode sizes: the winners again with the K loop in pieces (more programs for a
            # batch whose few expert blocks leave SMs idle)
            best_up, best_down, best_down_ms = _refine(run, [{"split_k": v} for v in SPLIT_CANDIDATES], best_up,
                                                       best_down, best_down_ms, tag_t, budget=budget, keep=keep)
        if best_down is not None and prefill:
            # prefill sizes: the winners again in grouped program order (L2 reuse of a block's
            # rows and an expert's weight columns), against both winners timed together once more
            best_up, best_down, best_down_ms = _refine(run, [{"group_m": v} for v in GROUP_CANDIDATES], best_up,
                                                       best_down, best_down_ms, tag_t, budget=budget, retime=True,
                                                       keep=keep)
        if best_down is not None and weight_tma_supported(w13):
            # every size: the winners with their weight tiles through TMA descriptors
            best_up, best_down, best_down_ms = _refine(run, [{"weight_tma": 1}], best_up, best_down, best_down_ms,
                                                       tag_t, budget=budget, retime=True, keep=keep)
        if best_down is not None and weights == "dense" and not best_down.gemv and weight_tma_supported(w2):
            # tl.dot tiles: the down GEMM's activation tiles whole through TMA, then warp-specialized
            best_up, best_down, best_down_ms = _refine(run, SORTED_CHANGES, best_up, best_down, best_down_ms,
                                                       tag_t, ("down",), budget, retime=True, keep=keep)
        lines.append(f"{weights} ({s.experts}, {s.inter}, {s.hidden}, {b}): {best_up!r}  # gate/up, "
                     f"{best_up_ms:.3f} ms ({len(candidates)} candidates)")
        if best_down is not None:
            lines.append(f"{weights} ({s.experts}, {s.hidden}, {s.inter}, {b}): {best_down!r}  # down, total "
                         f"{best_down_ms:.3f} ms")
        print("\n".join(lines[-2:]), flush=True)
        print(f"[moe] {1 + (best_down is not None)} entries for {tag} -> {tuned_file} (kept as each was found)",
              flush=True)
    return lines

"""The MoE layer's steps compared alone and inside the layer, for bench/moe_gpu.py's kernel part:
the router both ways, the align step's three paths, and the batch-1 layer in each GEMM form
(each decides a dispatch rule or a table entry; metric names in each function's docstring)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from gpu_ceilings import graph_time_ms

from llmesh.kernels.common import cuda_device_tag

if TYPE_CHECKING:
    from moe_shapes import Shapes


def routing(t: int, s: Shapes, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from llmesh.kernels.moe_router import topk_softmax_ref

    logits = torch.randn(t, s.experts, generator=gen, device=device)  # [T, E]
    return topk_softmax_ref(logits, s.top_k, True, torch.bfloat16)


def best_of_two(fn, device: torch.device) -> float:
    return min(graph_time_ms(fn, device), graph_time_ms(fn, device))


def bench_router(s: Shapes, device: torch.device, gen: torch.Generator) -> dict[str, float]:
    """The router's softmax + top-k + renormalisation + expert counts both ways (torch ops, one
    Triton program per token), replayed from a graph at batch 1 and the decode batch: what
    decides ROUTER_KERNEL_ON_CUDA."""
    from llmesh.kernels.moe_router import select_experts

    m: dict[str, float] = {}
    counts = torch.zeros(s.experts, dtype=torch.int64, device=device)
    for t in (1, s.decode_batch):
        logits = torch.randn(t, s.experts, generator=gen, device=device).bfloat16()
        counted = torch.ones(t, dtype=torch.int64, device=device)
        for path, kernel in (("torch", False), ("kernel", True)):
            m[f"moe_router_t{t}_{path}_us"] = 1e3 * best_of_two(
                lambda: select_experts(logits, s.top_k, True, torch.bfloat16, counts, counted, kernel=kernel),
                device)
        print(f"[moe] router T={t}: torch {m[f'moe_router_t{t}_torch_us']:.1f} us, kernel "
              f"{m[f'moe_router_t{t}_kernel_us']:.1f} us", flush=True)
    return m


def bench_norm_router(s: Shapes, device: torch.device, gen: torch.Generator) -> dict[str, float]:
    """The MoE layer's entry (residual add + RMSNorm, the router's linear, top-k softmax with the
    expert counts) as the three ops the triton table runs (each on its engine path) and as
    moe_norm_router's one kernel, replayed from a graph at 1, 4, 16 tokens and the decode batch:
    what decides NORM_ROUTER_MAX_TOKENS. Metric names: moe_norm_router_t<T>_{unfused,fused}_us,
    _fused_vs_unfused_x and _same_experts_frac."""
    from llmesh.engine.quant.linear import linear
    from llmesh.kernels.moe_norm_router import norm_router
    from llmesh.kernels.moe_router import select_experts
    from llmesh.kernels.rmsnorm import rmsnorm

    m: dict[str, float] = {}
    counts = torch.zeros(s.experts, dtype=torch.int64, device=device)
    router = (torch.randn(s.experts, s.hidden, generator=gen, device=device) / s.hidden ** 0.5).bfloat16()
    norm = (1 + 0.1 * torch.randn(s.hidden, generator=gen, device=device)).bfloat16()

    def unfused(x, r, counted):
        h, res = rmsnorm(x, norm, 1e-6, residual=r)
        return select_experts(linear(h, router), s.top_k, True, torch.bfloat16, counts, counted, kernel=True), res

    for t in sorted({1, 4, 16, s.decode_batch}):
        x, r = (torch.randn(t, s.hidden, generator=gen, device=device).bfloat16() for _ in range(2))
        counted = torch.ones(t, dtype=torch.int64, device=device)
        (_, want_ids), _ = unfused(x, r, counted)
        _, _, _, _, ids = norm_router(x, r, norm, 1e-6, router, s.top_k, True, torch.bfloat16, counts, counted)
        # the same experts for (nearly) every token: only tied or last-bit logits may choose apart
        agree = float((ids.sort(-1).values == want_ids.sort(-1).values).all(-1).float().mean())
        m[f"moe_norm_router_t{t}_same_experts_frac"] = agree
        m[f"moe_norm_router_t{t}_unfused_us"] = 1e3 * best_of_two(lambda: unfused(x, r, counted), device)
        m[f"moe_norm_router_t{t}_fused_us"] = 1e3 * best_of_two(
            lambda: norm_router(x, r, norm, 1e-6, router, s.top_k, True, torch.bfloat16, counts, counted), device)
        m[f"moe_norm_router_t{t}_fused_vs_unfused_x"] = (m[f"moe_norm_router_t{t}_unfused_us"]
                                                         / m[f"moe_norm_router_t{t}_fused_us"])
        print(f"[moe] norm + router T={t}: three kernels {m[f'moe_norm_router_t{t}_unfused_us']:.1f} us, one "
              f"{m[f'moe_norm_router_t{t}_fused_us']:.1f} us ({agree:.0%} of tokens chose the same experts)",
              flush=True)
    return m


def bench_align(s: Shapes, device: torch.device, w13: torch.Tensor, w2: torch.Tensor, gen: torch.Generator
                ) -> dict[str, float]:
    """The align step four ways (the torch ops, the one-program Triton kernel, the chunked
    kernels, the chunked kernels with a sort) alone, and inside the layer at batch 1, the decode
    batch and the prefill: what decides ALIGN_KERNEL_ON_CUDA, ALIGN_KERNEL_MAX_PAIRS,
    ALIGN_SORTED_ON_CUDA and ALIGN_PROGRAM_MAX_PAIRS_SORTED. Metric names:
    moe_align_t<T>_{torch,kernel,chunks,sorted}_us, moe_layer_t<T>_align_<same>_ms."""
    from llmesh.kernels.fused_moe import fused_moe
    from llmesh.kernels.fused_moe_config import pick_config
    from llmesh.kernels.moe_align import moe_align_block_size

    m: dict[str, float] = {}
    paths = (("torch", "torch"), ("kernel", "program"), ("chunks", "chunks"), ("sorted", "sorted"))
    # Every path at every size (each forced), so the crossovers are placed: the one-program
    # kernel's time grows with the pairs on one SM, the torch ops' and the chunked kernels' spread.
    layer_sizes = (1, s.decode_batch, s.prefill_tokens)
    # 4, 8 and 16 tokens (32-128 pairs at top-8) place ALIGN_PROGRAM_MAX_PAIRS_SORTED.
    for t in dict.fromkeys((*layer_sizes, 4, 8, 16, 2 * s.decode_batch, 4 * s.decode_batch, 16 * s.decode_batch)):
        x = torch.randn(t, s.hidden, generator=gen, device=device).bfloat16()
        weights, ids = routing(t, s, device, gen)
        block_m = pick_config(t, s.experts, s.inter, s.hidden, s.top_k, device).block_m
        for name, path in paths:
            m[f"moe_align_t{t}_{name}_us"] = 1e3 * best_of_two(
                lambda: moe_align_block_size(ids, block_m, s.experts, path=path), device)
            if t in layer_sizes:
                m[f"moe_layer_t{t}_align_{name}_ms"] = best_of_two(
                    lambda: fused_moe(x, w13, w2, weights, ids, align_path=path), device)
        line = ", ".join(f"{name} {m[f'moe_align_t{t}_{name}_us']:.1f} us" for name, _ in paths)
        if t in layer_sizes:
            line += "; layer " + " / ".join(f"{m[f'moe_layer_t{t}_align_{name}_ms']:.3f}" for name, _ in paths) + " ms"
        print(f"[moe] align T={t}: {line}", flush=True)
    return m


def bench_decode1_cuda(x, w13, w2, weights, ids, bytes_: int, ceilings: dict[str, float], dispatched_ms: float
                       ) -> dict[str, float]:
    """The bf16 layer at one token through llmesh/kernels/moe_gemv.py's CUDA C++ kernels, each
    MoeGemvConfig, beside the dispatched layer: what MEASURED_FASTER and CONFIGS are decided from.
    Metrics: moe_decode1_cuda_ms (its best config), moe_decode1_cuda_frac,
    moe_decode1_cuda_vs_dispatched_x, moe_decode1_cuda_<rows>x<warps>[_early<cap>]_ms (no suffix: the
    down kernel that waits first), moe_decode1_cuda_default_ms (the config moe_gemv picks here)."""
    from llmesh.kernels import moe_gemv as mg

    if (why := mg.unsupported(x, w13, w2, weights, ids)) is not None:
        print(f"[moe] decode1 cuda: skipped ({why})", flush=True)
        return {}
    m: dict[str, float] = {}
    want = mg.fused_moe_ref(x, w13, w2, weights, ids).float()
    times: dict[mg.MoeGemvConfig, float] = {}
    for cfg in (mg.MoeGemvConfig(r, w, g) for r in (1, 2) for w in (4, 8) for g in (0, *mg.EARLY_REGS)):
        err = float((mg.moe_gemv(x, w13, w2, weights, ids, config=cfg).float() - want).abs().max())
        if err > 0.02 * max(float(want.abs().max()), 1e-6):
            raise RuntimeError(f"moe_gemv {cfg} differs from fused_moe_ref at batch 1: {err:.3g}")
        times[cfg] = best_of_two(lambda: mg.moe_gemv(x, w13, w2, weights, ids, config=cfg), x.device)
        early = f"_early{cfg.early_regs}" if cfg.early_regs else ""
        m[f"moe_decode1_cuda_{cfg.up_rows}x{cfg.warps}{early}_ms"] = times[cfg]
    best = min(times, key=times.__getitem__)
    m["moe_decode1_cuda_ms"] = times[best]
    default = mg.layer_config(cuda_device_tag(x.device))  # timed above unless the tables name another warps count
    m["moe_decode1_cuda_default_ms"] = times.get(default) or best_of_two(
        lambda: mg.moe_gemv(x, w13, w2, weights, ids), x.device)
    m["moe_decode1_cuda_frac"] = bytes_ / (m["moe_decode1_cuda_ms"] / 1e3) / (ceilings["copy_tb_s"] * 1e12)
    m["moe_decode1_cuda_vs_dispatched_x"] = dispatched_ms / m["moe_decode1_cuda_ms"]
    print(f"[moe] decode1 cuda: best {m['moe_decode1_cuda_ms'] * 1e3:.1f} us ({best}), default "
          f"{m['moe_decode1_cuda_default_ms'] * 1e3:.1f} us; "
          + ", ".join(f"{c.up_rows}x{c.warps}/{c.early_regs} {t * 1e3:.1f}" for c, t in times.items())
          + f"; {m['moe_decode1_cuda_vs_dispatched_x']:.2f}x the dispatched layer", flush=True)
    print(f"# llmesh/kernels/moe_gemv.py\nCONFIGS[{cuda_device_tag(x.device)!r}] = {best!r}", flush=True)
    return m


def bench_decode1(s: Shapes, device: torch.device, ceilings: dict[str, float], w13: torch.Tensor,
                  w2: torch.Tensor, int4: tuple[torch.Tensor, torch.Tensor, dict], gen: torch.Generator
                  ) -> dict[str, float]:
    """The layer at batch 1 (k pairs, each its own block), bf16 and INT4 experts, as the tables
    dispatch it and in each form forced: 16-row tiles (the heuristic's) and the GEMV form (the
    table's GEMV entry, else 8 x 512 for bf16 and 64 x 64 for INT4). moe_decode1_frac: the
    dispatched bf16 layer's k experts' bytes per second over the copy bandwidth. Metrics:
    moe_decode1_{ms,tile_ms,gemv_ms,frac}, moe_decode1_int4_{ms,tile_ms,gemv_ms,vs_bf16_x}.
    ``int4``: the same experts as INT4 (codes w13, codes w2, fused_moe's quantization keywords)."""
    from llmesh.kernels.fused_moe import fused_moe
    from llmesh.kernels.fused_moe_config import MoEConfig, default_config, pick_config

    x = torch.randn(1, s.hidden, generator=gen, device=device).bfloat16()
    weights, ids = routing(1, s, device, gen)
    formats = (("", "dense", (w13, w2), {}, MoEConfig(1, 8, 512, 4, 1)),
               ("int4_", "int4", int4[:2], int4[2], MoEConfig(1, 64, 64, 4, 1)))
    shapes = ((s.inter, s.hidden), (s.hidden, s.inter))  # (N, K): gate/up, down
    m: dict[str, float] = {}
    for tag, fmt, (a13, a2), quant, gemv in formats:
        up, down = (pick_config(1, s.experts, n, k, s.top_k, device, fmt) for n, k in shapes)
        forms = {"tile": tuple(default_config(1, s.experts, n, k, s.top_k, fmt) for n, k in shapes),
                 "gemv": (up, down) if up.gemv else (gemv, gemv)}
        want = fused_moe(x, a13, a2, weights, ids, **quant)
        m[f"moe_decode1_{tag}ms"] = best_of_two(lambda: fused_moe(x, a13, a2, weights, ids, **quant), device)
        for name, (c_up, c_down) in forms.items():
            got = fused_moe(x, a13, a2, weights, ids, config=c_up, down_config=c_down, **quant)
            err = float((got.float() - want.float()).abs().max()) / max(float(want.float().abs().max()), 1e-6)
            if err > 0.02:
                raise RuntimeError(f"fused_moe's {name} form differs from the dispatched {fmt} layer at batch 1: "
                                   f"{err:.3g}")
            m[f"moe_decode1_{tag}{name}_ms"] = best_of_two(
                lambda: fused_moe(x, a13, a2, weights, ids, config=c_up, down_config=c_down, **quant), device)
        print(f"[moe] decode1 {fmt}: {m[f'moe_decode1_{tag}ms'] * 1e3:.1f} us dispatched ({up}), tiles "
              f"{m[f'moe_decode1_{tag}tile_ms'] * 1e3:.1f} us, GEMV {m[f'moe_decode1_{tag}gemv_ms'] * 1e3:.1f} us",
              flush=True)
    bytes_ = s.top_k * 3 * s.inter * s.hidden * w13.element_size()
    m["moe_decode1_frac"] = bytes_ / (m["moe_decode1_ms"] / 1e3) / (ceilings["copy_tb_s"] * 1e12)
    m.update(bench_decode1_cuda(x, w13, w2, weights, ids, bytes_, ceilings, m["moe_decode1_ms"]))
    m["moe_decode1_int4_vs_bf16_x"] = m["moe_decode1_ms"] / m["moe_decode1_int4_ms"]
    return m

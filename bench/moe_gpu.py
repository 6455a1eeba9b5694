"""The fused MoE layer (llmesh/kernels/fused_moe.py) at Qwen3-30B-A3B's shape, and the engine on a
random-weight Qwen3-30B-A3B.

Kernel (bf16; hidden 2048, 128 experts, top-8, expert FFN 768; routing from softmax of random
router logits, so experts are hit unevenly as in a real batch):
- decode, batch 64: a weight stream. bytes = the distinct experts the batch touches, each read
  once (w13 + w2), + the activations in and out; moe_gemm_frac_decode64 = achieved B/s over
  the measured copy bandwidth (about 4.26e12 B/s on an H200).
- prefill, 4096 tokens: compute. flops = 2 * T * k * (2 I H + H I);
  moe_gemm_frac_prefill4k = achieved FLOP/s over the measured bf16 GEMM throughput (about
  689e12 on an H200).
- moe_gemm_frac = the smaller of the two; the torch reference (per-expert loop, the torch
  backend's path) is timed at both shapes, and the INT8-, FP8-, block-scaled FP8- (128 x 128
  blocks, Qwen3-30B-A3B-FP8's layout) and INT4-expert kernels at both (moe_<fmt>_decode64_vs_bf16_x).
Engine (--parts engine): random:qwen3-30b-a3b through bench/decode_gpu.py's batch-1 decode
(roofline: the top-k experts of each layer + every other weight + K/V, over copy bandwidth)
and its offline workload: moe_decode_b1_roofline_frac, moe_offline_out_tok_s. With
--engine-quantization none,int4 the INT4 engine (experts and linears quantized on load) runs
the batch-1 decode too: moe_int4_decode_b1_tok_s, moe_int4_decode_b1_vs_bf16_x.

Batch 1 (the kernel part, bench/moe_steps.py): the layer at one token as dispatched and in each
GEMM form forced, 16-row tiles and the GEMV form, bf16 and INT4 experts
(moe_decode1_{ms,tile_ms,gemv_ms,frac}, moe_decode1_int4_{ms,tile_ms,gemv_ms,vs_bf16_x}).

Align (--parts align; the kernel part runs it too): the align step's four paths (torch ops,
one-program kernel, chunked kernels, chunked kernels with a sort) alone and inside the layer, at
sizes from batch 1 to a 4k prefill (moe_align_t<T>_{torch,kernel,chunks,sorted}_us,
moe_layer_t<T>_align_*_ms).

Usage: python bench/moe_gpu.py [--parts kernel,engine,align,decode1] [--autotune] [--tune-weights dense,int4]
       [--offline-repeats 3] [--smoke] [--suffix _x]
Writes bench/results/moe_<dev><suffix>.json. --autotune first sweeps fused_moe_config.CANDIDATES (those
whose BLOCK_M suits the rows per expert) for both GEMMs at decode 64 / prefill 4096 (the token
counts in --tune-m) and merges the winners into llmesh/kernels/fused_moe_tuned.json under the device's
tag, which the kernel and engine parts of the same run then use; --tune-weights int4 sweeps
INT4_CANDIDATES with INT4 experts into the device's ":int4" table. The winners are then tried with
split-K (decode sizes), in grouped program order (MoEConfig.group_m; prefill sizes), with
their weight tiles through TMA descriptors (MoEConfig.weight_tma; every size) and, for the down
GEMM's tl.dot tiles, in the sorted hidden layout (a_tma), warp-specialized (warp_spec) and persistent;
--tune-order-only skips the tile sweep and tries only those on the table's tiles.
--tune-gemv-only sweeps only the GEMV form's candidates against the table's entries (batch 1).
--parts decode1: the batch-1 layer alone (bench/moe_steps.py's part of the kernel part).
--smoke: tiny shapes through Triton's interpreter on the CPU (checks the code paths only).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_ceilings import (device_name, device_tag, measure_ceilings, pick_device,  # noqa: E402
                          results_dir_for, rounded, software_versions, time_ms)
from llmesh.bench_results import write_result  # noqa: E402
from moe_autotune import SORTED_CHANGES, autotune, smoke_sizes, tune_weights  # noqa: E402
from moe_shapes import QWEN3_30B_A3B, SMOKE, Shapes, expert_bytes, experts  # noqa: E402
from moe_steps import bench_align, bench_decode1, bench_norm_router, bench_router, best_of_two, routing  # noqa: E402

PARTS = ("kernel", "engine", "align", "decode1")


def block_experts(w13: torch.Tensor, w2: torch.Tensor, s: Shapes) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The experts as a block-scaled FP8 checkpoint stores them (128 x 128 blocks; rows cut to a
    power of two dividing I where the smoke shapes' I is smaller): codes and fused_moe's keywords."""
    from llmesh.kernels.block_fp8_gemm import quantize_fp8_blocks

    block = (min(128, s.inter & -s.inter), 128)
    parts = [[quantize_fp8_blocks(one, block) for one in w] for w in (w13, w2)]
    (q13, s13), (q2, s2) = ((torch.stack([q for q, _ in p]), torch.stack([sc for _, sc in p])) for p in parts)
    return q13, q2, dict(w13_scale=s13, w2_scale=s2, weight_block=block)


def sorted_layout_ms(x, w13, w2, weights, ids, s: Shapes, device: torch.device, tag: str) -> dict[str, float]:
    """The layer on the table's tiles as they are ("table"), with the down GEMM in the sorted hidden
    layout ("sorted", MoEConfig.a_tma), that down loop warp-specialized ("warp_spec") and as a
    persistent kernel ("persistent"; SORTED_CHANGES), each output checked bit for bit against the
    first: {} where a GEMM runs the GEMV form or the weights cannot take TMA; a variant MoEConfig
    refuses on these tiles (warp_spec past WARP_SPEC_MAX_ROWS) is left out, said on stdout."""
    from llmesh.kernels.fused_moe import fused_moe, weight_tma_supported
    from llmesh.kernels.fused_moe_config import pick_config

    t = x.shape[0]
    up = pick_config(t, s.experts, s.inter, s.hidden, s.top_k, device)
    down = replace(pick_config(t, s.experts, s.hidden, s.inter, s.top_k, device), block_m=up.block_m)
    if up.gemv or not weight_tma_supported(w2):
        return {}
    variants = {"table": down}
    for name, change in zip(("sorted", "warp_spec", "persistent"), SORTED_CHANGES):
        try:
            variants[name] = replace(down, **change)
        except ValueError as exc:
            print(f"[moe] {tag}: no {name} variant of the table's down tile: {exc}", flush=True)
    want = fused_moe(x, w13, w2, weights, ids, config=up, down_config=down)
    out = {}
    for name, cfg in variants.items():
        if not torch.equal(fused_moe(x, w13, w2, weights, ids, config=up, down_config=cfg), want):
            raise RuntimeError(f"fused_moe's {name} down tile {cfg} differs from the table's at {tag}")
        out[name] = best_of_two(lambda: fused_moe(x, w13, w2, weights, ids, config=up, down_config=cfg), device)
    return out


def bench_kernel(s: Shapes, device: torch.device, ceilings: dict[str, float], smoke: bool) -> dict[str, float]:
    from llmesh.engine.model.moe import quantize_experts_fp8, quantize_experts_int4, quantize_experts_int8
    from llmesh.kernels.fused_moe import TOKEN_SUM_ON_CUDA, fused_moe
    from llmesh.kernels.fused_moe_ref import fused_moe_ref

    gen = torch.Generator(device).manual_seed(0)
    w13, w2 = experts(s, device, gen)
    q13, s13 = quantize_experts_int8(w13)
    q2, s2 = quantize_experts_int8(w2)
    f13, fs13 = quantize_experts_fp8(w13)
    f2, fs2 = quantize_experts_fp8(w2)
    c13, cs13, cm13 = quantize_experts_int4(w13)
    c2, cs2, cm2 = quantize_experts_int4(w2)
    int4 = dict(w13_scale=cs13, w2_scale=cs2, w13_min=cm13, w2_min=cm2)
    b13, b2, blocks = block_experts(w13, w2, s)
    m: dict[str, float] = {}
    for tag, t in (("decode64", s.decode_batch), ("prefill4k", s.prefill_tokens)):
        x = torch.randn(t, s.hidden, generator=gen, device=device).bfloat16()
        weights, ids = routing(t, s, device, gen)
        ref = fused_moe_ref(x, w13, w2, weights, ids)
        got = fused_moe(x, w13, w2, weights, ids)
        err = float((got.float() - ref.float()).abs().max()) / max(float(ref.float().abs().max()), 1e-6)
        if err > 0.05:
            raise RuntimeError(f"fused_moe differs from its reference at {tag}: relative max error {err:.3g}")
        # Replayed from a CUDA graph (as the engine runs the layer), the better of two timings:
        # timed from the host, the layer's ~20 launches (the align step's torch ops, two GEMMs,
        # the sum) made decode 64 host-bound, 0.54-1.35 ms from run to run for ~0.3 ms of GPU time
        ms = best_of_two(lambda: fused_moe(x, w13, w2, weights, ids), device)
        # the top-k sum inside the down GEMM (TOKEN_SUM_ON_CUDA decides from these), checked bit for bit
        if not torch.equal(fused_moe(x, w13, w2, weights, ids, token_sum=True),
                           fused_moe(x, w13, w2, weights, ids, token_sum=False)):
            raise RuntimeError(f"fused_moe's in-GEMM top-k sum differs from moe_sum's at {tag}")
        sums_ms = {on: best_of_two(lambda: fused_moe(x, w13, w2, weights, ids, token_sum=on), device)
                   for on in (False, True)}
        # the default path was just timed again (TOKEN_SUM_ON_CUDA picks one of the two): the same
        # kernels twice in one run read 0.757 and 0.727 ms at the 4k prefill (moe_h200_sorted_order.json),
        # so the layer's figure is the better of both, as each of them is the better of two replays
        default_sum = x.is_cuda and TOKEN_SUM_ON_CUDA
        ms = sums_ms[default_sum] = min(ms, sums_ms[default_sum])
        layouts = sorted_layout_ms(x, w13, w2, weights, ids, s, device, tag)
        for name, layout_ms in layouts.items():
            m[f"moe_{tag}_{name}_tiles_ms" if name == "table" else f"moe_{tag}_{name}_ms"] = layout_ms
            if name != "table":
                m[f"moe_{tag}_{name}_vs_table_x"] = layouts["table"] / layout_ms
        # the reference's per-expert loop reads routing on the host (not capturable): host-timed
        ref_ms = time_ms(lambda: fused_moe_ref(x, w13, w2, weights, ids), device)
        int8_ms = best_of_two(lambda: fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2), device)
        fp8_ms = best_of_two(lambda: fused_moe(x, f13, f2, weights, ids, w13_scale=fs13, w2_scale=fs2), device)
        ref4 = fused_moe_ref(x, c13, c2, weights, ids, **int4)
        err4 = float((fused_moe(x, c13, c2, weights, ids, **int4).float() - ref4.float()).abs().max())
        if err4 > 0.05 * max(float(ref4.float().abs().max()), 1e-6):
            raise RuntimeError(f"INT4 fused_moe differs from its reference at {tag}: max error {err4:.3g}")
        int4_ms = best_of_two(lambda: fused_moe(x, c13, c2, weights, ids, **int4), device)
        refb = fused_moe_ref(x, b13, b2, weights, ids, **blocks)
        errb = float((fused_moe(x, b13, b2, weights, ids, **blocks).float() - refb.float()).abs().max())
        if errb > 0.05 * max(float(refb.float().abs().max()), 1e-6):
            raise RuntimeError(f"block-scaled FP8 fused_moe differs from its reference at {tag}: max error {errb:.3g}")
        fp8block_ms = best_of_two(lambda: fused_moe(x, b13, b2, weights, ids, **blocks), device)
        distinct = int(ids.unique().numel())
        act_bytes = 2 * t * s.hidden * 2 + t * s.top_k * (s.inter + s.hidden) * 2 * 2  # x, out; hidden, per-copy out
        bytes_ = distinct * expert_bytes(s, 2) + act_bytes
        flops = 2 * t * s.top_k * expert_bytes(s, 1)
        m.update({f"moe_{tag}_ms": ms, f"moe_{tag}_ref_ms": ref_ms, f"moe_{tag}_vs_ref_x": ref_ms / ms,
                  f"moe_{tag}_int8_ms": int8_ms, f"moe_{tag}_fp8_ms": fp8_ms, f"moe_{tag}_int4_ms": int4_ms,
                  f"moe_{tag}_fp8block_ms": fp8block_ms, f"moe_{tag}_moe_sum_ms": sums_ms[False],
                  f"moe_{tag}_token_sum_ms": sums_ms[True],
                  f"moe_{tag}_token_sum_vs_moe_sum_x": sums_ms[False] / sums_ms[True],
                  f"moe_{tag}_distinct_experts": distinct,
                  f"moe_{tag}_tb_s": bytes_ / ms / 1e9, f"moe_{tag}_tflops": flops / ms / 1e9})
        if tag == "decode64":
            m["moe_gemm_frac_decode64"] = bytes_ / (ms / 1e3) / (ceilings["copy_tb_s"] * 1e12)
            m["moe_int8_decode64_vs_bf16_x"] = ms / int8_ms
            m["moe_fp8_decode64_vs_bf16_x"] = ms / fp8_ms
            m["moe_int4_decode64_vs_bf16_x"] = ms / int4_ms
            m["moe_fp8block_decode64_vs_bf16_x"] = ms / fp8block_ms
        else:
            m["moe_gemm_frac_prefill4k"] = flops / (ms / 1e3) / (ceilings["gemm_bf16_tflops"] * 1e12)
        print(f"[moe] {tag}: T={t} {distinct} experts hit: {ms:.3f} ms (ref {ref_ms:.3f} ms, int8 {int8_ms:.3f} ms, "
              f"fp8 {fp8_ms:.3f} ms, fp8 blocks {fp8block_ms:.3f} ms, int4 {int4_ms:.3f} ms; top-k sum in the down "
              f"GEMM {sums_ms[True]:.3f} against {sums_ms[False]:.3f} ms), "
              f"{bytes_ / ms / 1e9:.2f} TB/s, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    m["moe_gemm_frac"] = min(m["moe_gemm_frac_decode64"], m["moe_gemm_frac_prefill4k"])
    try:  # a failure of the step comparisons must not cost the figures above
        m.update(bench_align(s, device, w13, w2, gen))
    except Exception:
        traceback.print_exc()
        print("[moe] align comparison FAILED (the moe_align_* metrics are missing)", flush=True)
    try:
        m.update(bench_decode1(s, device, ceilings, w13, w2, (c13, c2, int4), gen))  # the INT4 experts above
    except Exception:
        traceback.print_exc()
        print("[moe] batch-1 layer comparison FAILED (the moe_decode1_* metrics are missing)", flush=True)
    try:
        m.update(bench_router(s, device, gen))
    except Exception:
        traceback.print_exc()
        print("[moe] router comparison FAILED (the moe_router_* metrics are missing)", flush=True)
    try:
        m.update(bench_norm_router(s, device, gen))
    except Exception:
        traceback.print_exc()
        print("[moe] norm + router comparison FAILED (the moe_norm_router_* metrics are missing)", flush=True)
    return m


def bench_engine(device: torch.device, ceilings: dict[str, float], smoke: bool, backend: str,
                 offline_repeats: int = 3, quantization: str = "none") -> tuple[dict[str, float], dict]:
    """decode_gpu.py's batch-1 decode and offline workload on the MoE preset, metrics prefixed moe_
    (another ``quantization``: the batch-1 decode alone, metrics prefixed moe_<quantization>_)."""
    from decode_gpu import SMOKE_WORKLOAD, Workload, decode_b1, make_workload, offline_repeated, warm_up

    from llmesh.engine import LLM

    model = "random:tiny-qwen3-moe" if smoke else "random:qwen3-30b-a3b"
    work = SMOKE_WORKLOAD if smoke else Workload()
    engine_kwargs = dict(backend=backend, dtype="bfloat16", device=str(device), max_num_seqs=1024,
                         max_num_batched_tokens=16384, max_model_len=2048, quantization=quantization)
    if smoke:
        engine_kwargs.update(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=128, num_kv_blocks=256)
    llm = LLM(model, **engine_kwargs)
    cfg = llm.engine.model_config
    prompts, outputs = make_workload(work, cfg.vocab_size)
    # The whole workload as a warm-up did not stop the first engine of a fresh machine compiling inside its timed
    # run (6.9k out tok/s against the next process's 8.8k, moe_h100_order{1,2}_engine.json): the eager steps'
    # kernels, which the runner now compiles at start-up, so the other benchmarks' warm-up serves here too.
    warm_up(llm, work, np.random.default_rng(5))
    gen = torch.Generator().manual_seed(2)
    b1_prompt, b1_new = (16, 12) if smoke else (128, 256)
    m = decode_b1(llm, torch.randint(10, cfg.vocab_size, (b1_prompt,), generator=gen).tolist(), b1_new,
                  ceilings["copy_tb_s"])
    if quantization != "none":  # decode_b1's roofline counts the model dtype's bytes: not this format's
        return ({f"moe_{quantization}_{k}": v for k, v in m.items() if "roofline" not in k},
                {"model": model, "engine": engine_kwargs})
    # As decode_gpu.py: one run varies a lot (docs/moe.md), so the lower median of repeats.
    m.update(offline_repeated(llm, prompts, outputs, offline_repeats, np.random.default_rng(3)))
    workload = {"model": model, "engine": engine_kwargs, "offline": asdict(work),
                "decode_b1": f"one {b1_prompt}-token prompt, {b1_new} new tokens; roofline = copy_tb_s / (top-k "
                             "experts of each layer + other weights except the input embedding + K/V)"}
    return {f"moe_{k}": v for k, v in m.items()}, workload


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--parts", default="kernel,engine", help="comma-separated subset of: " + ", ".join(PARTS))
    ap.add_argument("--backend", choices=("triton", "torch"), default=None,
                    help="engine part's backend (default triton; smoke: torch)")
    ap.add_argument("--autotune", action="store_true",
                    help="sweep tile configs first and merge the winners into the tuned file")
    ap.add_argument("--tune-m", default="64,4096", help="token counts the autotune sweeps")
    ap.add_argument("--tune-order-only", action="store_true",
                    help="autotune: keep the table's tiles, try only split-K (decode sizes), the grouped "
                         "program order (prefill sizes), TMA and the sorted layout on them")
    ap.add_argument("--tune-gemv-only", action="store_true",
                    help="autotune: only the GEMV-form candidates, against the table's tiles")
    ap.add_argument("--tune-weights", default="dense",
                    help="comma-separated expert formats the autotune sweeps: dense (bf16, int8, fp8), int4")
    ap.add_argument("--tune-budget-s", type=float, default=float("inf"),
                    help="seconds per format's sweep: past them the rest is skipped, each size keeps its best so far")
    ap.add_argument("--tuned-file", default=None,
                    help="table the autotune writes (default llmesh/kernels/fused_moe_tuned.json; smoke: "
                         "<results-dir>/fused_moe_tuned_smoke.json)")
    ap.add_argument("--offline-repeats", type=int, default=3,
                    help="engine part: offline runs (fresh ids each); the lower median is reported")
    ap.add_argument("--engine-quantization", default="none",
                    help="engine part: comma-separated quantizations (none first: the full part; others: batch-1)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    ap.add_argument("--suffix", default="", help="appended to the result file's name (a run of some parts)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    device = pick_device(args.device)
    if device.type != "cuda":
        if not args.smoke:
            ap.error("the kernels need a CUDA device; use --smoke for the CPU interpreter check")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules are imported
    shapes = SMOKE if args.smoke else QWEN3_30B_A3B
    t0 = time.perf_counter()
    ceilings = measure_ceilings(device, copy_gib=1 / 16 if args.smoke else 2.0, gemm_n=256 if args.smoke else 8192)
    print(f"[moe] {device_name(device)}: copy {ceilings['copy_tb_s']:.3f} TB/s, gemm "
          f"{ceilings['gemm_bf16_tflops']:.1f} TFLOP/s ({time.perf_counter() - t0:.1f}s)", flush=True)
    metrics: dict[str, float] = dict(ceilings)
    workload: dict = {"shapes": asdict(shapes), "dtype": "bfloat16", "software": software_versions(),
                      "smoke": args.smoke,
                      "environment": {k: os.environ[k] for k in ("LLMESH_MOE_CUDA_GEMV", "LLMESH_CUDA_GEMV",
                                                                 "LLMESH_GEMV_EARLY", "LLMESH_CUDA_ROUTER")
                                      if k in os.environ},
                      "kernel": "fused_moe (aligned blocks, gate/up + SiLU-mul fused, down with the routing weight, "
                                "sum over k); decode bytes = distinct experts touched x (w13 + w2) + activations; "
                                "prefill flops = 2 T k (3 I H)"}
    results_dir = results_dir_for(args)
    name = f"moe_{device_tag(device)}{args.suffix}"

    def save() -> None:
        path = write_result(name, workload, rounded(metrics), device=device_name(device), results_dir=results_dir)
        print(f"[moe] wrote {path}", flush=True)

    if args.autotune:  # first, so the kernel and engine parts run the configs it measured
        from llmesh.kernels.fused_moe_config import TUNED_FILE

        m_values = [max(1, int(v)) for v in args.tune_m.split(",")]
        if args.smoke:
            m_values = smoke_sizes(m_values, QWEN3_30B_A3B, shapes)
        tuned_file = Path(args.tuned_file) if args.tuned_file else (
            results_dir / "fused_moe_tuned_smoke.json" if args.smoke else TUNED_FILE)
        t1 = time.perf_counter()
        workload["autotune"] = [line for weights in args.tune_weights.split(",")
                                for line in autotune(shapes, device, m_values, args.smoke, tuned_file, weights,
                                                      tiles=not args.tune_order_only,
                                                      gemv_only=args.tune_gemv_only,
                                                      budget_s=args.tune_budget_s)]
        print(f"[moe] autotune {time.perf_counter() - t1:.0f}s", flush=True)
        save()
    if "kernel" in parts:
        metrics.update(bench_kernel(shapes, device, ceilings, args.smoke))
        save()
    if "decode1" in parts and "kernel" not in parts:  # the batch-1 layer alone (the kernel part runs it too)
        gen = torch.Generator(device).manual_seed(0)
        w13, w2 = experts(shapes, device, gen)
        c13, c2, int4 = tune_weights("int4", w13, w2)
        metrics.update(bench_decode1(shapes, device, ceilings, w13, w2, (c13, c2, int4), gen))
        save()
    if "align" in parts and "kernel" not in parts:
        gen = torch.Generator(device).manual_seed(0)
        metrics.update(bench_align(shapes, device, *experts(shapes, device, gen), gen))
        save()
    for quant in args.engine_quantization.split(",") if "engine" in parts else ():
        engine_metrics, workload["engine" if quant == "none" else f"engine_{quant}"] = bench_engine(
            device, ceilings, args.smoke, args.backend or ("torch" if args.smoke else "triton"),
            min(2, args.offline_repeats) if args.smoke else args.offline_repeats, quant)
        metrics.update(engine_metrics)
        gc.collect()  # the engine's pool, before the next quantization's engine sizes its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if quant != "none" and "moe_decode_b1_tok_s" in metrics:
            metrics[f"moe_{quant}_decode_b1_vs_bf16_x"] = (metrics[f"moe_{quant}_decode_b1_tok_s"]
                                                           / metrics["moe_decode_b1_tok_s"])
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

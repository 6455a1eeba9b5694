"""Where a decode step's GPU time goes, kernel by kernel (torch.profiler over CUDA-graph replays).

For each model named: one request decodes at batch 1 (or --batch requests together) on the
triton backend; after warm-up, --steps engine steps run under torch.profiler, which records
every kernel of the replayed graphs. Per model it reports the step's wall time, the kernels
a step launches, the GPU time they sum to, the share of the wall the GPU was busy (union of
kernel intervals; the rest is launch gaps and host time), the time by kernel family
(GEMM, attention, norm, MoE, ...) and the top kernels by time, so a fusion or a launch-count
cut is chosen from a measurement.

Usage: python bench/kernel_profile.py [--models random:llama3-8b,random:qwen3-30b-a3b]
       [--batch 1] [--chunk 0] [--steps 24] [--quantization none|fp8|int4|...] [--kv-cache-dtype auto|fp8]
       [--router-kernel default|on|off]
       [--pair-blocks default|off] [--smoke]
Writes bench/results/kernel_profile_<dev><suffix>.json; metrics per model tag T (8b, 30b_a3b ...):
profile_<T>_b<B>[_c<N>]_{step_ms, step_ms_unprofiled, kernels_per_step, kernel_ms_per_step, gpu_busy_frac,
<family>_ms_per_step}. LLMESH_PDL / LLMESH_PDL_LATE / LLMESH_FUSED_DECODE / LLMESH_QKV_ROPE / LLMESH_DECODE_FOLD /
LLMESH_L2_PREFETCH / LLMESH_MOE_CUDA_GEMV / LLMESH_CUDA_GEMV / LLMESH_GEMV_EARLY / LLMESH_CUDA_ROUTER, when set,
are recorded in the workload (A/B of one switch per run, with --suffix).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_gpu import SMOKE_PRESET, model_tag, register_smoke_preset, union_length  # noqa: E402
from gpu_ceilings import device_name, device_tag, pick_device, results_dir_for, rounded, software_versions  # noqa: E402

from llmesh.bench_results import write_result  # noqa: E402
from llmesh.engine import LLM, SamplingParams  # noqa: E402
from llmesh.engine.model.ops_triton import FUSED_DECODE_ENV, QKV_ROPE_ENV  # noqa: E402
from llmesh.engine.model.prefetch import PREFETCH_ENV  # noqa: E402
from llmesh.kernels.common import PDL_ENV, PDL_LATE_ENV  # noqa: E402
from llmesh.kernels.attention_config import FOLD_ENV, PARTITION_ENV  # noqa: E402
from llmesh.kernels.moe_gemv import DENSE_ENV as DENSE_GEMV_ENV  # noqa: E402
from llmesh.kernels.moe_gemv import EARLY_ENV as GEMV_EARLY_ENV  # noqa: E402
from llmesh.kernels.moe_gemv import ENV as MOE_GEMV_ENV  # noqa: E402
from llmesh.kernels.router_gemv import ENV as ROUTER_ENV  # noqa: E402

# First match wins; names are lower-cased kernel names (Triton function names, cuBLAS/cuDNN
# internals, torch's ATen kernels).
FAMILIES: list[tuple[str, str]] = [
    ("moe", r"moe|expert|topk_softmax"),
    # the unified kernel's short-query and long-query (_prefill_kernel) launches; before "copy",
    # whose "fill" the latter's name holds
    ("attention", r"attn|attention|flash|fmha|sdpa|cudnn|decode_partition|decode_reduce|short_query|_prefill_kernel"),
    ("norm", r"rmsnorm|rms_norm|layer_norm|norm"),
    ("rope_kv", r"rope|kv_cache|kv_write|reshape_and_cache"),
    ("gemm", r"gemm|gemv|nvjet|cublas|cutlass|xmma|sm90|matmul|_mm_|splitk|skinny|linear"),
    ("activation", r"silu|gelu|act"),
    ("sampling", r"argmax|sample|softmax|topk|sort|cumsum|gather|scatter|index"),
    ("copy", r"copy|memcpy|memset|fill|cat"),
    ("elementwise", r"elementwise|vectorized|reduce|unrolled"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def kernel_events(prof) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every device kernel the profiler saw (CPU ops on the CPU)."""
    out = []
    for evt in prof.events():
        on_device = getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA
        if torch.cuda.is_available() and not on_device:
            continue
        if not torch.cuda.is_available() and (evt.cpu_parent is not None or on_device):
            continue  # on the CPU: top-level ops only, so nothing is counted twice
        tr = evt.time_range
        out.append((evt.name, float(tr.start), float(tr.end)))
    return out


def profile_model(model: str, args: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    kwargs = dict(backend="triton" if device.type == "cuda" else "torch", dtype="bfloat16", device=str(device),
                  max_num_seqs=max(8, args.batch + 1), max_num_batched_tokens=max(8192, args.batch + args.chunk),
                  max_model_len=2048, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    if args.smoke:
        kwargs.update(max_num_batched_tokens=max(256, args.batch + args.chunk), max_model_len=256, num_kv_blocks=128)
    llm = LLM(model, **kwargs)
    eng = llm.engine
    rng = np.random.default_rng(0)
    vocab = eng.model_config.vocab_size
    params = SamplingParams(max_tokens=args.warmup + 2 * args.steps + 16, temperature=0.0, ignore_eos=True)
    one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for _ in range(args.batch):
        eng.add_request(rng.integers(10, vocab, size=args.prompt).tolist(), params)

    def step() -> None:
        # --chunk: a fresh prompt that prefills in this step and finishes with its first token,
        # so every step is the batch's decodes plus one prefill chunk (a mixed step)
        if args.chunk:
            eng.add_request(rng.integers(10, vocab, size=args.chunk).tolist(), one_token)
        eng.step()

    for _ in range(args.warmup):  # prefill, graph capture of this batch size, caches warm
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()  # the same steps unprofiled: the profiler's own cost stays out of this one
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    plain_s = time.perf_counter() - t0
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - t0
    events = kernel_events(prof)
    while eng.has_unfinished_requests():
        eng.step()
    prefetch = eng.runner.model.prefetch  # what LLMESH_L2_PREFETCH resolved to on this device
    l2_prefetch = {"mode": prefetch.mode, "bytes_per_step": prefetch.bytes_asked}
    del llm, eng, prefetch
    if device.type == "cuda":
        torch.cuda.empty_cache()

    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    per_family: dict[str, float] = defaultdict(float)
    for name, s, e in events:
        per_name[name][0] += 1
        per_name[name][1] += e - s
        per_family[family(name)] += e - s
    steps = args.steps
    quant = ("" if args.quantization == "none" else f"_{args.quantization}") + \
        ("_kv8" if args.kv_cache_dtype == "fp8" else "")
    tag = f"profile_{model_tag(model)}{quant}_b{args.batch}" + (f"_c{args.chunk}" if args.chunk else "")
    total_us = sum(v[1] for v in per_name.values())
    metrics = {
        f"{tag}_step_ms": 1e3 * wall_s / steps,
        f"{tag}_step_ms_unprofiled": 1e3 * plain_s / steps,
        f"{tag}_kernels_per_step": len(events) / steps,
        f"{tag}_kernel_ms_per_step": total_us / 1e3 / steps,
        f"{tag}_gpu_busy_frac": union_length([(s, e) for _, s, e in events]) / (1e6 * wall_s),
    }
    for fam, us in sorted(per_family.items()):
        metrics[f"{tag}_{fam}_ms_per_step"] = us / 1e3 / steps
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:args.top]
    table = [{"kernel": name[:160], "family": family(name), "calls_per_step": n / steps,
              "us_per_step": us / steps, "us_per_call": us / max(n, 1), "share": us / max(total_us, 1e-9)}
             for name, (n, us) in top]
    print(f"[profile] {model} batch {args.batch}: {metrics[f'{tag}_step_ms']:.3f} ms/step "
          f"({metrics[f'{tag}_step_ms_unprofiled']:.3f} unprofiled), "
          f"{metrics[f'{tag}_kernels_per_step']:.0f} llmesh/kernels/step summing to "
          f"{metrics[f'{tag}_kernel_ms_per_step']:.3f} ms, GPU busy {metrics[f'{tag}_gpu_busy_frac']:.2f}", flush=True)
    for fam, us in sorted(per_family.items(), key=lambda kv: -kv[1]):
        print(f"    {fam:<12} {us / 1e3 / steps:8.3f} ms/step", flush=True)
    for row in table:
        print(f"    {row['us_per_step']:9.1f} us  {row['calls_per_step']:6.1f}x  {row['us_per_call']:7.2f} us/call  "
              f"{row['kernel'][:100]}", flush=True)
    return metrics, {"kernels": table, "engine": kwargs, "l2_prefetch": l2_prefetch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random:llama3-8b,random:qwen3-30b-a3b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=0,
                    help="tokens of a fresh prompt prefilled beside the decodes in every step (mixed "
                         "steps, as the offline workload's; the tag gains _c<N>); 0: decode-only steps")
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--quantization", default="none",
                    help="the engine's weight format (none, fp8, int4, ...); a format other than none "
                         "is named in the metrics' tag: profile_<model>_<format>_b<B>_...")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                    help="the KV pool's dtype: auto (the model's), fp8 (E4M3 with per-head scales; the tag "
                         "gains _kv8: profile_<model>[_<format>]_kv8_b<B>_...)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--router-kernel", choices=("default", "on", "off"), default="default",
                    help="MoE router: the Triton kernel or the torch ops on the GPU (kernels.moe_router)")
    ap.add_argument("--norm-router", choices=("default", "on", "off"), default="default",
                    help="MoE: on fuses the layer's norm, router GEMM and top-k into one kernel up to 64 "
                         "tokens a step, off never (kernels.moe_norm_router.NORM_ROUTER_MAX_TOKENS)")
    ap.add_argument("--pair-blocks", choices=("default", "off"), default="default",
                    help="MoE: off sorts a one-token step's pairs by expert (the align launch) and sums "
                         "them with _moe_sum_kernel, as before kernels.fused_moe.PAIR_BLOCKS_MAX_TOKENS")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (torch backend)")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.router_kernel != "default":
        import llmesh.kernels.moe_router as moe_router

        moe_router.ROUTER_KERNEL_ON_CUDA = args.router_kernel == "on"
    if args.norm_router != "default":
        import llmesh.kernels.moe_norm_router as moe_norm_router

        moe_norm_router.NORM_ROUTER_MAX_TOKENS = 64 if args.norm_router == "on" else 0
    if args.pair_blocks == "off":
        import llmesh.kernels.fused_moe as fused_moe

        fused_moe.PAIR_BLOCKS_MAX_TOKENS = 0
    models = args.models.split(",")
    if args.smoke:
        register_smoke_preset()
        models = [f"random:{SMOKE_PRESET}"]
        args.prompt, args.warmup, args.steps = 16, 3, 4
    metrics: dict[str, float] = {}
    workload: dict = {"batch": args.batch, "prompt_tokens": args.prompt, "chunk_tokens": args.chunk,
                      "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype, "warmup_steps": args.warmup,
                      "profiled_steps": args.steps, "router_kernel": args.router_kernel,
                      "pair_blocks": args.pair_blocks, "norm_router": args.norm_router,
                      "software": software_versions(), "smoke": args.smoke,
                      "environment": {k: os.environ[k] for k in (PDL_ENV, PDL_LATE_ENV, FUSED_DECODE_ENV, QKV_ROPE_ENV,
                                                                 FOLD_ENV, PREFETCH_ENV, MOE_GEMV_ENV, DENSE_GEMV_ENV,
                                                                 GEMV_EARLY_ENV, ROUTER_ENV, PARTITION_ENV)
                                      if k in os.environ},
                      "families": dict(FAMILIES), "models": {}}
    for model in models:
        m, detail = profile_model(model, args, device)
        metrics.update(m)
        workload["models"][model] = detail
    path = write_result(f"kernel_profile_{device_tag(device)}{args.suffix}", workload, rounded(metrics),
                        device=device_name(device), results_dir=results_dir_for(args))
    print(f"[profile] wrote {path}", flush=True)


if __name__ == "__main__":
    main()

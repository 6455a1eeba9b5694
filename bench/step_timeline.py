"""Where an offline run's time goes, step by step: GPU time per step kind, host time per phase.

Runs the offline workload of decode_gpu.py (or a slice of it) and records, for every engine
step, how it ran (decode graph / mixed graph / eager), its tokens and sequences, the GPU time
between CUDA events recorded around its launch (no synchronisation during the run), and the
host time of schedule, launch and landing the previous step. Prints a table by kind and the
share of wall time the GPU was busy; writes bench/results/step_timeline_<dev>.json.

Usage: python bench/step_timeline.py [--num-prompts 1000] [--max-num-seqs 1024]
       [--max-num-batched-tokens 16384] [--quantization none|fp8|int4|...] [--repeats N] [--suffix S] [--smoke]
With --repeats N the last run's figures are the plain metrics and earlier runs' carry run<i>_.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch

from decode_gpu import SMOKE_PRESET, SMOKE_WORKLOAD, Workload, fresh_ids, make_workload, register_smoke_preset
from gpu_ceilings import device_name, device_tag, pick_device, results_dir_for, rounded, software_versions
from llmesh.bench_results import write_result
from llmesh.engine import LLM, SamplingParams


def instrument(llm: LLM) -> list[dict]:
    """Wrap the engine's phases with timers; returns the list each step appends to."""
    eng, runner = llm.engine, llm.engine.runner
    steps: list[dict] = []
    cuda = eng.device.type == "cuda"
    launch, schedule, finish = runner.launch, eng.scheduler.schedule, eng.core._land
    stats = getattr(runner, "stats", None)

    def timed_schedule():
        t0 = time.perf_counter()
        out = schedule()
        steps.append({"schedule_s": time.perf_counter() - t0, "tokens": out.num_batched_tokens,
                      "seqs": len(out.chunks), "launch_s": 0.0, "finish_s": 0.0, "kind": "empty"})
        return out

    def timed_launch(scheduled):
        rec = steps[-1]
        before = replace(stats) if stats is not None else None
        t0 = time.perf_counter()
        if cuda:
            rec["ev0"] = torch.cuda.Event(enable_timing=True)
            rec["ev0"].record()
        handle = launch(scheduled)
        if cuda:
            rec["ev1"] = torch.cuda.Event(enable_timing=True)
            rec["ev1"].record()
        rec["launch_s"] = time.perf_counter() - t0
        if before is not None:
            for kind in ("decode_graph_steps", "mixed_graph_steps", "eager_steps"):
                if getattr(stats, kind) != getattr(before, kind):
                    rec["kind"] = kind.removesuffix("_steps")
        return handle

    def timed_finish(*args, **kwargs):
        t0 = time.perf_counter()
        out = finish(*args, **kwargs)
        steps[-1]["finish_s"] += time.perf_counter() - t0
        return out

    runner.launch, eng.scheduler.schedule, eng.core._land = timed_launch, timed_schedule, timed_finish
    return steps


def summarize(steps: list[dict], wall: float) -> dict[str, float]:
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for rec in steps:
        k = by_kind[rec["kind"]]
        k["steps"] += 1
        k["tokens"] += rec["tokens"]
        k["seqs"] += rec["seqs"]
        k["gpu_s"] += rec["ev0"].elapsed_time(rec["ev1"]) / 1e3 if "ev0" in rec else 0.0
        for phase in ("schedule_s", "launch_s", "finish_s"):
            k[phase] += rec[phase]
    metrics = {"wall_s": wall}
    print(f"{'kind':<14}{'steps':>7}{'tok/step':>10}{'seq/step':>10}{'gpu ms/step':>13}{'sched ms':>10}"
          f"{'launch ms':>11}{'land ms':>9}{'gpu s':>8}")
    for kind, k in sorted(by_kind.items()):
        n = k["steps"]
        print(f"{kind:<14}{n:>7.0f}{k['tokens'] / n:>10.0f}{k['seqs'] / n:>10.0f}{1e3 * k['gpu_s'] / n:>13.2f}"
              f"{1e3 * k['schedule_s'] / n:>10.2f}{1e3 * k['launch_s'] / n:>11.2f}{1e3 * k['finish_s'] / n:>9.2f}"
              f"{k['gpu_s']:>8.2f}")
        for name, v in k.items():
            metrics[f"{kind}_{name}"] = v
    gpu = sum(k["gpu_s"] for k in by_kind.values())
    metrics["gpu_busy_frac"] = gpu / wall if wall else 0.0
    print(f"wall {wall:.2f}s, GPU busy (event spans) {gpu:.2f}s = {metrics['gpu_busy_frac']:.2f}")
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--quantization", default="none", help="the engine's weight format (none, fp8, int4, ...)")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of the workload, each on fresh token ids of the same lengths")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    device = pick_device(None)
    work = SMOKE_WORKLOAD if args.smoke else Workload()
    work = replace(work, num_prompts=args.num_prompts or work.num_prompts)
    kw = dict(backend="torch" if args.smoke else "triton", dtype="bfloat16", device=str(device),
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, quantization=args.quantization)
    if args.smoke:
        register_smoke_preset()
        args.model = f"random:{SMOKE_PRESET}"
        kw.update(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=128, num_kv_blocks=256)
    llm = LLM(args.model, **kw)
    prompts, outputs = make_workload(work, llm.engine.model_config.vocab_size)
    warm, _ = make_workload(replace(work, num_prompts=min(work.num_prompts, 128), seed=work.seed + 7),
                            llm.engine.model_config.vocab_size)
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # compile outside the timing
    steps = instrument(llm)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
    rng = np.random.default_rng(work.seed + 11)
    metrics: dict[str, float] = {}
    for run in range(args.repeats):
        if run:  # fresh ids of the same lengths: no prefix-cache hits between runs
            prompts = fresh_ids(prompts, llm.engine.model_config.vocab_size, rng)
        steps.clear()
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        print(f"run {run}:")
        run_metrics = summarize(steps, wall)
        run_metrics["out_tok_s"] = sum(outputs) / wall
        slow = sorted(steps, key=lambda r: r["schedule_s"] + r["launch_s"] + r["finish_s"], reverse=True)[:8]
        print(f"{sum(outputs) / wall:.0f} out tok/s; slowest steps on the host (kind, tokens, seqs, sched/launch/land ms):",
              [(r["kind"], r["tokens"], r["seqs"], round(1e3 * r["schedule_s"], 1), round(1e3 * r["launch_s"], 1),
                round(1e3 * r["finish_s"], 1)) for r in slow])
        # the last run's figures plain, earlier runs' under run<i>_ (the first pays one-time costs)
        metrics.update(run_metrics if run == args.repeats - 1 else {f"run{run}_{k}": v for k, v in run_metrics.items()})
    workload = {"model": args.model, "engine": kw, "offline": vars(work) if hasattr(work, "__dict__") else str(work),
                "software": software_versions()}
    write_result(f"step_timeline_{device_tag(device)}{args.suffix}", workload, rounded(metrics), device=device_name(device),
                 results_dir=results_dir_for(args))


if __name__ == "__main__":
    main()

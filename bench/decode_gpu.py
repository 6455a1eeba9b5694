"""Engine benchmarks on a GPU with a random-weight model of real shapes (default Llama-3-8B).

(a) batch-1 decode: one 128-token prompt, 256 new tokens (greedy, ignore_eos), the engine
    driven step by step so the first token (TTFT) is timed apart from the decode;
    decode tok/s = (new tokens - 1) / time after the first token, against the roofline
    copy_tb_s / bytes read per step (every weight matrix once + K/V at the mean context).
    The input embedding table is not counted (a step gathers one row of it) unless it is
    tied to the LM head, so the roofline is the strict one.
(b) offline throughput: 1000 prompts, random token ids, input lengths lognormal (median 200,
    clipped 16..1024), output lengths lognormal (median 180, clipped 16..512), fixed seed,
    greedy, ignore_eos, all submitted at once through LLM.generate.
(c) one decode step of a batch of 64 running requests: wall time per step, GPU busy time
    per step (torch.profiler: union of the device's kernel / memcpy intervals) and the rest,
    the time the GPU waits on the host (scheduling, input staging, sampling sync, outputs).
(d) with --hf-baseline: Hugging Face transformers generate on a subset of (b) (bench/hf_baseline.py),
    and the engine on the same subset, for offline_vs_hf_x.

Usage: python bench/decode_gpu.py [--model random:llama3-8b] [--backend triton] [--hf-baseline]
Writes bench/results/decode_<size>_<dev>.json (e.g. decode_8b_h100.json), after each part.
--smoke: a tiny random model, few prompts, torch backend, the CPU when there is no GPU.
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gpu_ceilings import (device_name, device_tag, measure_ceilings, pick_device, results_dir_for, rounded,
                          software_versions)
from jit_watch import JitWatch
from llmesh.bench_results import write_result
from llmesh.engine import LLM, SamplingParams
from llmesh.engine.loader.random_weights import PRESETS, parameter_shapes
from llmesh.engine.model.config import ModelConfig

SMOKE_PRESET = "smoke-tiny"


@dataclass(frozen=True)
class Workload:
    """The offline workload (b); lengths are lognormal around a median, clipped."""

    num_prompts: int = 1000
    in_median: int = 200
    in_sigma: float = 0.6
    in_min: int = 16
    in_max: int = 1024
    out_median: int = 180
    out_sigma: float = 0.5
    out_min: int = 16
    out_max: int = 512
    seed: int = 0


SMOKE_WORKLOAD = Workload(num_prompts=12, in_median=24, in_min=4, in_max=64, out_median=8, out_min=2, out_max=16)


def fresh_ids(prompts: list[list[int]], vocab_size: int, rng: np.random.Generator) -> list[list[int]]:
    """New random token ids of the same lengths: a rerun the prefix cache cannot serve."""
    return [rng.integers(10, vocab_size, size=len(p)).tolist() for p in prompts]


def make_workload(w: Workload, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """(prompts as token ids, output length of each), the same for a given Workload."""
    rng = np.random.default_rng(w.seed)
    in_lens = np.clip(np.rint(rng.lognormal(math.log(w.in_median), w.in_sigma, w.num_prompts)), w.in_min, w.in_max)
    out_lens = np.clip(np.rint(rng.lognormal(math.log(w.out_median), w.out_sigma, w.num_prompts)),
                       w.out_min, w.out_max)
    prompts = [rng.integers(10, vocab_size, size=int(n)).tolist() for n in in_lens]
    return prompts, [int(n) for n in out_lens]


def register_smoke_preset() -> None:
    """A tiny Llama among the random presets, so --smoke exercises the same loading path."""
    PRESETS.setdefault(SMOKE_PRESET, ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_ids=[2], torch_dtype="bfloat16"))


def model_tag(model: str) -> str:
    """'8b' for random:llama3-8b, '1b' for random:llama3.2-1b, else the sanitized name."""
    name = Path(model.removeprefix("random:")).name.lower()
    sizes = re.findall(r"(?<![a-z0-9.])(\d+(?:\.\d+)?b)(?![a-z0-9])", name.replace("-", " ").replace("_", " "))
    return sizes[-1].replace(".", "p") if sizes else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def bytes_per_decode_step(cfg: ModelConfig, elem: int, context: float) -> tuple[float, float]:
    """(weight bytes read by one decode step, K/V bytes read at `context` tokens) for batch 1.
    A mixture of experts reads its token's top-k experts of each sparse layer, not all E."""
    params = sum(math.prod(shape) * (cfg.num_experts_per_tok / cfg.num_experts if ".experts." in name else 1)
                 for name, shape in parameter_shapes(cfg))
    if not cfg.tie_word_embeddings:
        params -= cfg.vocab_size * cfg.hidden_size  # the embedding lookup reads one row, not the table
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    return params * elem, kv_per_token * context


def warm_up(llm: LLM, work: Workload, rng: np.random.Generator) -> None:
    """Untimed, before any timing on a fresh engine: a few prompts of assorted lengths (every
    path compiles), then a slice of the workload's own shapes (other token ids: a full-budget
    prefill step and the mixed steps after it), so that Triton's specializations for those
    sizes compile outside the timing. quant_gpu.py warmed up without the slice, and its first
    offline run of a process read about 15% low (10.4k and 10.6k out tok/s against 12.1k in
    quant_h200_tile.json and quant_h200_kv8.json); this script's first runs did not
    (decode_8b_h200.json: 13.01k, 13.17k, 12.99k). The kernels of steps too large for a graph,
    which no slice reliably reaches (moe_h100_order1_engine.json), the engine compiles itself at
    start-up (triton_runner.eager_warmup_sizes); ``offline`` counts what its timed run still makes."""
    vocab = llm.engine.model_config.vocab_size
    warm = [min(n, llm.engine.max_model_len // 2) for n in (8, 64, 200, 300)]
    llm.generate([rng.integers(10, vocab, size=n).tolist() for n in warm],
                 SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    count = min(work.num_prompts, 128)
    warm_prompts, _ = make_workload(replace(work, num_prompts=count, seed=work.seed + 7), vocab)
    llm.generate(warm_prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))


def drain(llm: LLM) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_b1(llm: LLM, prompt: list[int], new_tokens: int, copy_tb_s: float) -> dict[str, float]:
    """(a): TTFT and decode tok/s of one request, and the bandwidth roofline of its decode."""
    eng, device = llm.engine, llm.engine.device
    sync(device)
    t0 = time.perf_counter()
    req = eng.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    t_first = t_last = None
    while eng.has_unfinished_requests():
        eng.step()  # returns once the step's sampled ids are on the host
        now, n = time.perf_counter(), req.num_output_tokens
        if t_first is None and n >= 1:
            t_first = now
        if t_last is None and n >= new_tokens:
            t_last = now
    if t_first is None or t_last is None or req.num_output_tokens != new_tokens:
        raise RuntimeError(f"batch-1 request produced {req.num_output_tokens} tokens, expected {new_tokens}")
    tok_s = (new_tokens - 1) / (t_last - t_first)
    mean_ctx = len(prompt) + new_tokens / 2  # decode steps attend over prompt + 1 .. prompt + new - 1 tokens
    w_bytes, kv_bytes = bytes_per_decode_step(eng.model_config, eng.dtype.itemsize, mean_ctx)
    roofline = copy_tb_s * 1e12 / (w_bytes + kv_bytes)
    print(f"[decode] (a) batch 1: TTFT {1e3 * (t_first - t0):.1f} ms, {tok_s:.1f} tok/s, roofline {roofline:.1f} "
          f"tok/s ({w_bytes / 1e9:.2f} GB weights + {kv_bytes / 1e6:.1f} MB KV per step) -> {tok_s / roofline:.2f}",
          flush=True)
    return {"decode_b1_tok_s": tok_s, "decode_b1_roofline_tok_s": roofline, "decode_b1_roofline_frac": tok_s / roofline,
            "decode_b1_ttft_ms": 1e3 * (t_first - t0), "decode_b1_step_ms": 1e3 / tok_s}


def offline_repeated(llm: LLM, prompts: list[list[int]], outputs: list[int], repeats: int,
                     rng: np.random.Generator, prefix: str = "offline") -> dict[str, float]:
    """``offline`` run ``repeats`` times, each after the first on fresh ids of the same lengths
    (the prefix cache must not serve a repeat): the lower-median run's metrics (with an even
    count the slower of the middle two, never a mean of runs), and every run's out tok/s
    (``<prefix>_run<i>_out_tok_s``)."""
    runs = [offline(llm, prompts, outputs, prefix)]
    for _ in range(1, repeats):
        runs.append(offline(llm, fresh_ids(prompts, llm.engine.model_config.vocab_size, rng), outputs, prefix))
    metrics = dict(sorted(runs, key=lambda r: r[f"{prefix}_out_tok_s"])[(len(runs) - 1) // 2])
    if len(runs) > 1:
        metrics.update({f"{prefix}_run{i}_out_tok_s": r[f"{prefix}_out_tok_s"] for i, r in enumerate(runs)})
        metrics[f"{prefix}_runs"] = len(runs)
    return metrics


def offline(llm: LLM, prompts: list[list[int]], outputs: list[int], prefix: str = "offline") -> dict[str, float]:
    """(b): every request submitted at once; output and total (prompt + output) tokens per second."""
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
    stats = getattr(llm.engine.runner, "stats", None)
    before = replace(stats) if stats is not None else None
    sync(llm.engine.device)
    with JitWatch() as jit:
        t0 = time.perf_counter()
        results = llm.generate(prompts, params)
        sync(llm.engine.device)
        wall = time.perf_counter() - t0
    got = [len(r.token_ids) for r in results]
    if got != outputs:
        bad = next(i for i, (g, w) in enumerate(zip(got, outputs)) if g != w)
        raise RuntimeError(f"request {bad} produced {got[bad]} tokens, expected {outputs[bad]}")
    n_out, n_in = sum(outputs), sum(len(p) for p in prompts)
    print(f"[decode] {prefix}: {len(prompts)} requests, {n_in} in + {n_out} out tokens in {wall:.1f}s: "
          f"{n_out / wall:.0f} out tok/s, {(n_in + n_out) / wall:.0f} total tok/s", flush=True)
    out = {f"{prefix}_out_tok_s": n_out / wall, f"{prefix}_total_tok_s": (n_in + n_out) / wall,
           f"{prefix}_requests": len(prompts), f"{prefix}_wall_s": wall}
    if jit.available:  # Triton specializations made inside the timing: the figure paid for them
        out.update({f"{prefix}_jit_specializations": jit.count, f"{prefix}_jit_s": jit.seconds})
        if jit.count:
            print(f"[decode] {prefix}: Triton specializations made inside the timed run: {jit.summary()}", flush=True)
            for variant in jit.variants:
                print(f"[decode] {prefix}:   {variant[:3000]}", flush=True)
    if before is not None:  # how the steps ran: graph replays (decode / mixed buckets) vs eager
        d = {k: getattr(stats, k) - getattr(before, k) for k in ("decode_graph_steps", "mixed_graph_steps",
                                                                 "eager_steps")}
        total = sum(d.values()) or 1
        out.update({f"{prefix}_{k}": v for k, v in d.items()})
        out[f"{prefix}_graph_replay_frac"] = (d["decode_graph_steps"] + d["mixed_graph_steps"]) / total
        print(f"[decode] {prefix}: steps {d} -> graph replay fraction {out[f'{prefix}_graph_replay_frac']:.3f}",
              flush=True)
    return out


def gpu_busy_ms(prof: torch.profiler.profile) -> float:
    """Union of the device activity intervals (kernels, copies, memsets) seen by the profiler."""
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    return union_length(spans) / 1e3  # time_range is in microseconds


def union_length(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    busy, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(spans):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        busy += cur_end - cur_start
    return busy


def graph_forward_ms(llm: LLM, batch: int) -> float | None:
    """GPU time of the captured decode graph for `batch` alone, replayed back to back.

    Replays re-run the last staged step: they rewrite the same K/V slots with the same values.
    """
    runner = llm.engine.runner
    graphs = getattr(runner, "decode_graphs", None)
    sizes = [b for b in getattr(runner, "graph_sizes", []) if b >= batch]
    if not graphs or not sizes or sizes[0] not in graphs:
        return None
    graph = graphs[sizes[0]][0]
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def decode_step_breakdown(llm: LLM, prompts: list[list[int]], steps: int, profiled_steps: int
                          ) -> tuple[dict[str, float], str]:
    """(c): where the wall time of a decode step of len(prompts) running requests goes; also
    names where the GPU time came from."""
    eng, device = llm.engine, llm.engine.device
    params = SamplingParams(max_tokens=steps + profiled_steps + 64, temperature=0.0, ignore_eos=True)
    reqs = [eng.add_request(p, params) for p in prompts]
    while any(r.num_output_tokens == 0 for r in reqs):  # prefill everyone
        eng.step()
    for _ in range(5):
        eng.step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    # Device activity only on a GPU: recording every host op would slow the steps and the parse.
    act = torch.profiler.ProfilerActivity
    activities = [act.CUDA if device.type == "cuda" else act.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled_steps):
            eng.step()
        sync(device)
    gpu_ms = gpu_busy_ms(prof) / profiled_steps
    forward_ms = graph_forward_ms(llm, len(prompts)) if device.type == "cuda" else None
    for r in reqs:
        eng.abort_request(r.request_id, emit_output=False)
    drain(llm)
    out = {"decode_step_ms": wall_ms, "decode_step_batch": len(prompts)}
    source = "torch.profiler"
    if forward_ms is not None:
        out["decode_step_forward_gpu_ms"] = forward_ms
        if gpu_ms < 0.9 * forward_ms:  # the profiler missed kernels (e.g. those inside CUDA graphs)
            print(f"[decode] (c) profiler saw {gpu_ms:.2f} ms of GPU work per step, less than the graph's "
                  f"{forward_ms:.2f} ms: using the graph replay time", flush=True)
            gpu_ms, source = forward_ms, "graph replay (profiler missed kernels)"
    out.update(decode_step_gpu_ms=gpu_ms, decode_step_host_ms=max(0.0, wall_ms - gpu_ms),
               decode_step_host_frac=max(0.0, wall_ms - gpu_ms) / wall_ms,
               decode_step_tok_s=len(prompts) * 1e3 / wall_ms)
    fwd = f", forward graph {forward_ms:.2f} ms" if forward_ms is not None else ""
    print(f"[decode] (c) batch {len(prompts)}: {wall_ms:.2f} ms/step wall, GPU busy {gpu_ms:.2f} ms ({source}){fwd}, "
          f"host {out['decode_step_host_ms']:.2f} ms ({out['decode_step_host_frac']:.0%})", flush=True)
    return out, source


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama3-8b", help="random:<preset>, HF folder or .gguf")
    ap.add_argument("--backend", choices=("triton", "torch"), default=None, help="default triton (smoke: torch)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--num-prompts", type=int, default=None, help="offline workload size (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    # vLLM V1's defaults for its offline LLM class on GPUs of 70 GiB and more
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--no-prefix-caching", action="store_true", help="turn the engine's prefix cache off")
    ap.add_argument("--offline-repeats", type=int, default=3,
                    help="(b) runs, each on fresh token ids of the same lengths; the lower-median run is reported")
    ap.add_argument("--step-batch", type=int, default=64, help="(c): running decodes in the timed step")
    ap.add_argument("--step-steps", type=int, default=50, help="(c): timed steps (and half as many profiled)")
    ap.add_argument("--hf-baseline", action="store_true", help="(d): also run HF transformers generate")
    ap.add_argument("--hf-num-prompts", type=int, default=256, help="(d): first N prompts of the workload")
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--hf-max-seconds", type=float, default=120.0,
                    help="(d): stop after the batch that crosses this much generate time")
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes, torch backend (CPU check)")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    work = SMOKE_WORKLOAD if args.smoke else Workload()
    work = replace(work, seed=args.seed, num_prompts=args.num_prompts or work.num_prompts)
    backend = args.backend or ("torch" if args.smoke else "triton")
    b1_prompt, b1_new, step_prompt = (16, 12, 16) if args.smoke else (128, 256, 256)
    step_batch, steps = (4, 4) if args.smoke else (args.step_batch, args.step_steps)
    engine_kwargs = dict(backend=backend, dtype="bfloat16", device=str(device), max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                         enable_prefix_caching=not args.no_prefix_caching, seed=args.seed)
    if args.smoke:
        register_smoke_preset()
        args.model = f"random:{SMOKE_PRESET}"
        engine_kwargs.update(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=128, num_kv_blocks=256)
        args.hf_num_prompts, args.hf_batch_size = min(args.hf_num_prompts, 6), min(args.hf_batch_size, 4)
    t_start = time.perf_counter()

    def clock() -> str:
        return f"[{time.perf_counter() - t_start:6.1f}s]"

    # Measured before the model takes the memory; only the copy ceiling is needed here.
    ceilings = measure_ceilings(device, copy_gib=1 / 16 if args.smoke else 2.0, gemm=False)
    print(f"{clock()} [decode] {device_name(device)}: copy {ceilings['copy_tb_s']:.3f} TB/s", flush=True)
    llm = LLM(args.model, **engine_kwargs)
    cfg = llm.engine.model_config
    print(f"{clock()} [decode] loaded {args.model} ({backend}): {llm.engine.runner.num_blocks} KV blocks", flush=True)
    prompts, outputs = make_workload(work, cfg.vocab_size)
    rng = np.random.default_rng(args.seed + 1)
    warm_up(llm, work, rng)

    name = f"decode_{model_tag(args.model)}_{device_tag(device)}"
    metrics: dict[str, float] = {"copy_tb_s": ceilings["copy_tb_s"]}
    workload = {
        "model": args.model, "model_config": {k: v for k, v in asdict(cfg).items() if k != "name"},
        "engine": {k: v for k, v in engine_kwargs.items()},
        "decode_b1": f"one {b1_prompt}-token prompt, {b1_new} new tokens, greedy, ignore_eos; tok/s after the first "
                     "token; roofline = copy_tb_s / (weight bytes except the input embedding + K/V at mean context)",
        "offline": {**asdict(work), "sampling": "greedy, ignore_eos, random token ids, all submitted at once"},
        "decode_step": f"{step_batch} running requests ({step_prompt}-token prompts), {steps} timed steps, "
                       f"{max(1, steps // 2)} profiled; host = wall - GPU busy",
        "software": software_versions(), "smoke": args.smoke,
    }
    results_dir = results_dir_for(args)

    def save() -> None:
        path = write_result(name, workload, rounded(metrics), device=device_name(device), results_dir=results_dir)
        print(f"{clock()} [decode] wrote {path}", flush=True)

    metrics.update(decode_b1(llm, rng.integers(10, cfg.vocab_size, size=b1_prompt).tolist(), b1_new,
                             ceilings["copy_tb_s"]))
    save()
    metrics.update(offline_repeated(llm, prompts, outputs, args.offline_repeats, rng))
    save()
    step_prompts = [rng.integers(10, cfg.vocab_size, size=step_prompt).tolist() for _ in range(step_batch)]
    step_metrics, gpu_source = decode_step_breakdown(llm, step_prompts, steps, max(1, steps // 2))
    metrics.update(step_metrics)
    workload["decode_step_gpu_time_source"] = gpu_source
    save()

    if args.hf_baseline:
        # Same lengths, new token ids: the engine's prefix cache still holds the (b) prompts.
        prompts = fresh_ids(prompts[:args.hf_num_prompts], cfg.vocab_size, rng)
        outputs = outputs[: len(prompts)]
        metrics.update(offline(llm, prompts, outputs, prefix="offline_hf_subset"))
        del llm  # the HF model needs the memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            print(f"{clock()} [decode] engine freed: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB "
                  "still allocated", flush=True)
        hf_metrics, workload["hf_baseline"] = compare_with_hf(metrics, prompts, outputs, cfg, device, args)
        metrics.update(hf_metrics)
        save()


def compare_with_hf(metrics: dict[str, float], prompts: list[list[int]], outputs: list[int], cfg: ModelConfig,
                    device: torch.device, args: argparse.Namespace) -> tuple[dict[str, float], str]:
    """(d): HF generate on the prompts the engine just ran (offline_hf_subset_*); metrics and their description."""
    import transformers
    from hf_baseline import hf_offline_throughput

    hf = hf_offline_throughput(prompts, outputs, args.hf_batch_size, model_config=cfg, device=device,
                               max_seconds=args.hf_max_seconds)
    hf["offline_vs_hf_x"] = metrics["offline_hf_subset_out_tok_s"] / hf["hf_offline_out_tok_s"]
    print(f"[decode] engine {metrics['offline_hf_subset_out_tok_s']:.0f} vs HF {hf['hf_offline_out_tok_s']:.0f} "
          f"out tok/s on the same prompts: {hf['offline_vs_hf_x']:.1f}x", flush=True)
    about = (
        f"transformers {transformers.__version__} generate on {len(prompts)} prompts with the lengths of the first "
        f"{len(prompts)} of the offline workload (fresh token ids, so the engine's offline_hf_subset_* run of "
        f"the same prompts has no prefix-cache hits), sorted by input length into static batches of "
        f"{args.hf_batch_size} (left-padded, greedy, min_new_tokens = max_new_tokens = the batch's longest "
        f"output); hf_offline_out_tok_s counts each request's own output tokens, hf_offline_generated_tok_s "
        f"every generated token; {int(hf['hf_requests'])} of {len(prompts)} prompts ran (time budget "
        f"{args.hf_max_seconds:g}s); offline_vs_hf_x = offline_hf_subset_out_tok_s / hf_offline_out_tok_s")
    return hf, about

if __name__ == "__main__":
    main()

"""Expert parallelism on 2 GPUs: a Mixtral-8x7B-shaped random-weight model with
tensor_parallel_size=2 and enable_expert_parallel (attention split by heads, each rank holding
4 of the 8 experts of every layer).

Shape: 32 layers, hidden 4096, 8 experts top-2, expert FFN 14336, 32 q / 8 KV heads (head
dim 128), vocab 32000, random bf16 weights (about 47 GB per GPU). ``--layers L`` builds L
layers instead of 32 to save load time (every layer is the same work and the same two
all-reduces, so the all-reduce share carries over; the throughput does not).

(a) moe_ep2_offline_out_tok_s: bench/decode_gpu.py's offline workload (1000 prompts,
    lognormal lengths, greedy, ignore_eos, all submitted at once; ``--num-prompts`` to shrink).
(b) moe_ep2_allreduce_time_frac: the share of step time spent in the all-reduce after the MoE
    block. A torch profiler trace of ``--profile-steps`` engine steps at a steady batch
    (``--profile-batch`` requests of the workload, after ``--warm-steps`` steps), on rank 0:
    every forward pass issues 1 + 2 L all-reduces of [T, hidden] in stream order (the
    vocab-parallel embedding, then per layer the attention o_proj's and the MoE block's), so
    the MoE block's are every second one after the first. Their summed kernel time over the
    window's wall time (device synchronised at both ends) is the fraction; an all-reduce's
    kernel time includes waiting for the slower rank, so expert load imbalance shows here.
    moe_ep2_allreduce_all_time_frac is every all-reduce's share (attention's too).

Usage (2 GPUs, nvidia-h200-x2):
    python bench/moe_ep_gpu.py [--layers 32] [--num-prompts 1000]
Writes bench/results/moe_ep_h200x2.json (``--name`` to change) after each part.
--smoke: CPU, gloo, a tiny Mixtral, small sizes (checks the script end to end; its JSON goes
to a scratch folder, never bench/results/).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_gpu import SMOKE_WORKLOAD, Workload, make_workload, offline  # noqa: E402
from gpu_ceilings import device_name, pick_device, results_dir_for, rounded, software_versions  # noqa: E402
from llmesh.bench_results import write_result  # noqa: E402
from llmesh.engine import LLM, SamplingParams  # noqa: E402
from llmesh.engine.loader.random_weights import PRESETS  # noqa: E402
from llmesh.engine.model.config import ModelConfig  # noqa: E402

MIXTRAL_8X7B = ModelConfig(
    architecture="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_theta=1e6, bos_token_id=1, eos_token_ids=[2], torch_dtype="bfloat16", num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=14336, norm_topk_prob=True)
SMOKE_MODEL = replace(MIXTRAL_8X7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      moe_intermediate_size=32)


def _allreduce_events(prof, device: torch.device) -> list[tuple[float, float]]:
    """(start, duration) in µs of every all-reduce the profiled window ran, in start order:
    NCCL kernels on a GPU (graph replays included), gloo's c10d ops on the CPU."""
    spans = []
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type == torch.autograd.DeviceType.CUDA and "allreduce" in e.name.lower().replace("_", ""):
                spans.append((e.time_range.start, e.time_range.end - e.time_range.start))
        elif e.name.startswith("c10d::allreduce"):
            spans.append((e.time_range.start, e.time_range.end - e.time_range.start))
    return sorted(spans)


def allreduce_share(llm: LLM, prompts: list[list[int]], outputs: list[int], warm_steps: int, steps: int,
                    layers: int, sparse_layers: list[int]) -> dict[str, float]:
    """(b): profile ``steps`` engine steps of these requests on rank 0 (see the module doc)."""
    from torch.profiler import ProfilerActivity, profile

    eng, device = llm.engine, llm.engine.device
    for p, n in zip(prompts, outputs):
        eng.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    for _ in range(warm_steps):
        eng.step()
    # On a GPU only the device's activity: recording every host op would slow the steps measured.
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        done = 0
        while done < steps and eng.has_unfinished_requests():
            eng.step()
            done += 1
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    while eng.has_unfinished_requests():  # drain, so the next part starts empty
        eng.step()
    spans = _allreduce_events(prof, device)
    per_forward = 1 + 2 * layers
    if not spans or len(spans) % per_forward:
        raise RuntimeError(f"moe_ep: the trace holds {len(spans)} all-reduces over {done} steps, not a multiple "
                           f"of {per_forward} per forward pass (the embedding's, then two per layer): the "
                           "attribution by stream order does not hold")
    # Stream order of one forward: the embedding's, then per layer o_proj's and the MoE block's
    # (a dense layer's down_proj's in a layer that is not sparse).
    moe_positions = {2 + 2 * i for i in sparse_layers}
    moe_us = sum(d for j, (_, d) in enumerate(spans) if j % per_forward in moe_positions)
    all_us = sum(d for _, d in spans)
    forwards = len(spans) // per_forward
    out = {"moe_ep2_allreduce_time_frac": moe_us / wall_us, "moe_ep2_allreduce_all_time_frac": all_us / wall_us,
           "moe_ep2_allreduce_moe_us_per_forward": moe_us / forwards, "moe_ep2_profiled_steps": done,
           "moe_ep2_profiled_forwards": forwards, "moe_ep2_profiled_step_ms": wall_us / 1e3 / max(done, 1)}
    print(f"[moe_ep] (b) {done} steps ({forwards} forwards) in {wall_us / 1e3:.1f} ms: MoE all-reduce "
          f"{out['moe_ep2_allreduce_time_frac']:.3f} of step time, all all-reduces "
          f"{out['moe_ep2_allreduce_all_time_frac']:.3f}", flush=True)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the Mixtral shape (32: the real one)")
    ap.add_argument("--num-prompts", type=int, default=None, help="offline workload size (default 1000)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--backend", choices=("triton", "torch"), default=None, help="default triton (smoke: torch)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--profile-batch", type=int, default=256, help="(b): requests in the profiled window")
    ap.add_argument("--warm-steps", type=int, default=20, help="(b): steps before the profiled window")
    ap.add_argument("--profile-steps", type=int, default=30, help="(b): steps profiled")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU (gloo), tiny Mixtral, small sizes")
    ap.add_argument("--name", default="moe_ep_h200x2", help="results file name (without .json)")
    ap.add_argument("--results-dir", default=None)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("moe_ep_gpu.py needs CUDA GPUs; use --smoke for the CPU check")
    t_start = time.perf_counter()
    cfg = replace(SMOKE_MODEL if args.smoke else MIXTRAL_8X7B, num_hidden_layers=2 if args.smoke else args.layers)
    preset = f"moe-ep-bench-{'smoke' if args.smoke else f'mixtral-8x7b-{args.layers}l'}"
    PRESETS[preset] = cfg  # rank 0's config travels to the workers; they do not look it up
    work = SMOKE_WORKLOAD if args.smoke else Workload()
    work = replace(work, num_prompts=args.num_prompts or work.num_prompts)
    backend = args.backend or ("torch" if args.smoke else "triton")
    engine_kwargs = dict(backend=backend, dtype="float32" if args.smoke else "bfloat16", device=str(device),
                         tensor_parallel_size=args.tp, enable_expert_parallel=True,
                         max_num_seqs=8 if args.smoke else args.max_num_seqs,
                         max_num_batched_tokens=256 if args.smoke else args.max_num_batched_tokens,
                         max_model_len=128 if args.smoke else args.max_model_len)
    if args.smoke:
        engine_kwargs["num_kv_blocks"] = 256
    profile_batch, warm_steps, profile_steps = ((4, 2, 4) if args.smoke
                                                else (args.profile_batch, args.warm_steps, args.profile_steps))
    metrics: dict[str, float] = {}
    workload = {
        "model_config": {k: v for k, v in asdict(cfg).items() if k != "name"}, "layers": cfg.num_hidden_layers,
        "tensor_parallel_size": args.tp, "enable_expert_parallel": True, "backend": backend, "engine": engine_kwargs,
        "offline": {**asdict(work), "sampling": "greedy, ignore_eos, random token ids, all submitted at once"},
        "allreduce": {"requests": profile_batch, "warm_steps": warm_steps, "profiled_steps": profile_steps,
                      "method": "torch profiler on rank 0; the MoE block's all-reduce is every second one after "
                                "the embedding's in stream order; summed kernel time / window wall time"},
        "software": software_versions(), "smoke": args.smoke,
    }
    results_dir = results_dir_for(args)

    def save() -> None:
        path = write_result(args.name, workload, rounded(metrics), device=device_name(device),
                            results_dir=results_dir)
        print(f"[{time.perf_counter() - t_start:6.1f}s] [moe_ep] wrote {path}", flush=True)

    llm = LLM(f"random:{preset}", **engine_kwargs)
    try:
        model = llm.engine.runner.model
        held = [layer.moe.experts.w13.shape[0] for layer in model.layers if layer.moe is not None]
        metrics["moe_ep2_experts_per_rank"] = held[0]
        metrics["moe_ep2_weight_bytes_rank0"] = model.weight_bytes
        print(f"[{time.perf_counter() - t_start:6.1f}s] [moe_ep] loaded {cfg.num_hidden_layers} layers on {args.tp} "
              f"ranks: {held[0]} of {cfg.num_experts} experts per rank, {model.weight_bytes / 1e9:.2f} GB on rank 0, "
              f"{llm.engine.runner.num_blocks} KV blocks", flush=True)
        rng = np.random.default_rng(1)
        llm.generate([rng.integers(10, cfg.vocab_size, size=n).tolist() for n in (8, 64)],
                     SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm every path
        prompts, outputs = make_workload(work, cfg.vocab_size)
        if not args.skip_offline:
            metrics.update(offline(llm, prompts, outputs, prefix="moe_ep2_offline"))
            save()
        n = min(profile_batch, len(prompts))
        metrics.update(allreduce_share(llm, prompts[:n], outputs[:n], warm_steps, profile_steps,
                                       cfg.num_hidden_layers, cfg.sparse_layers))
        save()
    finally:
        llm.engine.core.shutdown()


if __name__ == "__main__":
    main()

"""Where the host time of a decode step goes: cProfile over steady-state decode steps of a
batch (triton backend, random-weight model). Prints the top functions by own time."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from llmesh.engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    llm = LLM(args.model, backend="triton", dtype="bfloat16", device="cuda", max_num_seqs=args.batch,
              max_model_len=2048, enable_prefix_caching=False, max_num_batched_tokens=16384)
    eng = llm.engine
    for i in range(args.batch):
        eng.add_request([1000 + i] * 64, SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True))
    while eng.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in eng.scheduler.running):
        eng.step()
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        eng.step()
    prof.disable()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    print(f"batch {args.batch}: {1000 * wall:.2f} ms/step (profiled), {args.batch / wall:.0f} tok/s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

"""Quick GPU check of the triton backend: load a random-weight model, time batch-1 decode
and a small offline batch against the torch backend (used before the full benchmarks)."""

from __future__ import annotations

import argparse
import time

import torch

from llmesh.engine import LLM, SamplingParams


def decode_b1(llm: LLM, new_tokens: int) -> float:
    eng = llm.engine
    eng.add_request(list(range(1000, 1128)), SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    n, t_first = 0, None
    while eng.has_unfinished_requests():
        for d in eng.step():
            n += len(d.token_ids)
            if t_first is None and n:
                torch.cuda.synchronize()
                t_first = time.perf_counter()
    torch.cuda.synchronize()
    return (n - 1) / (time.perf_counter() - t_first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--backends", default="triton,torch")
    args = ap.parse_args()
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        llm = LLM(args.model, backend=backend, dtype="bfloat16", device="cuda", max_num_seqs=256,
                  max_model_len=4096, enable_prefix_caching=False, max_num_batched_tokens=8192)
        print(f"[{backend}] load {time.perf_counter() - t0:.1f}s blocks={llm.engine.runner.num_blocks}", flush=True)
        print(f"[{backend}] decode b1: {decode_b1(llm, 128):.1f} tok/s", flush=True)
        prompts = [list(range(100 + i, 300 + i)) for i in range(256)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))
        dt = time.perf_counter() - t0
        print(f"[{backend}] offline 256x(200 in,128 out): {sum(len(o.token_ids) for o in outs) / dt:.0f} out tok/s",
              flush=True)
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

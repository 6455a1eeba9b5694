"""Embedding throughput of the demo model beside its prefill throughput on the same tokens.

64 inputs of about 100 tokens (random ids, lengths 90–110), embedded with ``LLM.embed``
(last-token pooling, normalized) → ``embed_tok_s``; the same inputs as generation prompts
with max_tokens=1 → ``prefill_tok_s``. Prefix caching is off for both, so every token is
computed in both runs and the ratio shows the cost of the embedding path itself (pooling,
no sampling) against a plain prefill.

The result is merged into bench/results/cache_<device>.json (another benchmark writes its
own metrics there): existing metrics and workload keys are kept, these are added or
replaced. No assertion on speed.

    python bench/embed_cpu.py                 # CPU, the committed result
    python bench/embed_cpu.py --device cuda   # a GPU (writes cache_<gpu>.json)
    python bench/embed_cpu.py --smoke         # 4 short inputs, nothing written
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from llmesh.bench_results import RESULTS_DIR, device_tag, write_result
from llmesh.engine import LLM, SamplingParams
from llmesh.engine.loader import find_demo_model


def _inputs(n: int, mean_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    spread = max(1, mean_len // 10)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(mean_len - spread, mean_len + spread))]
            for _ in range(n)]


def _best_of(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def merge_result(name: str, workload: dict, metrics: dict[str, float]) -> str:
    """Write ``name``.json with these metrics, keeping what another benchmark put there."""
    path = RESULTS_DIR / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    merged_metrics = {**old.get("metrics", {}), **metrics}
    merged_workload = {**old.get("workload", {}), **workload}
    out = write_result(name, merged_workload, merged_metrics)
    if old.get("command"):
        doc = json.loads(out.read_text())
        if old["command"] not in doc["command"]:
            doc["command"] = f"{old['command']} ; {doc['command']}"
            out.write_text(json.dumps(doc, indent=2) + "\n")
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=100, help="mean tokens per input")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--step-tokens", type=int, default=1024, help="max_num_batched_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="4 inputs of 16 tokens, one repeat, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.inputs, args.tokens, args.repeats = 4, 16, 1
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    llm = LLM(find_demo_model(), dtype=dtype, device=args.device, pooling="last", normalize=True,
              enable_prefix_caching=False, max_num_seqs=max(args.inputs, 1), max_num_batched_tokens=args.step_tokens)
    inputs = _inputs(args.inputs, args.tokens, llm.engine.model_config.vocab_size)
    tokens = sum(map(len, inputs))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.embed(inputs[:2])  # warm-up
    llm.generate(inputs[:2], params)
    embed_s = _best_of(args.repeats, lambda: llm.embed(inputs))
    prefill_s = _best_of(args.repeats, lambda: llm.generate(inputs, params))
    metrics = {"embed_tok_s": tokens / embed_s, "embed_prefill_tok_s": tokens / prefill_s,
               "embed_vs_prefill_x": prefill_s / embed_s}
    for k, v in metrics.items():
        print(f"{k:>22}: {v:,.2f}")
    if args.smoke:
        return
    workload = {"embed_model": "demo (SmolLM2-135M)", "embed_inputs": args.inputs,
                "embed_tokens_total": tokens, "embed_mean_tokens": args.tokens, "embed_pooling": "last",
                "embed_normalize": True, "embed_dtype": dtype, "embed_prefix_caching": False,
                "embed_max_num_batched_tokens": args.step_tokens, "embed_repeats_best_of": args.repeats,
                "embed_torch_threads": torch.get_num_threads()}
    print("wrote", merge_result(f"cache_{device_tag(args.device)}", workload, metrics))


if __name__ == "__main__":
    main()

"""Speculative decoding on a GPU with random-weight models of real shapes.

(a) ``spec_gpu_b1_speedup_x``: one stream, an 8B Llama-shaped target, n-gram drafts on an
    input-grounded workload. Random weights do not copy text, so the workload is built to
    be copyable by construction: the prompt holds the model's own greedy continuation of a
    seed text, then the seed text again; the target's continuation then matches the earlier
    one wherever the context still predicts it. Output tokens/s with n-gram vs without
    (same greedy tokens, checked), and the acceptance rate.
(b) draft-model mechanics: 8B target, 1B-shaped draft (random weights: acceptance is
    meaningless), time per step of a verify step (draft proposals included) vs a plain
    decode step, at batch 1.

Usage: python bench/spec_gpu.py [--backend triton]   → bench/results/spec_gpu_<dev>.json
       python bench/spec_gpu.py --smoke              (tiny random model, torch, CPU ok; writes nothing)
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from llmesh.bench_results import device_tag, write_result
from llmesh.engine import LLM, SamplingParams


def _tokens_per_s(llm: LLM, prompt: list[int], new_tokens: int) -> tuple[float, list[int], float]:
    """(tokens/s after the first token, tokens, seconds per step after the first)."""
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
                       request_id=f"b{time.perf_counter_ns()}")
    tokens: list[int] = []
    steps, t_first = 0, None
    while engine.has_unfinished_requests():
        for d in engine.step():
            tokens.extend(d.token_ids)
        if tokens and t_first is None:
            t_first, first_len = time.perf_counter(), len(tokens)
        elif t_first is not None:
            steps += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t_first
    return (len(tokens) - first_len) / dt, tokens, dt / max(steps, 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _exact_in_float32(args: argparse.Namespace, kw: dict, prompt: list[int]) -> bool:
    """Lossless in exact arithmetic: in float32 the n-gram run's greedy tokens equal plain
    decoding's. (In bf16 a verify pass runs its GEMMs at k+1 rows where a decode step runs
    one; the roundings differ, and random-weight logits have near-ties, so greedy tokens may
    part after a while: the match fraction above says how far they agreed.)"""
    f32 = dict(kw, dtype="float32")
    base = LLM(args.model, **f32)
    _, want, _ = _tokens_per_s(base, prompt, args.exact_check_tokens)
    del base
    spec = LLM(args.model, speculative_config={"method": "ngram", "num_speculative_tokens": args.k}, **f32)
    _, got, _ = _tokens_per_s(spec, prompt, args.exact_check_tokens)
    return got == want


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--draft", default="random:llama3.2-1b")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--exact-check-tokens", type=int, default=64,
                    help="tokens of the float32 run whose greedy output must equal plain decoding's (0: skip)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    kw = dict(backend=args.backend)
    if args.smoke:
        args.model = args.draft = "random:tiny-llama3"
        args.new_tokens, args.exact_check_tokens = 24, 8
        kw = dict(backend="torch", device="cpu", dtype="float32")
    rng = random.Random(0)
    seed_text = [rng.randrange(3, 30000 if not args.smoke else 500) for _ in range(64)]
    base = LLM(args.model, **kw)
    _, continuation, _ = _tokens_per_s(base, seed_text, args.new_tokens)
    prompt = seed_text + continuation + seed_text  # the continuation can be copied from the prompt
    base_tps, base_tokens, base_step = _tokens_per_s(base, prompt, args.new_tokens)
    del base
    ngram = LLM(args.model, speculative_config={"method": "ngram", "num_speculative_tokens": args.k}, **kw)
    spec_tps, spec_tokens, _ = _tokens_per_s(ngram, prompt, args.new_tokens)
    stats = ngram.engine.core.spec_stats
    metrics = {"spec_gpu_b1_speedup_x": spec_tps / base_tps, "spec_gpu_b1_acceptance_frac": stats.acceptance_rate,
               "spec_gpu_b1_greedy_match_frac": _common_prefix(spec_tokens, base_tokens) / len(base_tokens),
               "spec_gpu_b1_mean_accepted_length": stats.mean_accepted_length,
               "baseline_b1_tokens_per_s": base_tps, "ngram_b1_tokens_per_s": spec_tps,
               "plain_decode_step_ms": base_step * 1e3}
    del ngram
    if args.exact_check_tokens:
        exact = _exact_in_float32(args, kw, prompt)
        metrics["spec_gpu_f32_greedy_equal"] = float(exact)
        if not exact:  # lossless in exact arithmetic is the claim: a failure voids the run
            raise SystemExit("float32: n-gram speculation changed the greedy tokens; nothing written")
    draft = LLM(args.model, speculative_config={"method": "draft", "model": args.draft,
                                                "num_speculative_tokens": args.k}, **kw)
    _, _, draft_step = _tokens_per_s(draft, seed_text, args.new_tokens)
    dstats = draft.engine.core.spec_stats
    metrics.update({"draft_verify_step_ms": draft_step * 1e3, "draft_verify_vs_decode_step_x": draft_step / base_step,
                    "draft_acceptance_frac_random_weights": dstats.acceptance_rate})
    for k, v in metrics.items():
        print(f"{k:>40}: {v:10.3f}")
    workload = {"target": args.model, "draft": args.draft, "backend": kw["backend"], "k": args.k,
                "new_tokens": args.new_tokens, "batch": 1, "greedy": True,
                "ngram_prompt": "64 seed tokens + the model's greedy continuation + the seed tokens again",
                "exact_check": f"float32, {args.exact_check_tokens} tokens, n-gram vs plain greedy"}
    if not args.smoke:  # a smoke run checks the script; its figures mean nothing
        print("wrote", write_result(f"spec_gpu_{device_tag(torch.device('cuda'))}", workload, metrics))


if __name__ == "__main__":
    main()

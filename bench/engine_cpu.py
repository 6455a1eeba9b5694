"""Engine benchmark on the CPU with the demo model.

0. Single stream: one request (128-token prompt, 128 new tokens, greedy, in-process) on
   float32 weights (``cpu_demo_seq_tok_s``), on the GGUF blocks kept packed
   (``cpu_demo_seq_gguf_tok_s``: float32 activations, each weight expanded once), and in
   bfloat16: dense (``cpu_demo_seq_bf16_tok_s``), the GGUF blocks through PyTorch's packed CPU
   kernels (``cpu_demo_seq_gguf_bf16_tok_s``) and INT8 quantized on load
   (``cpu_demo_seq_int8_bf16_tok_s``); beside the machine's memory bandwidth (one large
   torch copy) and the tok/s that bandwidth allows when every float32 step reads all weights
   once; and the same ceiling measured on the step's own GEMV path (``gemv_pass_ms``: every
   projection and the LM head, one row each, in step order): ``cpu_demo_gemv_bound_tok_s``,
   ``cpu_demo_seq_of_gemv_bound``.
1. Batching: 32 requests (128-token prompts, 128 new tokens, ignore_eos) run one at a
   time, then all 32 at once: output tok/s of each and the ratio.
2. Prefix caching: TTFT of requests sharing a 512-token prefix, caching on vs off.

Prints the numbers and writes bench/results/engine_cpu.json (its workload names the host's
instruction-set flags and the GEMM path each single-stream engine measured and took). No
assertion on speed.
Usage: python bench/engine_cpu.py [--requests 32] [--prompt-len 128] [--new-tokens 128] [--only-single]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from tqdm import tqdm

from llmesh.bench_results import write_result
from llmesh.engine import LLM, SamplingParams
from llmesh.engine.loader import find_demo_model


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def bench_batching(path: str, n: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    llm = LLM(path, dtype="float32", device="cpu", max_num_seqs=max(n, 1), max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    prompts = _prompts(n, prompt_len, llm.engine.model_config.vocab_size, seed=0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up

    t0 = time.perf_counter()
    seq_tokens = 0
    for p in tqdm(prompts, desc="sequential", file=sys.stderr):
        seq_tokens += len(llm.generate([p], params)[0].token_ids)
    seq_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    batch_s = time.perf_counter() - t0
    batch_tokens = sum(len(o.token_ids) for o in outs)
    seq_rate, batch_rate = seq_tokens / seq_s, batch_tokens / batch_s
    return {"sequential_out_tok_s": seq_rate, "batched_out_tok_s": batch_rate,
            "batching_speedup_x": batch_rate / seq_rate}


def copy_bandwidth_gb_s(mib: int = 512, repeats: int = 5) -> float:
    """Bytes read + written per second by the best of a few copies of a buffer far larger than
    the caches: the ceiling for a weight-streaming decode step."""
    src = torch.ones(mib << 18)  # float32: mib MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


GEMM_PLANS: dict[str, dict] = {}
"""The GEMM path each single-stream variant's engine measured and took (quant/cpu_matmul.calibrate)."""


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide which CPU kernels are fast (the hosts differ)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]


GEMV_PASS_MS: dict[str, float] = {}
"""ms of one pass through a step's GEMVs alone, by configuration (``gemv_pass_ms``)."""


@torch.inference_mode()
def gemv_pass_ms(llm: LLM, passes: int = 9) -> float:
    """Median milliseconds of one pass through a decode step's GEMVs alone: every projection of
    every layer and the LM head, one row each, in step order, through the model's own op table
    (so the weights stream from memory as in a step, on the path the step takes). Its inverse
    is the tok/s a step made only of its GEMVs would reach: a ceiling measured on this host's
    GEMV path, not inferred from a copy."""
    model = llm.engine.runner.model
    weights = [(lin.weight, lin.bias) for _, lin in model.named_linears()]
    weights.append((model.embed_tokens if model.lm_head is None else model.lm_head.weight, None))

    def k_of(w) -> int:
        w = w[0] if isinstance(w, list) else w  # a fused projection kept as its parts
        return w.shape[1] if isinstance(w, torch.Tensor) else w.in_features

    rows = {k: torch.randn(1, k, dtype=llm.engine.dtype) for k in {k_of(w) for w, _ in weights}}
    calls = [(rows[k_of(w)], w, b) for w, b in weights]

    def one_pass() -> float:
        t0 = time.perf_counter()
        for x, w, b in calls:
            model.ops.linear(x, w, b)
        return (time.perf_counter() - t0) * 1e3

    one_pass()
    return statistics.median(one_pass() for _ in range(passes))


def bench_single_stream(path: str, prompt_len: int, new_tokens: int, quantization: str,
                        repeats: int, dtype: str = "float32") -> tuple[float, int]:
    """(output tok/s of one greedy stream, the weight bytes it reads per step)."""
    llm = LLM(path, dtype=dtype, device="cpu", quantization=quantization, enable_prefix_caching=False)
    GEMM_PLANS[f"{quantization}_{dtype}"] = {k: v["choice"] for k, v in llm.engine.runner.cpu_gemm_plan.items()}
    prompt = _prompts(1, prompt_len, llm.engine.model_config.vocab_size, seed=3)[0]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up: allocator, caches, any compilation
    best = 0.0
    for _ in range(repeats):  # best of a few: on a shared machine the slow runs measure the neighbours
        t0 = time.perf_counter()
        n = len(llm.generate([prompt], params)[0].token_ids)
        best = max(best, n / (time.perf_counter() - t0))
    GEMV_PASS_MS[f"{quantization}_{dtype}"] = gemv_pass_ms(llm)
    return best, llm.engine.runner.weight_bytes


def single_stream_metrics(path: str, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    out: dict[str, float] = {"cpu_copy_gb_s": copy_bandwidth_gb_s()}
    out["cpu_demo_seq_tok_s"], dense_bytes = bench_single_stream(path, prompt_len, new_tokens, "none", repeats)
    out["cpu_demo_seq_gguf_tok_s"], gguf_bytes = bench_single_stream(path, prompt_len, new_tokens, "gguf", repeats)
    out["cpu_demo_seq_bf16_tok_s"], _ = bench_single_stream(path, prompt_len, new_tokens, "none", repeats,
                                                             "bfloat16")
    out["cpu_demo_seq_gguf_bf16_tok_s"], _ = bench_single_stream(path, prompt_len, new_tokens, "gguf", repeats,
                                                                  "bfloat16")
    out["cpu_demo_seq_int8_bf16_tok_s"], int8_bytes = bench_single_stream(path, prompt_len, new_tokens, "int8",
                                                                          repeats, "bfloat16")
    out["cpu_demo_gguf_weight_mib"], out["cpu_demo_int8_weight_mib"] = gguf_bytes / 2**20, int8_bytes / 2**20
    out["cpu_demo_weight_mib"] = dense_bytes / 2**20
    out["cpu_demo_bandwidth_bound_tok_s"] = out["cpu_copy_gb_s"] * 1e9 / dense_bytes
    out["cpu_demo_seq_of_bound"] = out["cpu_demo_seq_tok_s"] / out["cpu_demo_bandwidth_bound_tok_s"]
    # The same ceiling measured on the GEMV path itself, in the same process as the stream.
    out["cpu_demo_gemv_pass_ms"] = GEMV_PASS_MS["none_float32"]
    out["cpu_demo_gemv_bound_tok_s"] = 1e3 / out["cpu_demo_gemv_pass_ms"]
    out["cpu_demo_seq_of_gemv_bound"] = out["cpu_demo_seq_tok_s"] / out["cpu_demo_gemv_bound_tok_s"]
    out["cpu_demo_gguf_bf16_gemv_pass_ms"] = GEMV_PASS_MS["gguf_bfloat16"]
    return out


def _ttft_ms(llm: LLM, prompt: list[int]) -> float:
    engine = llm.engine
    t0 = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    ttft = None
    while engine.has_unfinished_requests():
        for d in engine.step():
            if d.token_ids and ttft is None:
                ttft = time.perf_counter() - t0
    return 1000 * ttft


def bench_prefix(path: str, prefix_len: int, questions: int) -> dict[str, float]:
    out = {}
    for caching in (True, False):
        llm = LLM(path, dtype="float32", device="cpu", enable_prefix_caching=caching)
        vocab = llm.engine.model_config.vocab_size
        prefix = _prompts(1, prefix_len, vocab, seed=1)[0]
        suffixes = _prompts(questions + 1, 16, vocab, seed=2)
        _ttft_ms(llm, prefix + suffixes[0])  # warm-up; fills the cache when caching is on
        ttfts = [_ttft_ms(llm, prefix + s) for s in tqdm(suffixes[1:], desc=f"prefix caching={caching}",
                                                          file=sys.stderr)]
        out["prefix_hit_ttft_ms" if caching else "prefix_miss_ttft_ms"] = statistics.median(ttfts)
    out["prefix_ttft_speedup_x"] = out["prefix_miss_ttft_ms"] / out["prefix_hit_ttft_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--name", default="engine_cpu")
    ap.add_argument("--repeats", type=int, default=3, help="single-stream runs; the best is kept")
    ap.add_argument("--only-single", action="store_true", help="only the single-stream figures")
    args = ap.parse_args()
    path = find_demo_model()
    metrics = single_stream_metrics(path, args.prompt_len, args.new_tokens, args.repeats)
    if not args.only_single:
        metrics.update(bench_prefix(path, args.prefix_len, args.questions))
        metrics.update(bench_batching(path, args.requests, args.prompt_len, args.new_tokens))
    for k, v in metrics.items():
        print(f"{k:>30}: {v:10.2f}")
    workload = {"model": "SmolLM2-135M-Instruct Q4_1 (dequantized, float32)", "requests": args.requests,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "ignore_eos": True,
                "prefix_len": args.prefix_len, "prefix_questions": args.questions, "backend": "torch",
                "torch_threads": torch.get_num_threads(), "single_stream_repeats": args.repeats,
                "only_single": args.only_single, "cpu_flags": cpu_flags(), "torch": torch.__version__,
                "gemm_plans": GEMM_PLANS}
    print("wrote", write_result(args.name, workload, metrics))


if __name__ == "__main__":
    main()

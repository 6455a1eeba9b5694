"""Speculative decoding on the CPU: the demo model (SmolLM2-135M-Instruct), one stream.

- ``spec_ngram_speedup_x``: output tokens/s with n-gram drafts vs without, on an
  input-grounded workload (the prompt holds a passage the answer copies: "rewrite this
  text fixing its typos"); greedy, so both runs emit the same tokens.
- ``spec_ngram_acceptance_frac``: accepted / proposed drafts on that workload.
- ``spec_zero_accept_cost_frac``: the slowdown vs no speculation when every draft is wrong.
  A proposer that always drafts k tokens that never match (an id the model never emits)
  pays the full verify width at every step it drafts; the engine's per-request back-off
  (a request whose drafts all missed skips proposals for 1, 3, 7, ... up to 32 steps) is
  what keeps this small, so the figure measures verify width × how often the back-off still
  probes, on the same grounded prompt.
- ``spec_ngram_open_ended_cost_frac``: the slowdown of n-gram speculation on an open-ended
  prompt (nothing to copy: drafts are rare and mostly rejected).

The variants run interleaved, one run each per repeat (``--repeats``); a ratio is the median
over repeats of the ratio within a repeat, a rate the best run's. Writes bench/results/spec_cpu.json (``--name``).
``--dtype bfloat16 --quantization gguf``: the demo served in its own packed format through
PyTorch's packed CPU kernels (the fastest demo configuration; see bench/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmesh.bench_results import write_result
from llmesh.engine import LLM, SamplingParams
from llmesh.engine.loader import find_demo_model
from llmesh.engine.spec_decode.ngram import NgramProposer
from llmesh.engine.spec_decode.proposer import Proposal, Proposer

PASSAGE = (
    "The city library opened its new reading room on Monday mornign. The room has tall windows, "
    "long oak tables and quiet lamps, and it stays open until nine in the evening. Visitors can "
    "borrow up to ten books at a time, and the staff will order any title that is not on the "
    "shelves. On weekends there is a story hour for children and a small cafe serves tea and "
    "sandwhiches near the entrance. The library asks everyone to keep phones silent and to "
    "return books on time so that others can enjoy them too."
)
GROUNDED = ("Rewrite the following text exactly as it is, only fixing the two spelling mistakes. "
            f"Output only the corrected text.\n\n{PASSAGE}")
OPEN_ENDED = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class AlwaysWrongProposer(Proposer):
    """Drafts ``k`` copies of a token the model never emits: every draft is rejected."""

    method = "always-wrong"

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def propose(self, requests, max_tokens, hidden_states=None):
        return [Proposal([self.token_id] * k) for k in max_tokens]


def _run(llm: LLM, prompt: str, new_tokens: int, speculative: bool = True) -> tuple[float, list[int], float]:
    """(output tokens/s end to end, the tokens, output tokens/s after the first token)."""
    engine = llm.engine
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    engine.add_request(ids, SamplingParams(max_tokens=new_tokens, temperature=0.0, speculative=speculative),
                       request_id="bench")
    tokens: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.extend(out.token_ids)
            if t_first is None and out.token_ids:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    decode_rate = (len(tokens) - 1) / (t_end - t_first) if len(tokens) > 1 else 0.0
    return len(tokens) / (t_end - t0), tokens, decode_rate


def _interleaved(variants: dict, prompt: str, new_tokens: int, repeats: int) -> dict[str, list]:
    """name → its runs, (tokens/s, tokens, decode tokens/s) each. Each repeat runs every
    variant once, in turn: this host's speed drifts by 10-30 % over minutes, so variants run
    back to back would each see a different machine, while one repeat's runs see about the same."""
    runs: dict[str, list] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            runs[name].append(run(prompt, new_tokens))
    return runs


def _paired(runs: dict[str, list], a: str, b: str, field: int = 0) -> float:
    """The median over repeats of a's rate / b's rate within the same repeat."""
    return statistics.median(ra[field] / rb[field] for ra, rb in zip(runs[a], runs[b]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default="spec_cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--quantization", default="none",
                    help="none: the GGUF dequantized; gguf: its blocks kept packed (PyTorch's CPU kernels in bfloat16)")
    args = ap.parse_args()
    path = find_demo_model()
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    model_kw = dict(device="cpu", dtype=args.dtype, quantization=args.quantization)
    # One engine for every variant (the baseline turns speculation off per request), so each
    # reads the same weights and KV pool: the comparison is of speculation alone.
    fast = LLM(path, speculative_config=spec, **model_kw)

    core = fast.engine.core
    ngram = core.proposer
    wrong = AlwaysWrongProposer(fast.engine.model_config.vocab_size - 1)
    spec_stats: dict[str, object] = {}

    def with_proposer(proposer, name: str):
        def run(prompt: str, new_tokens: int):
            core.proposer = proposer
            core.spec_stats.__init__()
            out = _run(fast, prompt, new_tokens)
            spec_stats.setdefault(name, core.spec_stats)  # one run's counts (every run's are the same)
            core.spec_stats = type(core.spec_stats)()
            return out
        return run

    def plain(prompt: str, new_tokens: int):
        return _run(fast, prompt, new_tokens, speculative=False)

    for prompt in (GROUNDED, OPEN_ENDED):  # warm-up: every measured run then hits the prefix cache alike
        plain(prompt, 8)

    grounded = _interleaved({"base": plain, "spec": with_proposer(ngram, "spec"),
                             "wrong": with_proposer(wrong, "wrong")}, GROUNDED, args.new_tokens, args.repeats)
    base_tokens = grounded["base"][0][1]
    if any(r[1] != base_tokens for r in grounded["spec"]):
        raise SystemExit("speculation changed the greedy output: the benchmark is void")
    if any(r[1] != base_tokens for r in grounded["wrong"]) or spec_stats["wrong"].accepted:
        raise SystemExit("the always-wrong proposer had a draft accepted or changed the output")
    stats = spec_stats["spec"]
    metrics = {
        "spec_ngram_speedup_x": _paired(grounded, "spec", "base"),
        # The same runs after the first token (the prompt's prefill is the same work with or
        # without speculation, and dilutes the end-to-end ratio of a short answer).
        "spec_ngram_decode_speedup_x": _paired(grounded, "spec", "base", field=2),
        "spec_ngram_acceptance_frac": stats.acceptance_rate,
        "spec_ngram_mean_accepted_length": stats.mean_accepted_length,
        "baseline_tokens_per_s": max(r[0] for r in grounded["base"]),
        "spec_ngram_tokens_per_s": max(r[0] for r in grounded["spec"]),
        # Not clamped: a negative value is run-to-run noise larger than the cost, and says so.
        "spec_zero_accept_cost_frac": 1.0 - _paired(grounded, "wrong", "base"),
        "spec_zero_accept_verify_steps": spec_stats["wrong"].verify_steps,
    }
    open_ended = _interleaved({"base": plain, "spec": with_proposer(ngram, "open")}, OPEN_ENDED,
                              args.new_tokens, args.repeats)
    metrics["spec_ngram_open_ended_cost_frac"] = 1.0 - _paired(open_ended, "spec", "base")

    for k, v in metrics.items():
        print(f"{k:>36}: {v:10.3f}")
    weights = "dequantized" if args.quantization == "none" else f"quantization={args.quantization}"
    workload = {"model": f"SmolLM2-135M-Instruct Q4_1 ({weights}, {args.dtype})", "backend": "torch",
                "streams": 1, "new_tokens": args.new_tokens, "greedy": True, "speculative_config": spec,
                "grounded_prompt": "chat: rewrite a 100-word passage fixing two typos",
                "open_ended_prompt": OPEN_ENDED, "zero_accept": "always-wrong drafts (k per step, back-off on)",
                "torch_threads": torch.get_num_threads(), "repeats": args.repeats}
    print("wrote", write_result(args.name, workload, metrics))


if __name__ == "__main__":
    main()

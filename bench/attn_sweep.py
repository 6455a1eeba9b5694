"""Tile-config sweep of the attention kernels, for the tables in llmesh/kernels/attention_config.py.

One GPU call (about 3 minutes on an H200) times a grid of configs at Llama-3-8B attention
shapes (32 query / 8 KV heads, head_dim 128, bf16, KV block size 16), checks every config's
output once against the torch reference, prints a table and the table rows to paste, and
writes attn_sweep_<dev>.json (attn_sweep_<dev>_<parts>.json for other --parts):

- prefill: the causal tile kernel (prefill_attention / unified's long-query path) over
  BLOCK_M x BLOCK_N x num_warps x num_stages, prompts of 1k-8k tokens (16k tokens a call,
  no cached prefix), TFLOP/s and fraction of the bf16 GEMM ceiling measured in the same run;
  a config's score is its mean fraction over the contexts.
- mixed (with --parts mixed): the long-query launch's tile inside unified_attention at mixed-step
  shapes (attention_config.UNIFIED_LONG; see Sweep.mixed).
- decode: unified_attention's short-query split-KV kernel over BLOCK_N x num_warps x
  num_stages (segments by the default rule), then split sizes (segments per sequence) for
  the best tiles; shapes: 256 decodes at context 512-2048 plus one 256-token prefill chunk
  (the decode-heavy mix), and 16 / 64 decodes at context 8192 (where the split matters).
  Score: mean GB/s fraction of the copy ceiling.

A --budget-s deadline (default 170 s) stops starting new configs; what ran is reported.
Usage: python bench/attn_sweep.py [--smoke] [--out-dir DIR] [--budget-s 170]
(the JSON goes to --out-dir, else $OUT when set, else bench/results; --smoke: tiny shapes
through the Triton interpreter on the CPU, numbers meaningless, results to a scratch folder).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from gpu_ceilings import device_name, device_tag, measure_ceilings, pick_device, results_dir_for, software_versions
from gpu_ceilings import time_ms
from llmesh.bench_results import write_result

H_Q, H_KV, D, BLOCK_SIZE = 32, 8, 128, 16


class Sweep:
    def __init__(self, device: torch.device, smoke: bool, budget_s: float) -> None:
        self.device, self.smoke, self.budget_s = device, smoke, budget_s
        self.deadline = time.perf_counter() + budget_s
        self.gen = torch.Generator(device).manual_seed(0)
        self.rows: list[dict] = []
        self.h_q, self.h_kv, self.d = (4, 2, 32) if smoke else (H_Q, H_KV, D)
        self.scale = self.d ** -0.5

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.bfloat16)

    def time(self, fn) -> float:
        return time_ms(fn, self.device, cpu_reps=1)

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def pool(self, lens: list[int]):
        """Pool holding contexts of `lens` tokens with scattered block tables: (k, v, tables)."""
        nb = -(-max(lens) // BLOCK_SIZE)
        num_blocks = len(lens) * nb + 1
        k = self.randn(num_blocks, BLOCK_SIZE, self.h_kv, self.d)
        v = self.randn(num_blocks, BLOCK_SIZE, self.h_kv, self.d)
        perm = torch.randperm(num_blocks, generator=self.gen, device=self.device)[: len(lens) * nb]
        return k, v, perm.view(len(lens), nb).to(torch.int32)

    def record(self, kind: str, config: dict, shape: str, ms: float, rate: float, unit: str, frac: float,
               err: float | None) -> None:
        row = dict(kind=kind, config=config, shape=shape, ms=ms, rate=rate, unit=unit, frac=frac, max_err=err,
                   ok=err is None or err < 2e-2)
        self.rows.append(row)
        err_s = "" if err is None else f" err {err:.1e}{'' if row['ok'] else ' WRONG'}"
        print(f"[sweep] {kind:<8}{shape:<18}{json.dumps(config):<80}{ms:9.4f} ms {rate:9.1f} {unit} "
              f"{frac:.3f}{err_s}", flush=True)

    def batch(self, ctx: list[int], chunks: list[int]):
        """A mixed batch over a fresh pool: decodes whose contexts are `ctx` (one new token each),
        then fresh prompt chunks of `chunks` tokens: (q, k, v, tables, seq_lens, qsl, tokens)."""
        lens = ctx + chunks
        k, v, tables = self.pool(lens)
        t = len(ctx) + sum(chunks)
        q = self.randn(t, self.h_q, self.d)
        starts = list(range(len(ctx) + 1))
        for c in chunks:
            starts.append(starts[-1] + c)
        qsl = torch.tensor(starts, dtype=torch.int32, device=self.device)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=self.device)
        return q, k, v, tables, seq_lens, qsl, t

    # ---- prefill ------------------------------------------------------------------------------
    def prefill(self, gemm_tflops: float) -> None:
        from llmesh.kernels.attention_config import PrefillConfig
        from llmesh.kernels.prefill_attention import launch_prefill_kernel, prefill_attention_ref

        contexts, tokens = ((32, 64), 64) if self.smoke else ((1024, 2048, 4096, 8192), 16384)
        grid = ([PrefillConfig(32, 16, 1, 1), PrefillConfig(16, 32, 1, 1)] if self.smoke else [
            PrefillConfig(bm, bn, w, st) for bm, bn, w, st in itertools.product(
                (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if not (bm == 64 and w == 8)])
        shapes = []
        for ctx in contexts:
            n = max(1, tokens // ctx)
            k, v, tables = self.pool([ctx] * n)
            q = self.randn(n * ctx, self.h_q, self.d)
            qsl = torch.arange(0, n * ctx + 1, ctx, dtype=torch.int32, device=self.device)
            lens = torch.full((n,), ctx, dtype=torch.int32, device=self.device)
            shapes.append((f"{n}x{ctx}", n * 4 * ctx * ctx * self.h_q * self.d / 2, q, k, v, tables, qsl, lens))
        _, _, q0, k0, v0, t0, qsl0, lens0 = shapes[0]
        ref = prefill_attention_ref(q0, k0, v0, t0, qsl0, lens0, self.scale).float()
        for cfg in grid:
            if self.out_of_time():
                print("[sweep] prefill: budget spent, stopping", flush=True)
                return
            try:
                for i, (name, flops, q, k, v, tables, qsl, lens) in enumerate(shapes):
                    out = torch.empty_like(q)
                    fn = lambda: launch_prefill_kernel(q, k, v, out, tables, qsl, lens, self.scale,  # noqa: E731
                                                       config=cfg)
                    err = None
                    if i == 0:
                        fn()
                        err = float((out.float() - ref).abs().max())
                    ms = self.time(fn)
                    tflops = flops / (ms * 1e-3) / 1e12
                    self.record("prefill", asdict(cfg), name, ms, tflops, "TFLOP/s", tflops / gemm_tflops, err)
            except Exception:  # e.g. a tile that does not fit in shared memory
                print(f"[sweep] prefill {cfg}: FAILED\n{traceback.format_exc(limit=-2)}", flush=True)

    # ---- decode -------------------------------------------------------------------------------
    def decode(self, copy_gb_s: float) -> None:
        from llmesh.kernels.attention_config import DecodeConfig
        from llmesh.kernels.unified_attention import unified_attention, unified_attention_ref

        if self.smoke:
            specs = [("mix 4d+24p", [20, 50, 33, 70], 24), ("2d c200", [200, 180], 0)]
        else:
            lens = torch.randint(512, 2049, (256,), generator=torch.Generator().manual_seed(1)).tolist()
            specs = [("mix 256d+256p", lens, 256), ("16d c8192", [8192] * 16, 0), ("64d c8192", [8192] * 64, 0)]
        shapes = []
        for name, ctx, chunk in specs:
            q, k, v, tables, seq_lens, qsl, _ = self.batch(ctx, [chunk] if chunk else [])
            nbytes = 2 * int(seq_lens.sum()) * self.h_kv * self.d * 2 + 2 * q.numel() * 2
            max_seq = tables.shape[1] * BLOCK_SIZE
            ref = unified_attention_ref(q, k, v, tables, seq_lens, qsl, self.scale).float()
            shapes.append((name, nbytes, q, k, v, tables, seq_lens, qsl, max(chunk, 1), max_seq, ref))

        def run(cfg: DecodeConfig, segments: int | None) -> float | None:
            fracs = []
            for name, nbytes, q, k, v, tables, seq_lens, qsl, mql, max_seq, ref in shapes:
                out = torch.empty_like(q)
                fn = lambda: unified_attention(q, k, v, tables, seq_lens, qsl, self.scale,  # noqa: E731
                                               max_query_len=mql, max_seq_len=max_seq, out=out,
                                               decode_cfg=cfg, num_segments=segments)
                fn()
                err = float((out.float() - ref).abs().max())
                ms = self.time(fn)
                gb_s = nbytes / (ms * 1e-3) / 1e9
                self.record("decode", {**asdict(cfg), "segments": segments or "auto"}, name, ms, gb_s, "GB/s",
                            gb_s / copy_gb_s, err)
                fracs.append(gb_s / copy_gb_s)
            return sum(fracs) / len(fracs)

        grid = ([DecodeConfig(16, 1, 1, 32, 4), DecodeConfig(32, 1, 1, 64, 2)] if self.smoke else [
            DecodeConfig(bn, w, st, 256, 4) for bn, w, st in itertools.product((32, 64, 128), (2, 4), (2, 3, 4))])
        best, best_score = None, -1.0
        for cfg in grid:
            if self.out_of_time():
                print("[sweep] decode: budget spent, stopping", flush=True)
                break
            try:
                score = run(cfg, None)
            except Exception:
                print(f"[sweep] decode {cfg}: FAILED\n{traceback.format_exc(limit=-2)}", flush=True)
                continue
            if score > best_score:
                best, best_score = cfg, score
        for segments in ((1, 2) if self.smoke else (1, 2, 4, 8, 16, 32)):
            if best is None or self.out_of_time():
                break
            run(best, segments)

    # ---- mixed -------------------------------------------------------------------------------
    def mixed(self) -> None:
        """The long-query launch's tile in mixed steps (attention_config.UNIFIED_LONG): the whole
        unified_attention call at the offline workload's mixed-step shapes (a few hundred
        decodes beside one or two fresh chunks; max_query_len the step's token count and
        max_seq_len 2048, as the engine's captured graphs pass them), replayed from a CUDA graph,
        with each candidate as prefill_cfg. Score: the default config's time over the
        candidate's (frac). The chunk alone and the decodes alone, with the default, are timed
        beside them (shapes "<name> chunk only" / "decodes only": what the launch costs on top
        of its working programs)."""
        from gpu_ceilings import graph_time_ms

        from llmesh.kernels.attention_config import PrefillConfig, unified_long_config
        from llmesh.kernels.unified_attention import unified_attention, unified_attention_ref

        rng = torch.Generator().manual_seed(2)
        if self.smoke:
            specs = [("3d+24p", [20, 50, 33], [24])]
            max_len = 256
        else:
            specs = [("255d+400p", torch.randint(150, 451, (255,), generator=rng).tolist(), [400]),
                     ("254d+2x200p", torch.randint(150, 451, (254,), generator=rng).tolist(), [200, 200]),
                     ("128d+1024p", torch.randint(200, 601, (128,), generator=rng).tolist(), [1024])]
            max_len = 2048
        default = unified_long_config(self.d, self.device)

        def call(shape, cfg):
            q, k, v, tables, seq_lens, qsl, t = shape
            out = torch.empty_like(q)
            return out, lambda: unified_attention(q, k, v, tables, seq_lens, qsl, self.scale, max_query_len=t,  # noqa: E731
                                                  max_seq_len=max_len, out=out, prefill_cfg=cfg)

        shapes = []
        for name, ctx, chunks in specs:
            shape = self.batch(ctx, chunks)
            q, k, v, tables, seq_lens, qsl, _ = shape
            ref = unified_attention_ref(q, k, v, tables, seq_lens, qsl, self.scale).float()
            base_ms = graph_time_ms(call(shape, default)[1], self.device)
            self.record("mixed", asdict(default), name, base_ms, 1.0, "x default", 1.0, None)
            for part, sub in ((f"{name} chunk only", self.batch([], chunks)),
                              (f"{name} decodes only", self.batch(ctx, []))):
                ms = graph_time_ms(call(sub, default)[1], self.device)
                self.record("mixed_part", asdict(default), part, ms, base_ms / ms, "x whole", base_ms / ms, None)
            shapes.append((name, shape, ref, base_ms))
        grid = ([PrefillConfig(16, 16, 1, 1)] if self.smoke else [
            PrefillConfig(bm, bn, w, st) for bm, bn, w, st in itertools.product(
                (32, 64, 128), (32, 64, 128), (4, 8), (2, 3)) if not (bm <= 64 and w == 8)])
        for cfg in grid:
            if self.out_of_time():
                print("[sweep] mixed: budget spent, stopping", flush=True)
                return
            try:
                for name, shape, ref, base_ms in shapes:
                    out, fn = call(shape, cfg)
                    fn()
                    err = float((out.float() - ref).abs().max())
                    ms = graph_time_ms(fn, self.device)
                    self.record("mixed", asdict(cfg), name, ms, base_ms / ms, "x default", base_ms / ms, err)
            except Exception:  # e.g. a tile that does not fit in shared memory
                print(f"[sweep] mixed {cfg}: FAILED\n{traceback.format_exc(limit=-2)}", flush=True)

    # ---- summary ------------------------------------------------------------------------------
    def winners(self) -> dict:
        """Best config per kind by mean fraction over the shapes it completed (all shapes, correct)."""
        out = {}
        for kind in ("prefill", "decode", "mixed"):
            rows = [r for r in self.rows if r["kind"] == kind]
            n_shapes = len({r["shape"] for r in rows})
            by_cfg: dict[str, list[dict]] = {}
            for r in rows:
                by_cfg.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r)
            scored = [(sum(r["frac"] for r in rs) / len(rs), key) for key, rs in by_cfg.items()
                      if len(rs) == n_shapes and all(r["ok"] for r in rs)]
            if scored:
                score, key = max(scored)
                out[kind] = {"config": json.loads(key), "mean_frac": score,
                             "per_shape": {r["shape"]: r["frac"] for r in by_cfg[key]}}
        return out


def paste_rows(win: dict, d: int) -> list[str]:
    lines = []
    if "prefill" in win:
        c = win["prefill"]["config"]
        lines.append(f"    {d}: PrefillConfig(block_m={c['block_m']}, block_n={c['block_n']}, "
                     f"num_warps={c['num_warps']}, num_stages={c['num_stages']}),")
    if "decode" in win:
        c = win["decode"]["config"]
        seg = c.get("segments")
        note = "" if seg == "auto" else f"  # best fixed split: {seg} segments"
        lines.append(f"    {d}: DecodeConfig(block_n={c['block_n']}, num_warps={c['num_warps']}, "
                     f"num_stages={c['num_stages']}, min_segment={c['min_segment']}, "
                     f"programs_per_sm={c['programs_per_sm']}),{note}")
    if "mixed" in win:
        c = win["mixed"]["config"]
        lines.append(f"    UNIFIED_LONG[<device tag>][{d}] = PrefillConfig(block_m={c['block_m']}, block_n={c['block_n']}, "
                     f"num_warps={c['num_warps']}, num_stages={c['num_stages']})  "
                     f"# {win['mixed']['mean_frac']:.2f}x the default")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes through the interpreter on the CPU")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default $OUT, else bench/results)")
    ap.add_argument("--budget-s", type=float, default=170.0, help="start no config after this many seconds")
    ap.add_argument("--parts", default="prefill,decode",
                    help="comma-separated: prefill, decode, mixed (the long-query tile in mixed steps)")
    args = ap.parse_args()
    device = pick_device(args.device)
    if device.type != "cuda":
        if not args.smoke:
            ap.error("the sweep needs a CUDA device; use --smoke for the CPU interpreter check")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    t0 = time.perf_counter()
    ceilings = measure_ceilings(device, copy_gib=1 / 16 if args.smoke else 2.0, gemm_n=256 if args.smoke else 8192)
    print(f"[sweep] {device_name(device)}: copy {ceilings['copy_tb_s']:.3f} TB/s, "
          f"gemm {ceilings['gemm_bf16_tflops']:.1f} TFLOP/s", flush=True)
    sweep = Sweep(device, args.smoke, args.budget_s)
    parts = args.parts.split(",")
    # the default parts keep the plain name (the PREFILL / DECODE tables' file); another set of
    # parts is a file of its own, so a mixed-only sweep does not replace the tile sweep's record
    suffix = "" if sorted(parts) == ["decode", "prefill"] else "_" + "_".join(parts)
    if "prefill" in parts:
        if "decode" in parts:  # half the budget each, the decode half starting when prefill ends
            sweep.deadline = time.perf_counter() + args.budget_s / 2
        sweep.prefill(ceilings["gemm_bf16_tflops"])
        sweep.deadline = t0 + args.budget_s
    if "decode" in parts:
        sweep.decode(ceilings["copy_tb_s"] * 1e3)
    if "mixed" in parts:
        sweep.deadline = time.perf_counter() + args.budget_s if parts == ["mixed"] else t0 + args.budget_s
        sweep.mixed()
    win = sweep.winners()
    print("\n[sweep] winners (mean fraction of the ceiling over the shapes):")
    for kind, w in win.items():
        print(f"  {kind}: {w['config']}  mean {w['mean_frac']:.3f}  {w['per_shape']}")
    lines = paste_rows(win, sweep.d)
    print("[sweep] rows for llmesh/kernels/attention_config.py (PREFILL / DECODE / UNIFIED_LONG tables):")
    print("\n".join(lines) or "  (none)", flush=True)
    wrong = [r for r in sweep.rows if not r["ok"]]
    metrics = {k: float(v) for k, v in ceilings.items()}
    for kind, w in win.items():
        metrics[f"{kind}_best_mean_frac"] = w["mean_frac"]
    workload = {"heads": [sweep.h_q, sweep.h_kv], "head_dim": sweep.d, "block_size": BLOCK_SIZE, "dtype": "bfloat16",
                "rows": sweep.rows, "winners": win, "paste": lines, "wrong": len(wrong),
                "software": software_versions(), "smoke": args.smoke,
                "elapsed_s": round(time.perf_counter() - t0, 1)}
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif os.environ.get("OUT") and not args.smoke:
        out_dir = Path(os.environ["OUT"])
    else:
        out_dir = results_dir_for(argparse.Namespace(results_dir=None, smoke=args.smoke))
    path = write_result(f"attn_sweep_{device_tag(device)}{suffix}", workload, metrics, device=device_name(device),
                        results_dir=out_dir)
    print(f"[sweep] wrote {path} ({time.perf_counter() - t0:.1f}s); {len(wrong)} wrong rows", flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())

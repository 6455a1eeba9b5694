"""Block-scaled FP8 GEMM (llmesh/kernels/block_fp8_gemm.py, the format of Qwen3-*-FP8 and DeepSeek-V3
checkpoints) on the GPU: its tiles, cuBLAS's block-scaled GEMM, and the formats it competes with.

Per Llama-3-8B linear shape (qkv 4096 -> 6144, o 4096 -> 4096, gate/up 4096 -> 28672, down
14336 -> 4096) and M in --ms, every call a CUDA-graph replay on the same weights:

- ``tile_<tile>``: our GEMM at each candidate tile on activations already quantized per
  (token, 128 channels), every output checked against block_fp8_gemm_ref;
- ``scaled_mm``: cuBLASLt's block-scaled GEMM (block_fp8_scaled_mm_rows: torch.nn.functional.scaled_mm,
  BlockWise1x128 x BlockWise128x128, CUDA 12.9+ on Hopper) and ``fbgemm``: FBGEMM GenAI's CUTLASS
  f8f8bf16_groupwise (fbgemm_kernels.fp8_block_matmul), each as the engine calls it (on the rows
  quantize_fp8_per_group lays out, scales M-major), where this build and device run it (else the
  reason is recorded);
- ``linear``: the engine's linear on the Fp8BlockWeight (quantize_fp8_per_group, then the GEMM the
  tables pick; in the engine the quantization rides in the RMSNorm or SiLU-and-mul before it, so
  this bounds its time from above);
- ``rowwise``: the engine's per-channel FP8 linear on the same weights (services linear, measured table);
- ``bf16``: F.linear on the float weight.

Metrics: block_fp8_<k>x<n>_m<m>_<variant>_us, _linear_vs_bf16_x, _linear_vs_rowwise_x,
_scaled_mm_vs_best_tile_x, _fbgemm_vs_best_tile_x, and at M = 1 _linear_bw_frac (the FP8 weight's bytes over the copy
bandwidth). Per M bucket the tile with the least mean time over the shapes is printed as the
`BLOCK_FP8_TILE` literal for llmesh/kernels/block_fp8_gemm.py, and the fastest of that tile and the
two libraries (mean over the shapes) as the `BLOCK_FP8_LIBRARY` one (both also in the workload).

Usage: python bench/block_fp8_gpu.py [--ms 1,16,64,128,256,512,2048] [--tiles all|table] [--suffix S]
                                    [--smoke] [--results-dir DIR]
--smoke runs tiny shapes through Triton's interpreter on the CPU (results to a scratch folder).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

if "--smoke" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_ceilings import (device_name, device_tag, graph_time_ms, measure_copy_tb_s, pick_device,  # noqa: E402
                          results_dir_for, rounded, software_versions)

from llmesh.bench_results import write_result  # noqa: E402
from llmesh.engine.quant.packed import Fp8BlockWeight  # noqa: E402
from llmesh.kernels.block_fp8_gemm import (BLOCK_FP8_TILE, BlockFp8Config, block_config,  # noqa: E402
                                           block_fp8_gemm_ref, block_fp8_gemm_rows, block_fp8_scaled_mm_rows,
                                           library_shape_ok, quantize_fp8_blocks, quantize_fp8_per_group)

SHAPES_8B = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))
"""(K, N) of Llama-3-8B's linear layers (q/k/v and gate/up fused)."""
TILES = tuple(BlockFp8Config(bm, bn, w, st) for bm, bn, w, st in (
    (16, 64, 4, 4), (16, 128, 4, 4), (16, 64, 4, 6), (32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4),
    (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (128, 256, 8, 3),
    (16, 32, 4, 6), (16, 32, 2, 8), (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 4)))
SMOKE_TILES = (BlockFp8Config(16, 32, 2, 2), BlockFp8Config(32, 64, 4, 2))
BLOCK = (128, 128)


def tile_name(t: BlockFp8Config) -> str:
    return f"m{t.block_m}n{t.block_n}w{t.num_warps}s{t.num_stages}"


def library_calls(rows, weight: Fp8BlockWeight, out_dtype) -> dict:
    """The libraries' block-scaled GEMMs as the engine calls them (block_fp8_matmul's branches),
    those this build and device can run; the others' reasons go to ``why``."""
    from llmesh.engine.quant import fbgemm_kernels

    calls, why = {}, {}
    n, k = weight.qweight.shape
    if not library_shape_ok(n, k, weight.block):
        return {"why": {"all": f"[{n} x {k}] block {weight.block} is not a library shape"}}
    calls["scaled_mm"] = lambda: block_fp8_scaled_mm_rows(rows, weight.qweight, weight.scales, out_dtype)
    if (reason := fbgemm_kernels.groupwise_unavailable_reason()) is None and out_dtype == torch.bfloat16:
        fbgemm_kernels.groupwise_scales(weight)  # made once at load in the engine, so before the timing
        calls["fbgemm"] = lambda: fbgemm_kernels.fp8_block_matmul(rows, weight, out_dtype)
    else:
        why["fbgemm"] = reason or f"bfloat16 out only, not {out_dtype}"
    return {"calls": calls, "why": why}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--ms", default="1,16,64,128,256,512,2048")
    ap.add_argument("--tiles", choices=("all", "table"), default="all",
                    help="table: only the tiles BLOCK_FP8_TILE already holds for this device (a quick "
                         "rerun of the library comparison; its tile literal then chooses among those)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes through Triton's interpreter on the CPU")
    ap.add_argument("--suffix", default="", help="result file block_fp8_<device><suffix>.json")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    from llmesh.engine.quant.linear import linear
    from llmesh.engine.quant.quantize import quantize_fp8

    if args.smoke:
        shapes, ms, tiles, block = ((64, 96),), (1, 5), SMOKE_TILES, (32, 32)
    else:
        shapes, ms, tiles, block = SHAPES_8B, tuple(int(m) for m in args.ms.split(",")), TILES, BLOCK
        if args.tiles == "table":
            tiles = tuple(dict.fromkeys(BLOCK_FP8_TILE.get(device_tag(device), {}).values())) or TILES
    copy_gb_s = measure_copy_tb_s(device, gib=1 / 16 if args.smoke else 2.0) * 1e3
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16
    metrics: dict[str, float] = {"copy_tb_s": copy_gb_s / 1e3}
    per_bucket: dict[int, dict[BlockFp8Config, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_library: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    wrong, failed = [], []
    for k, n in shapes:
        w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
        qweight, scales = quantize_fp8_blocks(w, block)
        weight = Fp8BlockWeight(qweight=qweight, scales=scales, block=block)
        rowwise = quantize_fp8(w)
        for m in ms:
            tag = f"block_fp8_{k}x{n}_m{m}"
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)
            rows = quantize_fp8_per_group(x, block[1])
            want = block_fp8_gemm_ref(x, qweight, scales, block).float()
            out = torch.empty(m, n, device=device, dtype=dtype)
            times: dict[BlockFp8Config, float] = {}
            for tile in tiles:
                def fn(tile=tile):
                    return block_fp8_gemm_rows(rows, qweight, scales, block, out=out, config=tile)
                try:
                    got = fn().float()
                except Exception as e:  # a tile whose stages overflow shared memory, say
                    failed.append(f"{tag} {tile_name(tile)}: {str(e)[:160]}")
                    continue
                err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                if not err < 1e-2:
                    wrong.append(f"{tag} {tile_name(tile)}: max rel error {err:.3g}")
                    continue
                times[tile] = 1e3 * graph_time_ms(fn, device)
                metrics[f"{tag}_tile_{tile_name(tile)}_us"] = times[tile]
                per_bucket[m][tile].append(times[tile])
            if not times:
                print(f"[block-fp8] {tag}: no tile ran", flush=True)
                continue
            best = min(times, key=times.get)
            metrics[f"{tag}_best_tile_us"] = times[best]
            libs = library_calls(rows, weight, dtype)
            failed += [f"{tag} {name}: {reason}" for name, reason in libs.get("why", {}).items()]
            for name, call in libs.get("calls", {}).items():
                try:
                    err = ((call().float() - want).abs().max() / want.abs().max()).item()
                except Exception as e:  # noqa: BLE001 - the build or the device lacks it: recorded
                    failed.append(f"{tag} {name}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                if not err < 1e-2:
                    wrong.append(f"{tag} {name}: max rel error {err:.3g}")
                    continue
                metrics[f"{tag}_{name}_us"] = 1e3 * graph_time_ms(call, device)
                metrics[f"{tag}_{name}_vs_best_tile_x"] = times[best] / metrics[f"{tag}_{name}_us"]
                per_library[m][name].append(metrics[f"{tag}_{name}_us"])
            us = {
                "linear": 1e3 * graph_time_ms(lambda: linear(x, weight), device),
                "rowwise": 1e3 * graph_time_ms(lambda: linear(x, rowwise), device),
                "bf16": 1e3 * graph_time_ms(lambda: torch.nn.functional.linear(x, w), device),
            }
            for name, v in us.items():
                metrics[f"{tag}_{name}_us"] = v
            metrics[f"{tag}_linear_vs_bf16_x"] = us["bf16"] / us["linear"]
            metrics[f"{tag}_linear_vs_rowwise_x"] = us["rowwise"] / us["linear"]
            if m == 1:
                nbytes = qweight.numel() + scales.numel() * 4
                metrics[f"{tag}_linear_bw_frac"] = nbytes / (us["linear"] * 1e-6) / 1e9 / copy_gb_s
            print(f"[block-fp8] {tag}: best tile {tile_name(best)} {times[best]:.1f} us (table's "
                  f"{tile_name(block_config(device, m))}), linear {us['linear']:.1f} us = "
                  f"{metrics[f'{tag}_linear_vs_bf16_x']:.2f}x bf16, {metrics[f'{tag}_linear_vs_rowwise_x']:.2f}x "
                  f"per-channel FP8" + (f", cuBLAS {metrics[f'{tag}_scaled_mm_us']:.1f} us"
                                        if f"{tag}_scaled_mm_us" in metrics else "")
                  + (f", FBGEMM {metrics[f'{tag}_fbgemm_us']:.1f} us" if f"{tag}_fbgemm_us" in metrics else ""),
                  flush=True)
    table = {}
    for m in sorted(per_bucket):
        cells = max(len(v) for v in per_bucket[m].values())
        means = {t: sum(v) / len(v) for t, v in per_bucket[m].items() if len(v) == cells}
        if means:
            table[m] = min(means, key=means.get)
    library = {}
    for m, tile in table.items():
        cells = len(per_bucket[m][tile])
        means = {"triton": sum(per_bucket[m][tile]) / cells}
        means.update({name: sum(v) / cells for name, v in per_library[m].items() if len(v) == cells})
        library[m] = min(means, key=means.get)
    literal = (f"BLOCK_FP8_TILE[{device_tag(device)!r}] = {table!r}\n"
               f"BLOCK_FP8_LIBRARY[{device_tag(device)!r}] = {library!r}")
    print("# paste into llmesh/kernels/block_fp8_gemm.py\n" + literal, flush=True)
    workload = {"shapes_kn": [list(s) for s in shapes], "ms": list(ms), "block": list(block),
                "tiles": [tile_name(t) for t in tiles], "tile_set": args.tiles,
                "weights": "randn * 0.02, bf16, quantized per block",
                "timing": "CUDA-graph replay, triton.testing.do_bench (L2 flushed)", "literal": literal,
                "wrong": wrong, "failed": failed, "software": software_versions(), "smoke": args.smoke}
    path = write_result(f"block_fp8_{device_tag(device)}{args.suffix}", workload, rounded(metrics),
                        device=device_name(device), results_dir=results_dir_for(args))
    print(f"[block-fp8] wrote {path}", flush=True)
    if wrong:
        print("[block-fp8] FAILED: " + "; ".join(wrong), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

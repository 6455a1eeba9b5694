"""Tile of the paged decode attention (llmesh/kernels/paged_decode_attention.py) at batch sizes
where decode steps are large.

At 256 sequences of ~140 tokens the decode kernel took 60 us a layer on the 8B shape, 22 % of
a decode step (kernel_profile_h200_b256.json), reading its K/V at about 0.6 of the copy
bandwidth: each (sequence, KV head) program walks a short context a BLOCK_N tile at a time, and
how many programs an SM holds (shared memory of the pipelined K/V tiles, registers) sets how
many loads are in flight. This sweep times BLOCK_N x warps x pipeline stages for KV-head
counts 8 (Llama-3-8B) and 4 (Qwen3-30B-A3B), 32 query heads, head_dim 128, bf16, block size
16, the engine's own partition size for each batch (attention_config.decode_partition_size at
max_seq_len 2048), contexts uniform in [c/2, 3c/2] for c in --contexts, scattered block tables.
Each call is a CUDA-graph replay (gpu_ceilings.graph_time_ms), every tile's output checked
against the torch reference. Per (sequence, KV head) pairs bucket the tile with the least mean
time over the contexts wins; prints the `PAGED_DECODE_TILE` literal for
llmesh/kernels/attention_config.py and writes bench/results/decode_tile_<dev>.json: metrics
decode_tile_p<pairs>_speedup_x (best against the default tile, 64 x 4 warps x 3 stages),
decode_tile_h<kv>_b<B>_c<ctx>_bw_frac (the default's and the best tile's K/V bytes per second
over the copy bandwidth: _default_bw_frac, _best_bw_frac) and every time as
decode_tile_h<kv>_b<B>_c<ctx>_n<block_n>w<warps>s<stages>_us.

With --kv-dtype fp8 the pools are E4M3 with their per-(token, head) scales (kv_cache_dtype=fp8),
the bytes counted are theirs (1 byte an element, 1 a scale), the literal is
`PAGED_DECODE_TILE['<dev>:fp8']` and the file decode_tile_<dev>_fp8.json.

Usage: python bench/decode_tile_sweep.py [--batches 64,128,256] [--contexts 128,256,512,1024]
       [--kv-heads 8,4] [--kv-dtype bf16|fp8] [--smoke] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import itertools
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
from llmesh.kernels.attention_config import (DEFAULT_PAGED_DECODE_TILE, PagedDecodeTile,  # noqa: E402
                                             decode_partition_size)
from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref  # noqa: E402
from llmesh.kernels.paged_decode_attention import paged_decode_attention  # noqa: E402


def fp8_pools(k: torch.Tensor, v: torch.Tensor):
    """k, v: [num_blocks, block_size, H_kv, D] bf16 written into E4M3 pools as the engine's
    kv_cache_dtype=fp8 writes them: (k8, v8, (k_scales, v_scales))."""
    from llmesh.kernels.kv_cache_write import kv_cache_write
    from llmesh.kernels.kv_quant_ref import KV_FP8_DTYPE, KV_SCALE_DTYPE

    num_blocks, block_size, h_kv, d = k.shape
    k8 = torch.empty(k.shape, dtype=KV_FP8_DTYPE, device=k.device)
    v8 = torch.empty_like(k8)
    ks = torch.empty(k.shape[:3], dtype=KV_SCALE_DTYPE, device=k.device)
    vs = torch.empty_like(ks)
    slots = torch.arange(num_blocks * block_size, device=k.device)
    kv_cache_write(k8, v8, k.view(-1, h_kv, d), v.view(-1, h_kv, d), slots, ks, vs)
    return k8, v8, (ks, vs)


def tile_name(t: PagedDecodeTile) -> str:
    return f"n{t.block_n}w{t.num_warps}s{t.num_stages}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--contexts", default="128,256,512,1024")
    ap.add_argument("--kv-heads", default="8,4", help="KV head counts (32 query heads)")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16", help="the KV pool's element type")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes through Triton's interpreter on the CPU")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    fp8 = args.kv_dtype == "fp8"
    if args.smoke:
        kv_heads, batches, contexts, max_len, d, h_q = (2,), (2,), (24,), 64, 16, 4
        tiles = [DEFAULT_PAGED_DECODE_TILE, PagedDecodeTile(32, 2, 2)]
    else:
        kv_heads, max_len, d, h_q = tuple(int(x) for x in args.kv_heads.split(",")), 2048, 128, 32
        batches = tuple(int(x) for x in args.batches.split(","))
        contexts = tuple(int(x) for x in args.contexts.split(","))
        tiles = [PagedDecodeTile(n, w, s) for n, w, s in itertools.product((32, 64, 128), (2, 4), (2, 3, 4))]
        if DEFAULT_PAGED_DECODE_TILE not in tiles:
            tiles.insert(0, DEFAULT_PAGED_DECODE_TILE)
    copy_gb_s = measure_copy_tb_s(device, gib=1 / 16 if args.smoke else 2.0) * 1e3
    block_size = 16
    gen = torch.Generator(device).manual_seed(0)
    metrics: dict[str, float] = {"copy_tb_s": copy_gb_s / 1e3}
    per_bucket: dict[int, dict[PagedDecodeTile, list[float]]] = defaultdict(lambda: defaultdict(list))
    wrong: list[str] = []
    failed: list[str] = []
    for h_kv in kv_heads:
        max_b = max(batches)
        blocks_per_seq = max_len // block_size
        num_blocks = max_b * blocks_per_seq + 1
        k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen, device=device).to(torch.bfloat16)
        v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen, device=device).to(torch.bfloat16)
        scales = None
        if fp8:
            k_cache, v_cache, scales = fp8_pools(k_cache, v_cache)
        perm = torch.randperm(num_blocks - 1, generator=gen, device=device).to(torch.int32) + 1
        for b in batches:
            tables = perm[:b * blocks_per_seq].view(b, blocks_per_seq).contiguous()
            q = torch.randn(b, h_q, d, generator=gen, device=device).to(torch.bfloat16)
            out = torch.empty_like(q)
            size = decode_partition_size(device, b * h_kv, max_len)
            for ctx in contexts:
                lo, hi = max(1, ctx // 2), min(max_len, ctx + ctx // 2)
                seq_lens = torch.randint(lo, hi + 1, (b,), generator=gen, device=device, dtype=torch.int32)
                host_lens = seq_lens.tolist()
                meta = AttentionMetadata(slot_mapping=torch.arange(b, device=device), block_tables=tables,
                                         seq_lens=seq_lens, query_start_loc=None, max_query_len=1,
                                         max_seq_len=max(host_lens), host_seq_lens=host_lens)
                want = paged_attention_ref(q, k_cache, v_cache, meta, d ** -0.5, *(scales or ())).float()
                # K+V (and their scales) of every token, q, out
                nbytes = sum(host_lens) * h_kv * ((d + 1) * 2 if fp8 else d * 2 * 2) + 2 * q.numel() * 2
                times: dict[PagedDecodeTile, float] = {}
                for tile in tiles:
                    def fn(tile=tile):
                        return paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d ** -0.5,
                                                      max_seq_len=max_len, partition_size=size, out=out, tile=tile,
                                                      k_scales=scales and scales[0], v_scales=scales and scales[1])
                    try:
                        got = fn().float()
                    except Exception as e:  # e.g. a tile whose stages overflow shared memory
                        failed.append(f"h_kv {h_kv} b {b} ctx {ctx} {tile_name(tile)}: {str(e)[:160]}")
                        print(f"[decode-tile] {failed[-1]}", flush=True)
                        continue
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    # 3e-2: the kernel's probabilities enter P.V in bf16; one cell of the first run (4 KV
                    # heads, 256 sequences of ~512 tokens) read 0.0226 for every tile alike
                    if not err < 3e-2:
                        wrong.append(f"h_kv {h_kv} b {b} ctx {ctx} {tile_name(tile)}: max rel error {err:.3g}")
                        print(f"[decode-tile] WRONG {wrong[-1]}", flush=True)
                        continue
                    us = 1e3 * graph_time_ms(fn, device)
                    times[tile] = us
                    metrics[f"decode_tile_h{h_kv}_b{b}_c{ctx}_{tile_name(tile)}_us"] = us
                    per_bucket[b * h_kv][tile].append(us)
                if DEFAULT_PAGED_DECODE_TILE not in times:
                    print(f"[decode-tile] h_kv {h_kv} b {b} ctx {ctx}: the default tile did not run; cell left out",
                          flush=True)
                    continue
                best = min(times, key=times.get)
                base = times[DEFAULT_PAGED_DECODE_TILE]
                tag = f"decode_tile_h{h_kv}_b{b}_c{ctx}"
                metrics[f"{tag}_default_bw_frac"] = nbytes / (base * 1e-6) / 1e9 / copy_gb_s
                metrics[f"{tag}_best_bw_frac"] = nbytes / (times[best] * 1e-6) / 1e9 / copy_gb_s
                print(f"[decode-tile] h_kv {h_kv} b {b:3d} ctx {ctx:5d} (partition {size}): default "
                      f"{base:6.1f} us ({metrics[f'{tag}_default_bw_frac']:.2f} of copy), best {tile_name(best)} "
                      f"{times[best]:6.1f} us ({metrics[f'{tag}_best_bw_frac']:.2f})", flush=True)
    table = {}
    for pairs in sorted(per_bucket):
        # only tiles that ran in every cell of the bucket compete
        cells = max(len(v) for v in per_bucket[pairs].values())
        means = {t: sum(v) / len(v) for t, v in per_bucket[pairs].items() if len(v) == cells}
        if DEFAULT_PAGED_DECODE_TILE not in means:
            continue
        best = min(means, key=means.get)
        table[pairs] = best
        metrics[f"decode_tile_p{pairs}_speedup_x"] = means[DEFAULT_PAGED_DECODE_TILE] / means[best]
        print(f"[decode-tile] {pairs:5d} (sequence, KV head) pairs: best {tile_name(best)} ({means[best]:.1f} us "
              f"mean, {metrics[f'decode_tile_p{pairs}_speedup_x']:.2f}x the default)", flush=True)
    key = device_tag(device) + (":fp8" if fp8 else "")
    literal = f"PAGED_DECODE_TILE[{key!r}] = {table!r}"
    print("# paste into llmesh/kernels/attention_config.py\n" + literal, flush=True)
    workload = {"kv_heads": list(kv_heads), "query_heads": h_q, "head_dim": d, "block_size": block_size,
                "batches": list(batches), "contexts": list(contexts), "context_spread": "uniform in [c/2, 3c/2]",
                "tiles": [tile_name(t) for t in tiles], "default": tile_name(DEFAULT_PAGED_DECODE_TILE),
                "max_seq_len": max_len, "kv_dtype": args.kv_dtype,
                "bytes": "K+V (FP8: and their scales) of every context token + q + out",
                "timing": "CUDA-graph replay, triton.testing.do_bench (L2 flushed)", "literal": literal,
                "wrong": wrong, "failed": failed, "software": software_versions(), "smoke": args.smoke}
    path = write_result(f"decode_tile_{device_tag(device)}" + ("_fp8" if fp8 else ""), workload, rounded(metrics),
                        device=device_name(device), results_dir=results_dir_for(args))
    print(f"[decode-tile] wrote {path}", flush=True)
    if wrong:
        print("[decode-tile] FAILED: " + "; ".join(wrong), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Partition size of the paged decode attention (llmesh/kernels/paged_decode_attention.py) by batch.

The decode kernel splits each sequence's context into partitions of `partition_size` keys,
one program per (sequence, KV head, partition), and a reduce kernel combines them. Under a
CUDA graph the grid is fixed by the model's maximum length, so at small batches only the
partitions that hold tokens work and each walks its keys one BLOCK_N tile after another: a
chain of dependent memory round trips. Smaller partitions put more programs on a short
context; larger ones cost the reduce less. The right size depends on how many (sequence,
KV head) pairs the batch has, which this sweep measures.

For KV-head counts 8 (Llama-3-8B) and 4 (Qwen3-30B-A3B), 32 query heads, head_dim 128, bf16,
block size 16, max_seq_len 2048 (the graphs' bound in the benchmarks): batch x context x
partition size, each timed as a CUDA-graph replay (gpu_ceilings.graph_time_ms), the output
checked once against the torch reference. Per bucket of (batch x KV heads) pairs the size with
the least mean time over the contexts wins; prints the `DECODE_PARTITION` literal for
llmesh/kernels/attention_config.py and writes bench/results/decode_partition_<dev>.json (metrics
decode_part_p<pairs>_best_size, decode_part_p<pairs>_speedup_x against size 512, and every
time as decode_part_h<kv>_b<B>_c<ctx>_s<size>_us).

Usage: python bench/decode_partition_sweep.py [--smoke] [--results-dir DIR]
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

from gpu_ceilings import (device_name, device_tag, graph_time_ms, pick_device, results_dir_for,  # noqa: E402
                          rounded, software_versions)

from llmesh.bench_results import write_result  # noqa: E402
from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref  # noqa: E402
from llmesh.kernels.paged_decode_attention import paged_decode_attention  # noqa: E402

BASELINE = 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes through Triton's interpreter on the CPU")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.smoke:
        kv_heads, batches, contexts, sizes, max_len, d, h_q = (2,), (1, 2), (20, 40), (16, 32), 64, 16, 4
    else:
        kv_heads, batches, contexts = (8, 4), (1, 2, 4, 8, 16, 32, 64), (128, 512, 1024, 2048)
        sizes, max_len, d, h_q = (32, 64, 128, 256, 512), 2048, 128, 32
    block_size = 16
    gen = torch.Generator(device).manual_seed(0)
    metrics: dict[str, float] = {}
    per_bucket: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    wrong: list[str] = []
    for h_kv in kv_heads:
        max_b = max(batches)
        blocks_per_seq = max_len // block_size
        num_blocks = max_b * blocks_per_seq + 1
        k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen, device=device).to(torch.bfloat16)
        v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen, device=device).to(torch.bfloat16)
        perm = torch.randperm(num_blocks - 1, generator=gen, device=device).to(torch.int32) + 1
        for b in batches:
            tables = perm[:b * blocks_per_seq].view(b, blocks_per_seq).contiguous()
            q = torch.randn(b, h_q, d, generator=gen, device=device).to(torch.bfloat16)
            out = torch.empty_like(q)
            for ctx in contexts:
                seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
                meta = AttentionMetadata(slot_mapping=torch.arange(b, device=device), block_tables=tables,
                                         seq_lens=seq_lens, query_start_loc=None, max_query_len=1,
                                         max_seq_len=ctx, host_seq_lens=[ctx] * b)
                want = paged_attention_ref(q, k_cache, v_cache, meta, d ** -0.5).float()
                row = []
                for size in sizes:
                    def fn(size=size):
                        return paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d ** -0.5,
                                                      max_seq_len=max_len, partition_size=size, out=out)
                    got = fn().float()
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    if not err < 2e-2:
                        wrong.append(f"h_kv {h_kv} b {b} ctx {ctx} size {size}: max rel error {err:.3g}")
                    us = 1e3 * graph_time_ms(fn, device)
                    metrics[f"decode_part_h{h_kv}_b{b}_c{ctx}_s{size}_us"] = us
                    per_bucket[b * h_kv][size].append(us)
                    row.append(f"{size}:{us:6.1f}")
                print(f"[decode-part] h_kv {h_kv} b {b:3d} ctx {ctx:5d}  " + "  ".join(row), flush=True)
    table = {}
    for pairs in sorted(per_bucket):
        means = {size: sum(v) / len(v) for size, v in per_bucket[pairs].items()}
        best = min(means, key=means.get)
        base = means.get(BASELINE, means[max(means)])
        table[pairs] = best
        metrics[f"decode_part_p{pairs}_best_size"] = best
        metrics[f"decode_part_p{pairs}_speedup_x"] = base / means[best]
        print(f"[decode-part] {pairs:4d} (sequence, KV head) pairs: best {best} ({means[best]:.1f} us mean, "
              f"{base / means[best]:.2f}x size {BASELINE})", flush=True)
    literal = f"DECODE_PARTITION[{device_tag(device)!r}] = {table!r}"
    print("# paste into llmesh/kernels/attention_config.py\n" + literal, flush=True)
    workload = {"kv_heads": list(kv_heads), "query_heads": h_q, "head_dim": d, "block_size": block_size,
                "batches": list(batches), "contexts": list(contexts), "sizes": list(sizes), "max_seq_len": max_len,
                "timing": "CUDA-graph replay, triton.testing.do_bench (L2 flushed)", "literal": literal,
                "wrong": wrong, "software": software_versions(), "smoke": args.smoke}
    path = write_result(f"decode_partition_{device_tag(device)}", workload, rounded(metrics),
                        device=device_name(device), results_dir=results_dir_for(args))
    print(f"[decode-part] wrote {path}", flush=True)
    if wrong:
        print("[decode-part] FAILED: " + "; ".join(wrong), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""FP8 KV cache on the GPU: decode attention time over an FP8 pool against a bf16 pool at long
context, and the KV capacity (tokens in the same memory) of kv_cache_dtype=fp8 against auto.

Usage: python bench/kv_fp8_gpu.py [--smoke] [--suffix S]
Writes bench/results/kv_fp8_<dev>.json with kv_fp8_decode_attn_speedup_x (bf16 ms / fp8 ms of
paged_decode_attention, batch 64, context 4096, 32 query / 8 KV heads, head_dim 128) and
kv_fp8_tokens_capacity_x (blocks per byte budget, 8B shape: 32 layers, 8 KV heads, D 128), and
the speedup at 256 decodes of 256 tokens under a 2048-token bound (_b256_c256): each call a CUDA-graph
replay with the engine's partition size. (The files of session 33 and before were timed by
do_bench on eager calls with a partition of 512, and the short cell under a 4096-token bound:
mostly launches and empty partitions, its bf16 time read 0.09-0.23 ms.) LLMESH_FP8_WIDEN=convert times
Triton's E4M3 conversion instead of kv_quant.widen_e4m3's integer route (the default), for an A/B.
--smoke runs tiny shapes through Triton's interpreter on the CPU and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from llmesh.bench_results import device_tag, write_result  # noqa: E402
from llmesh.engine.model.config import ModelConfig  # noqa: E402
from llmesh.engine.model_runner import kv_bytes_per_block  # noqa: E402
from llmesh.kernels.kv_quant_ref import KV_FP8_DTYPE  # noqa: E402


SHORT_MAX_LEN = 2048
"""The 256 x 256 cell's length bound (the engine's max_seq_len, which sets its partitions), as in
decode_tile_sweep.py."""


def _pools(num_seqs: int, ctx: int, h_kv: int, d: int, block_size: int, dtype, device, gen):
    """A bf16 pool of random K/V, the same contexts written into an FP8 pool with scales, and the tables."""
    from decode_tile_sweep import fp8_pools

    nb = -(-ctx // block_size)
    num_blocks = num_seqs * nb
    k = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(device, dtype)
    v = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(device, dtype)
    k8, v8, (ks, vs) = fp8_pools(k, v)
    tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, nb).to(device, torch.int32)
    return (k, v), (k8, v8, ks, vs), tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter; writes nothing")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    ap.add_argument("--suffix", default="", help="appended to the result file's name (e.g. an A/B of "
                    "LLMESH_FP8_WIDEN=convert|asm)")
    args = ap.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from gpu_ceilings import graph_time_ms

    from llmesh.kernels.attention_config import decode_partition_size
    from llmesh.kernels.paged_decode_attention import paged_decode_attention

    device = torch.device("cpu" if smoke else "cuda")
    batch, ctx, h_q, h_kv, d, bs = (2, 64, 4, 2, 32, 16) if smoke else (64, 4096, 32, 8, 128, 16)
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    def cell(num_seqs: int, context: int, max_len: int) -> tuple[float, float, float]:
        """(bf16 ms, FP8 ms, relative error) of `num_seqs` decodes of `context` tokens, with the
        engine's partition size for a `max_len` bound, each call a CUDA-graph replay (the host's
        launch cost out of the figure, as in the engine's decode graphs)."""
        (k, v), (k8, v8, ks, vs), tables = _pools(num_seqs, context, h_kv, d, bs, dtype, device, gen)
        q = torch.randn(num_seqs, h_q, d, generator=gen).to(device, dtype)
        lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
        size = decode_partition_size(device, num_seqs * h_kv, max_len)
        out, out8 = torch.empty_like(q), torch.empty_like(q)

        def full():
            return paged_decode_attention(q, k, v, tables, lens, d ** -0.5, max_seq_len=max_len,
                                          partition_size=size, out=out)

        def fp8():
            return paged_decode_attention(q, k8, v8, tables, lens, d ** -0.5, max_seq_len=max_len,
                                          partition_size=size, out=out8, k_scales=ks, v_scales=vs)

        want = full().float()
        err = ((fp8().float() - want).norm() / want.norm()).item()
        return graph_time_ms(full, device), graph_time_ms(fp8, device), err

    full_ms, fp8_ms, err = cell(batch, ctx, ctx)
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=8192)
    capacity = kv_bytes_per_block(cfg, bs, torch.bfloat16) / kv_bytes_per_block(cfg, bs, KV_FP8_DTYPE)
    metrics = {"kv_fp8_decode_attn_speedup_x": full_ms / fp8_ms, "kv_fp8_tokens_capacity_x": capacity,
               "kv_fp8_decode_attn_ms": fp8_ms, "kv_bf16_decode_attn_ms": full_ms,
               "kv_fp8_decode_attn_rel_err": err}
    if not smoke:  # the offline workload's regime too: many decodes of short contexts, a 2048 bound
        sb, sctx = 256, 256
        s_full, s_fp8, _ = cell(sb, sctx, SHORT_MAX_LEN)
        metrics.update({f"kv_fp8_decode_attn_speedup_x_b{sb}_c{sctx}": s_full / s_fp8,
                        f"kv_fp8_decode_attn_ms_b{sb}_c{sctx}": s_fp8, f"kv_bf16_decode_attn_ms_b{sb}_c{sctx}": s_full})
    print({k: round(x, 4) for k, x in metrics.items()})
    if smoke:
        return
    from llmesh.kernels.kv_quant import WIDEN_ROUTE

    workload = dict(batch=batch, context=ctx, h_q=h_q, h_kv=h_kv, head_dim=d, block_size=bs,
                    short=dict(batch=256, context=256, max_seq_len=SHORT_MAX_LEN),
                    timing="CUDA-graph replays; the engine's partition size for each cell's length bound",
                    widen=WIDEN_ROUTE,
                    capacity_shape="Llama-3-8B (32 layers, 8 KV heads, D 128)")
    print(write_result(f"kv_fp8_{device_tag(device)}{args.suffix}", workload, metrics,
                       results_dir=Path(args.results_dir) if args.results_dir else None))


if __name__ == "__main__":
    main()

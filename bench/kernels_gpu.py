"""Microbenchmarks of the Triton kernels in llmesh/kernels/ at Llama-3-8B shapes (bf16).

Shapes: 32 query heads, 8 KV heads, head_dim 128, KV block size 16, hidden 4096,
intermediate 14336. Memory-bound kernels report achieved GB/s and the fraction of the
device's measured copy bandwidth (bench/gpu_ceilings.py, measured at the start of this run);
prefill attention reports TFLOP/s and the fraction of the measured bf16 GEMM throughput.

- paged decode attention, context 2048/4096/8192 x batch 16/32/64: bytes = K and V of every
  context token read once + q + out (block tables are scattered at random over the pool, as
  a long-running server's are); the torch reference (the torch backend's attention) timed at
  context 4096 x batch 32 for comparison.
- prefill attention: 4 prompts x 2048 tokens, causal flops = 4 T^2 H D / 2 per prompt.
- causal prefill (prefill_attn_gemm_frac): prompts of 1k-8k tokens and of the offline workload's
  mixed lengths (16k tokens a call), no cached prefix: our paged kernel, the dispatched path
  (dense_causal_attention) and each backend it has (bench/causal_prefill_bench.py), with the
  measured DENSE_CAUSAL_BACKEND table printed.
- unified attention: 256 decodes at context 512-2048 + one 256-token prefill chunk in one call
  (GB/s, ms, vs the decode + prefill kernels), and the decodes alone (vs paged_decode_attention);
  the same at the offline workload's mixed step, 255 decodes of 150-450 tokens + a 400-token
  chunk (metrics with _short: which of the two launches a mixed step should take there).
- rope + KV write fused (rope_kv_write) vs rotary_embedding then kv_cache_write.
- KV-cache write, RMSNorm (alone and fused with the residual add), SiLU-and-mul, RoPE at
  T = 8192 tokens: bytes = every input read once + every output written once.
- argmax (the greedy sampler): float32 logits [N, 128256] at N = 1, 8, 64, 256, the split-row
  kernel (llmesh/kernels/argmax.py) against torch's argmax: argmax_us_{ours,torch}_n{N}.

Usage: python bench/kernels_gpu.py [--smoke] [--parts a,b] [--suffix _x]
Writes bench/results/kernels_<dev><suffix>.json. --smoke runs tiny shapes through the Triton
interpreter on the CPU (proves the code paths, the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict

import torch

from gpu_ceilings import (device_name, device_tag, measure_ceilings, pick_device, results_dir_for, rounded,
                          software_versions, time_ms)
from causal_prefill_bench import causal_prefill, dense_table_literal, extend_table_literal
from kernels_shapes import LLAMA3_8B, SMOKE, Row, Shapes
from llmesh.bench_results import write_result


class KernelBench:
    """Runs each benchmark, keeps going past a failing one, collects metrics and table rows."""

    def __init__(self, shapes: Shapes, device: torch.device, ceilings: dict[str, float], smoke: bool) -> None:
        self.s, self.device, self.smoke = shapes, device, smoke
        self.copy_gb_s = ceilings["copy_tb_s"] * 1e3
        self.gemm_tflops = ceilings["gemm_bf16_tflops"]
        self.metrics: dict[str, float] = dict(ceilings)
        self.rows: list[Row] = []
        self.failed: list[str] = []
        self.dispatch: dict[str, str] = {}
        """dense_causal_attention's choice per causal-prefill case."""
        self.dense_table: dict[int, str] = {}
        """The fastest table candidate per causal-prefill bucket (the DENSE_CAUSAL_BACKEND literal)."""
        self.extend_table: dict[int, str] = {}
        """The faster of FA3 and the paged kernel per extend bucket (the EXTEND_BACKEND literal)."""
        self.causal_rounds = 1 if smoke else 3
        self.causal_round_fracs: dict[str, dict[str, list[float]]] = {}
        """Each round's fraction of the GEMM ceiling, by implementation and context."""
        self.gen = torch.Generator(device).manual_seed(0)
        self.dtype = torch.bfloat16

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def time(self, fn: Callable[[], object]) -> float:
        return time_ms(fn, self.device, cpu_reps=2 if self.smoke else 3)

    def bandwidth(self, name: str, fn: Callable[[], object], nbytes: int) -> tuple[float, float, float]:
        """Time a memory-bound call; returns (ms, GB/s, fraction of the copy bandwidth)."""
        ms = self.time(fn)
        gb_s = nbytes / (ms * 1e-3) / 1e9
        frac = gb_s / self.copy_gb_s
        self.rows.append(Row(name, ms, gb_s, "GB/s", frac))
        return ms, gb_s, frac

    def run(self, name: str, bench: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            bench()
        except Exception:  # one broken kernel must not hide the others' numbers
            traceback.print_exc()
            self.failed.append(name)
            print(f"[kernels] {name}: FAILED", flush=True)
            return
        print(f"[kernels] {name}: done ({time.perf_counter() - t0:.1f}s)", flush=True)

    # ---- attention ------------------------------------------------------------------------
    def paged_pool(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        # k, v: [num_blocks, block_size, H_kv, D]
        return (self.randn(num_blocks, s.block_size, s.h_kv, s.head_dim),
                self.randn(num_blocks, s.block_size, s.h_kv, s.head_dim))

    def scattered_tables(self, num_blocks: int, seqs: int, blocks_each: int) -> torch.Tensor:
        """[seqs, blocks_each] int32 block ids drawn without replacement from the pool, in random order."""
        perm = torch.randperm(num_blocks, generator=self.gen, device=self.device)[: seqs * blocks_each]
        return perm.view(seqs, blocks_each).to(torch.int32)

    def decode_attention(self) -> None:
        from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref
        from llmesh.kernels.paged_decode_attention import paged_decode_attention

        s, elem = self.s, 2
        bs_of = s.block_size
        num_blocks = max(s.batches) * max(s.contexts) // bs_of + 1
        k_cache, v_cache = self.paged_pool(num_blocks)
        scale = s.head_dim ** -0.5
        for ctx in s.contexts:
            for bs in s.batches:
                nb = -(-ctx // bs_of)
                tables = self.scattered_tables(num_blocks, bs, nb)
                seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device=self.device)
                q = self.randn(bs, s.h_q, s.head_dim)  # q: [B, H_q, D]
                out = torch.empty_like(q)
                # max_seq_len given: the wrapper would otherwise sync on seq_lens.max().
                fn = lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale,  # noqa: E731
                                                    max_seq_len=ctx, out=out)
                nbytes = 2 * bs * ctx * s.h_kv * s.head_dim * elem + 2 * q.numel() * elem
                ms, gb_s, frac = self.bandwidth(f"decode attn c{ctx} b{bs}", fn, nbytes)
                self.metrics[f"attn_decode_c{ctx}_b{bs}_bw_frac"] = frac
                if (ctx, bs) == s.main:
                    self.metrics["attn_decode_bw_frac"] = frac
                    self.metrics[f"attn_decode_c{ctx}_b{bs}_gb_s"] = gb_s
                    self.metrics[f"attn_decode_c{ctx}_b{bs}_ms"] = ms
                    meta = AttentionMetadata(  # built once, outside the timing, as the torch backend does per step
                        slot_mapping=torch.arange(bs, device=self.device), block_tables=tables, seq_lens=seq_lens,
                        query_start_loc=None, max_query_len=1, max_seq_len=ctx, host_seq_lens=[ctx] * bs)
                    ref_ms = self.time(lambda: paged_attention_ref(q, k_cache, v_cache, meta, scale))
                    self.rows.append(Row(f"  torch ref c{ctx} b{bs}", ref_ms, nbytes / (ref_ms * 1e-3) / 1e9, "GB/s",
                                         nbytes / (ref_ms * 1e-3) / 1e9 / self.copy_gb_s))
                    self.metrics[f"attn_decode_ref_c{ctx}_b{bs}_ms"] = ref_ms
                    self.metrics["attn_decode_vs_ref_x"] = ref_ms / ms

    def prefill_attention(self) -> None:
        from llmesh.kernels.prefill_attention import prefill_attention, prefill_attention_ref

        s = self.s
        n, t = s.prefill_seqs, s.prefill_len
        nb = -(-t // s.block_size)
        num_blocks = n * nb + 1
        k_cache, v_cache = self.paged_pool(num_blocks)
        tables = self.scattered_tables(num_blocks, n, nb)
        q = self.randn(n * t, s.h_q, s.head_dim)  # q: [S * T, H_q, D]
        out = torch.empty_like(q)
        qsl = torch.arange(0, n * t + 1, t, dtype=torch.int32, device=self.device)  # [S + 1]
        seq_lens = torch.full((n,), t, dtype=torch.int32, device=self.device)
        scale = s.head_dim ** -0.5
        fn = lambda: prefill_attention(q, k_cache, v_cache, tables, qsl, seq_lens, scale,  # noqa: E731
                                       max_query_len=t, out=out)
        flops = n * 4 * t * t * s.h_q * s.head_dim / 2
        ms = self.time(fn)
        tflops = flops / (ms * 1e-3) / 1e12
        self.rows.append(Row(f"prefill attn {n}x{t}", ms, tflops, "TFLOP/s", tflops / self.gemm_tflops))
        ref_ms = self.time(lambda: prefill_attention_ref(q, k_cache, v_cache, tables, qsl, seq_lens, scale))
        self.rows.append(Row(f"  torch ref {n}x{t}", ref_ms, flops / (ref_ms * 1e-3) / 1e12, "TFLOP/s",
                             flops / (ref_ms * 1e-3) / 1e12 / self.gemm_tflops))
        self.metrics.update(attn_prefill_tflops=tflops, attn_prefill_gemm_frac=tflops / self.gemm_tflops,
                            attn_prefill_ms=ms, attn_prefill_ref_ms=ref_ms, attn_prefill_vs_ref_x=ref_ms / ms)

    def causal_prefill(self) -> None:
        """prefill_attn_gemm_frac: causal prompts with no cached prefix (bench/causal_prefill_bench.py)."""
        causal_prefill(self)

    def unified_mix(self) -> None:
        """unified_attention on a decode-heavy mix (many decodes + one fresh prefill chunk) and on
        the decodes alone, against the split (paged_decode_attention + prefill_attention): at
        contexts of 512-2048 (unified_mix_*) and at the offline workload's (unified_mix_short_*)."""
        s = self.s
        self._mix("", s.mix_decodes, s.mix_ctx, s.mix_chunk)
        self._mix("_short", *s.mix_short)

    def _mix(self, tag: str, decodes: int, ctx_range: tuple[int, int], chunk: int) -> None:
        from llmesh.kernels.paged_decode_attention import paged_decode_attention
        from llmesh.kernels.prefill_attention import prefill_attention
        from llmesh.kernels.unified_attention import unified_attention

        s, elem = self.s, 2
        lo, hi = ctx_range
        ctx = torch.randint(lo, hi + 1, (decodes,), generator=torch.Generator().manual_seed(1)).tolist()
        lens = ctx + [chunk]
        nb = -(-max(hi, chunk) // s.block_size)
        num_blocks = len(lens) * nb + 1
        k_cache, v_cache = self.paged_pool(num_blocks)
        tables = self.scattered_tables(num_blocks, len(lens), nb)
        t = decodes + chunk
        q = self.randn(t, s.h_q, s.head_dim)
        out = torch.empty_like(q)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=self.device)
        qsl = torch.tensor(list(range(decodes + 1)) + [t], dtype=torch.int32, device=self.device)
        scale = s.head_dim ** -0.5
        max_seq_len = nb * s.block_size
        kv_bytes = 2 * sum(lens) * s.h_kv * s.head_dim * elem
        nbytes = kv_bytes + 2 * q.numel() * elem
        uni = lambda: unified_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale,  # noqa: E731
                                        max_query_len=chunk, max_seq_len=max_seq_len, out=out)
        ms, gb_s, frac = self.bandwidth(f"unified mix {decodes}d+{chunk}p", uni, nbytes)
        self.metrics.update({f"unified_mix{tag}_ms": ms, f"unified_mix{tag}_gb_s": gb_s, f"unified_mix{tag}_bw_frac": frac})

        d_n = decodes
        qd, od = q[:d_n], out[:d_n]
        qp, op = q[d_n:], out[d_n:]

        def split() -> None:
            paged_decode_attention(qd, k_cache, v_cache, tables[:d_n], seq_lens[:d_n], scale,
                                   max_seq_len=max_seq_len, out=od)
            prefill_attention(qp, k_cache, v_cache, tables[d_n:], qsl[d_n:] - d_n, seq_lens[d_n:], scale,
                              max_query_len=chunk, out=op)
        split_ms = self.time(split)
        self.rows.append(Row("  split decode+prefill", split_ms, nbytes / (split_ms * 1e-3) / 1e9, "GB/s",
                             nbytes / (split_ms * 1e-3) / 1e9 / self.copy_gb_s))
        self.metrics.update({f"unified_mix{tag}_split_ms": split_ms, f"unified_mix{tag}_vs_split_x": split_ms / ms})

        dec_bytes = 2 * sum(ctx) * s.h_kv * s.head_dim * elem + 2 * qd.numel() * elem
        dec = lambda: unified_attention(qd, k_cache, v_cache, tables[:d_n], seq_lens[:d_n], qsl[:d_n + 1],  # noqa
                                        scale, max_query_len=1, max_seq_len=max_seq_len, out=od)
        ms, gb_s, frac = self.bandwidth(f"unified {d_n} decodes", dec, dec_bytes)
        self.metrics.update({f"unified_decode{tag}_ms": ms, f"unified_decode{tag}_gb_s": gb_s,
                             f"unified_decode{tag}_bw_frac": frac})
        old_ms = self.time(lambda: paged_decode_attention(qd, k_cache, v_cache, tables[:d_n], seq_lens[:d_n], scale,
                                                          max_seq_len=max_seq_len, out=od))
        self.rows.append(Row("  paged_decode_attention", old_ms, dec_bytes / (old_ms * 1e-3) / 1e9, "GB/s",
                             dec_bytes / (old_ms * 1e-3) / 1e9 / self.copy_gb_s))
        self.metrics.update({f"unified_decode{tag}_vs_paged_decode_x": old_ms / ms})

    def rope_kv(self) -> None:
        """rope_kv_write (one kernel) against rotary_embedding + kv_cache_write (two)."""
        from llmesh.kernels.kv_cache_write import kv_cache_write
        from llmesh.kernels.rope import rope_cos_sin_cache, rotary_embedding
        from llmesh.kernels.rope_kv_write import rope_kv_write

        s, t = self.s, self.s.tokens
        max_pos = 8192
        cache = rope_cos_sin_cache(s.head_dim, 500000.0, None, max_pos, device=self.device)
        positions = torch.randint(0, max_pos, (t,), generator=self.gen, device=self.device)
        num_blocks = 2 * t // s.block_size
        k_cache, v_cache = self.paged_pool(num_blocks)
        slots = torch.randperm(num_blocks * s.block_size, generator=self.gen, device=self.device)[:t]
        q, k, v = self.randn(t, s.h_q, s.head_dim), self.randn(t, s.h_kv, s.head_dim), self.randn(t, s.h_kv, s.head_dim)
        fused = lambda: rope_kv_write(positions, q, k, v, cache, k_cache, v_cache, slots,  # noqa: E731
                                      q_out=q, k_out=k)

        def two() -> None:
            rotary_embedding(positions, q, k, cache, q_out=q, k_out=k)
            kv_cache_write(k_cache, v_cache, k, v, slots)
        nbytes = 2 * q.numel() * 2 + 2 * k.numel() * 2 + 2 * (k.numel() + v.numel()) * 2 + t * s.head_dim * 4 + t * 16
        ms, gb_s, frac = self.bandwidth(f"rope+kv write T={t}", fused, nbytes)
        two_ms = self.time(two)
        self.rows.append(Row("  rope then kv write", two_ms, nbytes / (two_ms * 1e-3) / 1e9, "GB/s",
                             nbytes / (two_ms * 1e-3) / 1e9 / self.copy_gb_s))
        self.metrics.update(rope_kv_write_gb_s=gb_s, rope_kv_write_bw_frac=frac, rope_kv_write_ms=ms,
                            rope_kv_write_vs_two_x=two_ms / ms)

    # ---- elementwise ------------------------------------------------------------------------
    def kv_write(self) -> None:
        from llmesh.kernels.kv_cache_write import kv_cache_write

        s, t = self.s, self.s.tokens
        num_blocks = 2 * t // s.block_size
        k_cache, v_cache = self.paged_pool(num_blocks)
        k, v = self.randn(t, s.h_kv, s.head_dim), self.randn(t, s.h_kv, s.head_dim)  # [T, H_kv, D]
        slots = torch.randperm(num_blocks * s.block_size, generator=self.gen, device=self.device)[:t]
        nbytes = 4 * k.numel() * 2 + slots.numel() * 8
        _, gb_s, frac = self.bandwidth(f"kv write T={t}", lambda: kv_cache_write(k_cache, v_cache, k, v, slots),
                                       nbytes)
        self.metrics.update(kv_write_gb_s=gb_s, kv_write_bw_frac=frac)

    def rmsnorm(self) -> None:
        from llmesh.kernels.rmsnorm import rmsnorm

        s, t = self.s, self.s.tokens
        x, res = self.randn(t, s.hidden), self.randn(t, s.hidden)  # [T, H]
        w = 1.0 + 0.05 * self.randn(s.hidden)
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        _, gb_s, frac = self.bandwidth(f"rmsnorm T={t}", lambda: rmsnorm(x, w, 1e-5, out=out),
                                       2 * x.numel() * 2 + w.numel() * 2)
        self.metrics.update(rmsnorm_gb_s=gb_s, rmsnorm_bw_frac=frac)
        _, gb_s, frac = self.bandwidth(
            f"rmsnorm+residual T={t}", lambda: rmsnorm(x, w, 1e-5, res, out=out, residual_out=res_out),
            4 * x.numel() * 2 + w.numel() * 2)
        self.metrics.update(rmsnorm_residual_gb_s=gb_s, rmsnorm_residual_bw_frac=frac)

    def silu_and_mul(self) -> None:
        from llmesh.kernels.activation import silu_and_mul

        s, t = self.s, self.s.tokens
        x = self.randn(t, 2 * s.intermediate)  # [T, 2I]: gate then up
        out = torch.empty(t, s.intermediate, device=self.device, dtype=self.dtype)
        _, gb_s, frac = self.bandwidth(f"silu_and_mul T={t}", lambda: silu_and_mul(x, out=out),
                                       x.numel() * 2 + out.numel() * 2)
        self.metrics.update(silu_mul_gb_s=gb_s, silu_mul_bw_frac=frac)

    def rope(self) -> None:
        from llmesh.kernels.rope import rope_cos_sin_cache, rotary_embedding

        s, t = self.s, self.s.tokens
        max_pos = 8192
        cache = rope_cos_sin_cache(s.head_dim, 500000.0, None, max_pos, device=self.device)  # [P, D] float32
        positions = torch.randint(0, max_pos, (t,), generator=self.gen, device=self.device)
        q, k = self.randn(t, s.h_q, s.head_dim), self.randn(t, s.h_kv, s.head_dim)
        # In place, as the model applies it; rotating again each call changes no byte count.
        fn = lambda: rotary_embedding(positions, q, k, cache, q_out=q, k_out=k)  # noqa: E731
        nbytes = 2 * (q.numel() + k.numel()) * 2 + t * s.head_dim * 4 + t * 8
        _, gb_s, frac = self.bandwidth(f"rope T={t}", fn, nbytes)
        self.metrics.update(rope_gb_s=gb_s, rope_bw_frac=frac)

    def argmax(self) -> None:
        from llmesh.kernels.argmax import argmax_rows

        vocab = 1000 if self.smoke else 128256
        for n in (1, 8) if self.smoke else (1, 8, 64, 256):
            logits = torch.randn(n, vocab, generator=self.gen, device=self.device, dtype=torch.float32)
            assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
            for name, fn in (("ours", lambda: argmax_rows(logits)), ("torch", lambda: logits.argmax(dim=-1))):
                ms, gb_s, frac = self.bandwidth(f"argmax {name} N={n}", fn, logits.numel() * 4)
                self.metrics[f"argmax_us_{name}_n{n}"] = ms * 1e3
                self.metrics[f"argmax_bw_frac_{name}_n{n}"] = frac

    def print_table(self) -> None:
        print(f"\n{'kernel':<28}{'ms':>10}{'rate':>12}  {'unit':<8}{'of ceiling':>10}")
        for r in self.rows:
            frac = f"{r.frac:.2f}" if r.frac is not None else ""
            print(f"{r.name:<28}{r.ms:>10.4f}{r.rate:>12.4g}  {r.unit:<8}{frac:>10}")
        print(f"(ceilings: copy {self.copy_gb_s / 1e3:.3f} TB/s, bf16 GEMM {self.gemm_tflops:.1f} TFLOP/s)\n",
              flush=True)


PARTS = {"decode": "decode_attention", "prefill": "prefill_attention", "causal": "causal_prefill",
         "unified": "unified_mix", "rope_kv": "rope_kv", "kv_write": "kv_write", "rmsnorm": "rmsnorm",
         "silu_and_mul": "silu_and_mul", "rope": "rope", "argmax": "argmax"}
"""--parts name -> KernelBench method."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes; on a machine without CUDA through TRITON_INTERPRET=1 (CPU check)")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    ap.add_argument("--parts", default=None,
                    help="comma-separated subset of: " + ", ".join(PARTS) + " (default: all)")
    ap.add_argument("--suffix", default="", help="appended to the result file's name (a run of some parts)")
    args = ap.parse_args()
    parts = args.parts.split(",") if args.parts else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    device = pick_device(args.device)
    if device.type != "cuda":
        if not args.smoke:
            ap.error("the kernels need a CUDA device; use --smoke for the CPU interpreter check")
        # Read when the kernel modules are imported (below, lazily), not at this module's import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    shapes = SMOKE if args.smoke else LLAMA3_8B
    t0 = time.perf_counter()
    ceilings = measure_ceilings(device, copy_gib=1 / 16 if args.smoke else 2.0, gemm_n=256 if args.smoke else 8192)
    print(f"[kernels] {device_name(device)}: copy {ceilings['copy_tb_s']:.3f} TB/s, "
          f"gemm {ceilings['gemm_bf16_tflops']:.1f} TFLOP/s ({time.perf_counter() - t0:.1f}s)", flush=True)
    kb = KernelBench(shapes, device, ceilings, args.smoke)
    for name in parts:
        kb.run(name, getattr(kb, PARTS[name]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    kb.print_table()
    workload = {
        "shapes": asdict(shapes), "dtype": "bfloat16",
        "decode": "q [B, H_q, D] over B contexts of equal length, block tables scattered at random over the "
                  "pool, max_seq_len = context; bytes = K+V of every context token + q + out",
        "prefill": "causal, S prompts of T tokens in one launch over the paged pool; flops = 4 T^2 H D / 2 each",
        "causal_prefill": "prefill_attn_gemm_frac_{ours,dispatched,dispatched_out,fa3,fa3_batched,fa4,cudnn,flash,"
                          "triton}_{case}: "
                          "case c{ctx} = causal_tokens // ctx prompts of ctx tokens, case mixed = lognormal "
                          "lengths (shapes.causal_mixed: median, sigma, min, max) up to causal_tokens; no cached "
                          "prefix; ours reads the paged pool, the others dense k/v with the offsets on the "
                          "device (dispatched = dense_causal_attention's rule); flops = 4 L^2 H D / 2 a prompt; "
                          "prefill_attn_gemm_frac = the dispatched mean over the c{ctx} cases; each figure the "
                          "median of causal_rounds rounds over all implementations in turn",
        "causal_dispatch": kb.dispatch,
        "dense_causal_table": dense_table_literal(kb) if kb.dense_table else None,
        "extend": "extend_attn_gemm_frac_{ours,fa3,dispatched}_x{cached}_{new} (and _ms): shapes.extend_cases "
                  "(cached, new, sequences), the new tokens' K/V in the pool, causal; ours = the paged prefill "
                  "kernel, fa3 = FlashAttention-3 over the contexts gathered out of the pool; flops = "
                  "4 H D (new cached + new (new + 1) / 2) a sequence",
        "extend_table": extend_table_literal(kb) if kb.extend_table else None,
        "causal_rounds": kb.causal_rounds,
        "causal_round_fracs": kb.causal_round_fracs,
        "unified": "mix_decodes decodes (context uniform in mix_ctx) + one mix_chunk-token fresh prefill chunk in "
                   "one unified_attention call, and the same at mix_short (decodes, context range, chunk; "
                   "metrics with _short); bytes = K+V of every context token + q + out; split = "
                   "paged_decode_attention + prefill_attention on the same batch",
        "elementwise": "T tokens; bytes = inputs read once + outputs written once; rope in place",
        "argmax": "float32 logits [N, vocab]; bytes = the logits read once",
        "timing": "triton.testing.do_bench median (L2 flushed before each call); smoke: CPU wall clock",
        "failed": kb.failed, "parts": parts, "software": software_versions(), "smoke": args.smoke,
    }
    path = write_result(f"kernels_{device_tag(device)}{args.suffix}", workload, rounded(kb.metrics),
                        device=device_name(device), results_dir=results_dir_for(args))
    print(f"[kernels] wrote {path} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 1 if kb.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

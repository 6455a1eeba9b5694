"""The causal-prefill part of bench/kernels_gpu.py (prefill_attn_gemm_frac): prompts with no cached
prefix, every backend dense_causal_attention can dispatch to, timed as the engine calls them.

Cases: `c{ctx}`, causal_tokens // ctx prompts of ctx tokens each (the headline's contexts), and
`mixed`, prompts of the offline workload's lengths (lognormal, Shapes.causal_mixed) up to
causal_tokens in all: the engine's prefill steps, where lengths differ and cuDNN makes one call
per prompt. Implementations: ours (the paged Triton prefill kernel over a scattered pool), the
dispatched path with and without `out`, and each backend forced: fa3 (FlashAttention-3, where the
fa3-fwd package loads; fa3_batched: its non-varlen form, equal lengths only), fa4, cudnn, flash
(torch SDPA's) and triton (the dense path's own launch). Each figure is the median of
`causal_rounds` rounds over all of them in turn. The fastest of fa3 / fa3_batched / cudnn /
triton per case is printed as the `DENSE_CAUSAL_BACKEND` literal for
llmesh/kernels/dense_causal_attention.py, keyed by the case's mean prompt length bucket (mixed:
half the smallest context).

Extend cases `x{cached}_{new}` (Shapes.extend_cases): chunks after a cached prefix, the paged
kernel against FlashAttention-3 over the gathered contexts, the faster printed as the
`EXTEND_BACKEND` literal for llmesh/kernels/extend_attention.py.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import torch

from kernels_shapes import Row

if TYPE_CHECKING:
    from kernels_gpu import KernelBench

TABLE_CANDIDATES = ("fa3", "fa3_batched", "cudnn", "triton")
"""The backends DENSE_CAUSAL_BACKEND may name (fa4 and flash stay forced-only: see the module doc)."""


def mixed_lengths(median: int, sigma: float, lo: int, hi: int, total: int, seed: int = 0) -> list[int]:
    """Prompt lengths drawn lognormal around `median` (clipped to [lo, hi]) until they sum to
    `total` (the last one cut to fit)."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        n = int(round(median * float(torch.exp(sigma * torch.randn((), generator=gen)))))
        lengths.append(min(max(n, lo), hi, total - sum(lengths)))
    return lengths


def causal_prefill(kb: KernelBench) -> None:
    """prefill_attn_gemm_frac_{name}_{case}: TFLOP/s over the GEMM ceiling per implementation
    and case; the means over the equal-length contexts without the case suffix; the headline
    prefill_attn_gemm_frac = the dispatched mean."""
    s = kb.s
    cases = [(f"c{ctx}", [ctx] * max(1, s.causal_tokens // ctx), ctx) for ctx in s.causal_contexts]
    cases.append(("mixed", mixed_lengths(*s.causal_mixed, s.causal_tokens), min(s.causal_contexts) // 2))
    fracs: dict[str, list[float]] = {}
    for case, lengths, bucket in cases:
        times = _time_case(kb, case, lengths)
        flops = sum(4 * n * n * s.h_q * s.head_dim / 2 for n in lengths)
        for name, ms_rounds in times.items():
            ms = statistics.median(ms_rounds)
            kb.causal_round_fracs.setdefault(name, {})[case] = [
                round(flops / (x * 1e-3) / 1e12 / kb.gemm_tflops, 4) for x in ms_rounds]
            tflops = flops / (ms * 1e-3) / 1e12
            frac = tflops / kb.gemm_tflops
            kb.rows.append(Row(f"causal {name} {len(lengths)}x{case}", ms, tflops, "TFLOP/s", frac))
            kb.metrics[f"prefill_attn_gemm_frac_{name}_{case}"] = frac
            kb.metrics[f"prefill_attn_tflops_{name}_{case}"] = tflops
            if case != "mixed":
                fracs.setdefault(name, []).append(frac)
        medians = {name: statistics.median(times[name]) for name in TABLE_CANDIDATES if name in times}
        if medians:
            kb.dense_table[bucket] = min(medians, key=medians.get)
    for name, values in fracs.items():
        if len(values) == len(s.causal_contexts):
            kb.metrics[f"prefill_attn_gemm_frac_{name}"] = sum(values) / len(values)
    from llmesh.kernels.fa3 import fa3_unavailable_reason

    kb.dispatch["fa3"] = fa3_unavailable_reason() or "loaded"
    if "prefill_attn_gemm_frac_dispatched" in kb.metrics:
        kb.metrics["prefill_attn_gemm_frac"] = kb.metrics["prefill_attn_gemm_frac_dispatched"]
    print("# paste into llmesh/kernels/dense_causal_attention.py\n" + dense_table_literal(kb), flush=True)
    for cached, new, n in s.extend_cases:
        _extend_case(kb, cached, new, n)
    print("# paste into llmesh/kernels/extend_attention.py\n" + extend_table_literal(kb), flush=True)
    _extend_case(kb, *s.extend_cases[len(s.extend_cases) // 2], fp8=True)  # FA3 over a dequantized FP8 pool


def dense_table_literal(kb: KernelBench) -> str:
    from gpu_ceilings import device_tag

    return f"DENSE_CAUSAL_BACKEND[{device_tag(kb.device)!r}] = {dict(sorted(kb.dense_table.items()))!r}"


def extend_table_literal(kb: KernelBench) -> str:
    from gpu_ceilings import device_tag

    return f"EXTEND_BACKEND[{device_tag(kb.device)!r}] = {dict(sorted(kb.extend_table.items()))!r}"


def _extend_case(kb: KernelBench, cached: int, new: int, n: int, fp8: bool = False) -> None:
    """extend_attn_gemm_frac_{ours,fa3,dispatched}_x{cached}_{new}: n sequences of `cached` tokens
    already in the pool and `new` more (their K/V written too), causal; ours is the paged Triton
    kernel, fa3 FlashAttention-3 over the contexts gathered out of the pool (extend_attention's
    "fa3"), dispatched its auto choice. The faster of fa3 / ours goes into EXTEND_BACKEND under
    `new` (the mean new tokens a sequence). fp8: an FP8 pool with its scales (case suffix _fp8),
    not entered in the table."""
    from llmesh.kernels import fa3
    from llmesh.kernels.extend_attention import extend_attention
    from llmesh.kernels.prefill_attention import prefill_attention

    s = kb.s
    scale = s.head_dim ** -0.5
    ctx = cached + new
    nb = -(-ctx // s.block_size)
    k_cache, v_cache = kb.paged_pool(n * nb + 1)
    scales = {}
    if fp8:
        k_cache, v_cache = (x.clamp(-448, 448).to(torch.float8_e4m3fn) for x in (k_cache, v_cache))
        exps = torch.full(k_cache.shape[:3], 127, dtype=torch.uint8, device=kb.device)  # scale 1
        scales = dict(k_scales=exps, v_scales=exps.clone())
    tables = kb.scattered_tables(n * nb + 1, n, nb)
    q = kb.randn(n * new, s.h_q, s.head_dim)
    out = torch.empty_like(q)
    qsl_host = list(range(0, n * new + 1, new))
    lens_host = [ctx] * n
    qsl = torch.tensor(qsl_host, dtype=torch.int32, device=kb.device)
    seq_lens = torch.tensor(lens_host, dtype=torch.int32, device=kb.device)
    flops = n * 4 * s.h_q * s.head_dim * (new * cached + new * (new + 1) / 2)

    def ext(backend: str):
        return lambda: extend_attention(q, k_cache, v_cache, tables, qsl, seq_lens, scale,
                                        host_query_start_loc=qsl_host, host_seq_lens=lens_host, out=out,
                                        backend=backend, **scales)

    impls = {"ours": lambda: prefill_attention(q, k_cache, v_cache, tables, qsl, seq_lens, scale, out=out,
                                               max_query_len=new, **scales),
             "dispatched": ext("auto")}
    if fa3.fa3_forward() is not None:
        impls["fa3"] = ext("fa3")
    case = f"x{cached}_{new}" + ("_fp8" if fp8 else "")
    times = _rounds(kb, impls, f"extend {case}")
    for name, ms_rounds in times.items():
        ms = statistics.median(ms_rounds)
        tflops = flops / (ms * 1e-3) / 1e12
        kb.rows.append(Row(f"extend {name} {n}x{case}", ms, tflops, "TFLOP/s", tflops / kb.gemm_tflops))
        kb.metrics[f"extend_attn_gemm_frac_{name}_{case}"] = tflops / kb.gemm_tflops
        kb.metrics[f"extend_attn_ms_{name}_{case}"] = ms
    medians = {("triton" if name == "ours" else name): statistics.median(times[name])
               for name in ("ours", "fa3") if name in times}
    if medians and not fp8:
        kb.extend_table[new] = min(medians, key=medians.get)
    del k_cache, v_cache, q, out


def _rounds(kb: KernelBench, impls: dict, label: str) -> dict[str, list[float]]:
    """Each implementation's milliseconds per round, rounds over all of them in turn (each figure
    is then their median: one pass's figures moved by up to a tenth between passes, clocks, the
    same cuDNN call included). An implementation that raises (a backend this torch / GPU lacks,
    a library refusing the shapes) is dropped with its reason printed."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(kb.causal_rounds):
        for name, fn in impls.items():
            if name in times:
                try:
                    times[name].append(kb.time(fn))
                except Exception as e:  # noqa: BLE001 - reported, the others go on
                    print(f"[kernels] {label} {name}: {str(e)[:200]}", flush=True)
                    del times[name]
    return times


def _time_case(kb: KernelBench, case: str, lengths: list[int]) -> dict[str, list[float]]:
    """Each implementation's milliseconds per round on prompts of these lengths."""
    from llmesh.kernels.dense_causal_attention import _gqa_expand, choose_backend, dense_causal_attention, fa4_forward
    from llmesh.kernels.fa3 import fa3_forward
    from llmesh.kernels.prefill_attention import prefill_attention

    s = kb.s
    scale = s.head_dim ** -0.5
    n, t, width = len(lengths), sum(lengths), max(lengths)
    nb = -(-width // s.block_size)
    k_cache, v_cache = kb.paged_pool(n * nb + 1)
    tables = kb.scattered_tables(n * nb + 1, n, nb)
    q = kb.randn(t, s.h_q, s.head_dim)  # q: [T, H_q, D]
    k, v = kb.randn(t, s.h_kv, s.head_dim), kb.randn(t, s.h_kv, s.head_dim)  # dense [T, H_kv, D]
    out = torch.empty_like(q)
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    qsl = torch.tensor(starts, dtype=torch.int32, device=kb.device)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=kb.device)
    # The library backends are called as the engine calls them: no `out` (a batch of equal
    # lengths then returns SDPA's own output instead of copying it), the offsets on the device.
    impls = {
        "ours": lambda: prefill_attention(q, k_cache, v_cache, tables, qsl, seq_lens, scale, out=out,
                                          max_query_len=width),
        "dispatched": lambda: dense_causal_attention(q, k, v, starts, scale, cu_seqlens=qsl),
        "dispatched_out": lambda: dense_causal_attention(q, k, v, starts, scale, out=out, cu_seqlens=qsl),
    }
    backends = ["triton"]
    if kb.device.type == "cuda":
        backends += ["cudnn", "flash"] + (["fa4"] if fa4_forward() is not None else [])
        if fa3_forward() is not None:  # the batched form only where every prompt has the same length
            backends += ["fa3"] + (["fa3_batched"] if len(set(lengths)) == 1 else [])
    for backend in backends:
        impls[backend] = (lambda b: lambda: dense_causal_attention(q, k, v, starts, scale, backend=b,
                                                                   cu_seqlens=qsl))(backend)
    times = _rounds(kb, impls, f"causal prefill {case}")
    kb.dispatch[case] = choose_backend(q, s.h_q // s.h_kv, lengths)
    # Whether cuDNN took the grouped K/V as they are or they were expanded to the query heads.
    kb.dispatch["cudnn_gqa"] = "expanded" if any(key[0] == "cudnn" for key in _gqa_expand) else "native"
    return times

"""The shapes bench/kernels_gpu.py times (Llama-3-8B's, and tiny ones for --smoke) and the rows
of its printed table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shapes:
    h_q: int
    h_kv: int
    head_dim: int
    block_size: int
    hidden: int
    intermediate: int
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    main: tuple[int, int]
    """(context, batch) of the headline decode figure and of the torch-reference comparison."""
    prefill_seqs: int
    prefill_len: int
    tokens: int
    """T of the elementwise kernels."""
    causal_contexts: tuple[int, ...]
    """Prompt lengths of the prefill_attn_gemm_frac figures (prompts of equal length)."""
    causal_tokens: int
    """Tokens per call there: tokens // context prompts (at least one)."""
    causal_mixed: tuple[int, float, int, int]
    """(median, sigma, min, max) of the mixed case's lognormal prompt lengths: the offline
    workload's prompts (bench/decode_gpu.py), causal_tokens of them in one call."""
    extend_cases: tuple[tuple[int, int, int], ...]
    """(cached tokens, new tokens, sequences) of the extend figures: chunks after a cached prefix
    (a prefix-cache hit's short question, a chunked prompt's later chunks)."""
    mix_decodes: int
    mix_ctx: tuple[int, int]
    """Decode contexts of the unified-attention mix, uniform in [lo, hi]."""
    mix_chunk: int
    """New tokens of the mix's one prefill chunk (no cached prefix)."""
    mix_short: tuple[int, tuple[int, int], int]
    """(decodes, context range, chunk) of a second mix at the offline workload's short contexts
    (metrics with _short): a mixed step of the 1,000-prompt run, where the decodes' contexts are a
    few hundred tokens and the unified kernel read at 0.68 of the copy bandwidth in attn_sweep's
    mixed part."""


LLAMA3_8B = Shapes(h_q=32, h_kv=8, head_dim=128, block_size=16, hidden=4096, intermediate=14336,
                   contexts=(2048, 4096, 8192), batches=(16, 32, 64), main=(4096, 32),
                   prefill_seqs=4, prefill_len=2048, tokens=8192, causal_contexts=(1024, 2048, 4096, 8192),
                   causal_tokens=16384, causal_mixed=(200, 0.6, 16, 1024),
                   extend_cases=((1024, 128, 128), (1024, 1024, 16), (4096, 4096, 4)),
                   mix_decodes=256, mix_ctx=(512, 2048), mix_chunk=256,
                   mix_short=(255, (150, 450), 400))
SMOKE = Shapes(h_q=4, h_kv=2, head_dim=32, block_size=16, hidden=64, intermediate=96,
               contexts=(64, 600), batches=(1, 2), main=(600, 2), prefill_seqs=2, prefill_len=40, tokens=16,
               causal_contexts=(32, 64), causal_tokens=64, causal_mixed=(20, 0.6, 4, 48),
               extend_cases=((32, 8, 4), (40, 24, 2)),
               mix_decodes=4, mix_ctx=(16, 80), mix_chunk=24,
               mix_short=(3, (16, 48), 24))


@dataclass
class Row:
    """One line of the printed table."""

    name: str
    ms: float
    rate: float
    unit: str
    frac: float | None

"""Perplexity of a model over a local text file, through the engine's own forward pass.

The text is tokenized once and cut into non-overlapping windows; each window runs as one
prefill through the same runner, kernels and (quantized) weights that serve requests, with
logits for every position, and the negative log-likelihood of each next token is summed.
Comparing variants (full precision vs int8 / int4 / fp8 / GGUF blocks) on the same windows
gives the quality cost of each format: ``delta = ppl_variant / ppl_reference - 1``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llmesh.engine.llm import build_engine_config
from llmesh.engine.llm_engine import LLMEngine
from llmesh.kernels.paged_attention import AttentionMetadata

LOGIT_ROWS = 256
"""Positions whose float32 logits are materialised at once (vocab 128k x 256 = 128 MiB)."""


@dataclass(frozen=True)
class PerplexityResult:
    variant: str
    """The quantization asked for (none, int8, int4, fp8, gguf, ...)."""
    served: str
    """What the engine resolved it to."""
    perplexity: float
    mean_nll: float
    tokens: int
    """Predicted tokens (each window's first token has no context and is not scored)."""
    windows: int
    weight_bytes: int
    seconds: float


def _metadata(runner, n: int) -> AttentionMetadata:
    """Attention metadata for one sequence of n new tokens in blocks 0.. of the pool."""
    dev, bs = runner.device, runner.block_size
    blocks = -(-n // bs)
    return AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None, :],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev), max_query_len=n, max_seq_len=n,
        host_query_start_loc=[0, n], host_seq_lens=[n])


@torch.inference_mode()
def window_nll(runner, ids: Sequence[int]) -> float:
    """Sum of -log p(ids[t+1] | ids[..t]) over one window, on an otherwise idle runner."""
    n = len(ids)
    if -(-n // runner.block_size) > runner.num_blocks:
        raise ValueError(f"a window of {n} tokens needs more than the runner's {runner.num_blocks} KV blocks")
    tokens = torch.tensor(ids, dtype=torch.int64, device=runner.device)
    positions = torch.arange(n, dtype=torch.int64, device=runner.device)
    meta = _metadata(runner, n)
    model = runner.model
    hidden = model.forward(tokens, positions, runner.kv_caches, meta, runner.kv_scales)
    total = 0.0
    for start in range(0, n - 1, LOGIT_ROWS):
        stop = min(start + LOGIT_ROWS, n - 1)
        logits = model.compute_logits(hidden[start:stop]).float()     # [rows, vocab]
        logprobs = torch.log_softmax(logits, dim=-1)
        total -= logprobs.gather(1, tokens[start + 1:stop + 1, None]).sum().item()
    return total


def evaluate(engine: LLMEngine, token_ids: Sequence[int], window: int, variant: str,
             progress: Callable[[str], None] | None = None) -> PerplexityResult:
    t0 = time.perf_counter()
    nll, scored, windows = 0.0, 0, 0
    for start in range(0, len(token_ids) - 1, window):
        ids = token_ids[start:start + window]
        if len(ids) < 2:
            break
        nll += window_nll(engine.runner, ids)
        scored += len(ids) - 1
        windows += 1
        if progress is not None:
            progress(f"{variant}: window {windows}, {scored} tokens, running ppl {math.exp(nll / scored):.4f}")
    if scored == 0:
        raise ValueError("the text has fewer than 2 tokens; nothing to score")
    return PerplexityResult(variant=variant, served=engine.quantization.name, perplexity=math.exp(nll / scored),
                            mean_nll=nll / scored, tokens=scored, windows=windows,
                            weight_bytes=engine.runner.weight_bytes,
                            seconds=time.perf_counter() - t0)


AWQ_SUFFIX = "-awq"
"""A variant ``<format>-awq`` (int4-awq, int8-awq) is that format quantized activation-aware."""


def variant_options(variant: str) -> dict:
    """Engine options of a variant name: a quantization, or <format>-awq."""
    if variant.endswith(AWQ_SUFFIX):
        return {"quantization": variant[: -len(AWQ_SUFFIX)], "activation_aware": True}
    return {"quantization": variant}


def perplexity_sweep(model: str, text: str, variants: Sequence[str], *, window: int = 512,
                     max_tokens: int | None = None, backend: str = "torch", device: str = "auto",
                     dtype: str = "auto", progress: Callable[[str], None] | None = None) -> list[PerplexityResult]:
    """One engine per variant, built for scoring only (a KV pool of one window, no graphs),
    over the same token ids."""
    results: list[PerplexityResult] = []
    token_ids: list[int] | None = None
    for variant in variants:
        if progress is not None:
            progress(f"{variant}: loading {model}")
        cfg = build_engine_config(model, **variant_options(variant), backend=backend, device=device, dtype=dtype,
                                  num_kv_blocks=-(-window // 16) + 1, max_model_len=max(window, 2),
                                  max_num_batched_tokens=max(window, 2048), cuda_graphs=False)
        engine = LLMEngine(cfg)
        if token_ids is None:
            token_ids = engine.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        results.append(evaluate(engine, token_ids, window, variant, progress))
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def relative_deltas(results: Sequence[PerplexityResult], reference: str) -> dict[str, float]:
    """variant → ppl / ppl(reference) - 1."""
    ref = next((r for r in results if r.variant == reference), None)
    if ref is None:
        raise ValueError(f"no result for the reference variant {reference!r}")
    return {r.variant: r.perplexity / ref.perplexity - 1.0 for r in results if r.variant != reference}

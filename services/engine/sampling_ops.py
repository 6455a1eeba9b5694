"""Batched tensor operations behind the sampler: penalties, filters, the race, logprobs.

Every function works on a whole batch of rows at once (``[R, V]`` logits, one
parameter per row, as an ``[R]`` tensor or a host list where the list picks a cheaper
path) and never reads a value back from the device, so the host never waits on it
mid-step. The sampler decides which rows go through which function; these functions
only do the maths.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch

from llmesh.kernels.common import interpreting


def to_device(
    values: Sequence | np.ndarray, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Host values (a list or a numpy array) as a tensor on ``device`` without stalling the host.

    A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory and
    waits for the stream to drain — a full synchronisation per parameter tensor. Going
    through pinned memory makes the copy asynchronous; the caching host allocator keeps
    the pinned buffer alive until the copy has run.
    """
    host = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax ([N, V] → [N] int64; ties → lowest id). On a GPU the split-row kernel
    (llmesh/kernels/argmax.py: torch reduces a row in one block, 27 µs for a 128k vocabulary in a
    profiled H200 step, bench/kernel_profile.py), elsewhere torch's, which equals it."""
    if (logits.is_cuda and not interpreting() and logits.stride(-1) == 1
            and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        from llmesh.kernels.argmax import argmax_rows  # imports Triton: only where it runs

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def unique_token_ids(token_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """The distinct ids of a token list as a 1-D long tensor on ``device``.

    The sampler caches this per prompt: a prompt never changes, and converting a long
    prompt from a Python list every step would cost more than the penalties themselves.
    """
    return to_device(np.unique(np.asarray(token_ids, dtype=np.int64)), torch.long, device)


def _flat_cells(rows: torch.Tensor, token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Flat indices into a ``[R, V + 1]`` buffer for (row, token) pairs.

    Column V absorbs ids outside the vocabulary: they are never valid, and an
    out-of-range scatter would take down the whole batch (a device-side assert on a GPU).
    """
    valid = (token_ids >= 0) & (token_ids < vocab)
    return rows * (vocab + 1) + token_ids.masked_fill(~valid, vocab)


def count_tokens(token_ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[R, V]`` int32: how often each id occurs in each row's list, built with one flat
    scatter. Ids outside the vocabulary are not counted (see ``_flat_cells``)."""
    num_rows = len(token_ids)
    lengths = [len(t) for t in token_ids]
    host = np.empty((2, sum(lengths)), dtype=np.int64)  # [2, T]: row, token
    host[0] = np.repeat(np.arange(num_rows), lengths)
    host[1] = np.fromiter(chain.from_iterable(token_ids), dtype=np.int64, count=host.shape[1])
    rows, tokens = to_device(host, torch.long, device)
    counts = torch.zeros(num_rows * (vocab + 1), dtype=torch.int32, device=device)
    counts.scatter_add_(0, _flat_cells(rows, tokens, vocab), torch.ones_like(tokens, dtype=torch.int32))
    return counts.view(num_rows, vocab + 1)[:, :vocab]


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: Sequence[torch.Tensor],
    output_counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Penalised copy of ``logits`` (as vLLM: repetition first, then presence/frequency).

    Repetition (HF/CTRL style) covers prompt and output tokens: a positive logit is
    divided by the penalty, any other multiplied, so > 1 always makes the token less
    likely. Presence and frequency (OpenAI style) cover generated tokens only.

    ``prompt_ids`` are per-row device tensors (duplicates allowed), concatenated rather
    than padded, so one long prompt does not make the whole batch pay for its length;
    ``output_counts`` [R, V] says how often each row generated each token so far (the
    sampler keeps it on the device, so no output token has to come from the host).
    """
    # logits: [R, V]; output_counts: [R, V]; repetition / presence / frequency: [R]
    num_rows, vocab = logits.shape
    device = logits.device
    output_counts = output_counts.to(logits.dtype)

    # seen: [R, V] — token occurs in prompt or output
    prompt_tokens = torch.cat(list(prompt_ids)).to(device=device, dtype=torch.long)  # [P]
    prompt_rows = torch.repeat_interleave(
        torch.arange(num_rows, device=device),
        to_device([p.numel() for p in prompt_ids], torch.long, device),
        output_size=prompt_tokens.numel(),  # known on the host: no read-back
    )
    seen = torch.zeros(num_rows * (vocab + 1), dtype=torch.bool, device=device)
    seen.scatter_(0, _flat_cells(prompt_rows, prompt_tokens, vocab), True)
    seen = seen.view(num_rows, vocab + 1)[:, :vocab] | (output_counts > 0)

    rep = repetition.unsqueeze(1)  # [R, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency.unsqueeze(1) * output_counts
    return logits - presence.unsqueeze(1) * (output_counts > 0).to(logits.dtype)


def filter_keep_mask(
    scaled: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> torch.Tensor | None:
    """Which tokens survive top-k → top-p → min-p, in vocabulary order; None if all do.

    ``scaled`` holds temperature-scaled logits, one parameter per row in host lists (so
    the path is chosen without reading the device). Top-k keeps exactly k tokens, ties
    going to the lower id; top-p keeps the smallest prefix of the top-k distribution
    whose mass reaches p; min-p drops tokens under ``min_p`` × the best one's
    probability — a ratio to a token every filter keeps, so it is a threshold on logits
    that needs no renormalisation and no sort. A full sort is paid only when a row uses
    top-p; top-k alone goes through ``topk``. Both paths give the same set for a row,
    so a seeded row's tokens do not depend on its neighbours' filters.
    """
    # scaled: [R, V] -> keep: [R, V] bool
    vocab = scaled.shape[1]
    device = scaled.device
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    keep = None
    if any(p < 1.0 for p in top_p):
        keep = _top_k_top_p_sorted(
            scaled, to_device(ks, torch.long, device), to_device(top_p, torch.float32, device)
        )
    elif any(k < vocab for k in ks):
        keep = _top_k_exact(scaled, ks)
    if any(m > 0.0 for m in min_p):
        log_min_p = torch.log(to_device(min_p, torch.float32, device)).unsqueeze(1)  # log 0 = -inf
        above_min_p = scaled >= scaled.amax(dim=-1, keepdim=True) + log_min_p
        keep = above_min_p if keep is None else keep & above_min_p
    return keep


def _top_k_top_p_sorted(scaled: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p through one stable sort (ties in sorted order by lower id).

    A token is kept while the mass before it is < p, so the best token always survives;
    rows with p = 1 skip the test, so float round-off in the cumsum cannot drop their tail.
    """
    # scaled: [R, V]; k: [R] in [1, V]; top_p: [R]
    vocab = scaled.shape[1]
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True, stable=True)  # [R, V]
    positions = torch.arange(vocab, device=scaled.device).unsqueeze(0)  # [1, V]
    keep = positions < k.unsqueeze(1)  # [R, V], sorted order
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = top_p.unsqueeze(1)
    keep &= (mass_before < p) | (p >= 1.0)
    return torch.empty_like(keep).scatter_(1, sorted_idx, keep)


def _top_k_exact(scaled: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Exactly k tokens per row without a sort: everything above the k-th value, then as
    many tokens equal to it as still fit, lowest ids first — the set a stable sort keeps.
    ``topk`` values are unambiguous even when its indices among ties are not."""
    # scaled: [R, V]; ks: per row, V meaning "keep all"
    vocab = scaled.shape[1]
    max_k = max(k for k in ks if k < vocab)
    k = to_device(ks, torch.long, scaled.device).unsqueeze(1)  # [R, 1]
    kth = scaled.topk(max_k, dim=-1).values.gather(1, k.clamp(max=max_k) - 1)  # [R, 1]
    kth = kth.masked_fill(k >= vocab, float("-inf"))
    above = scaled > kth
    ties = scaled == kth
    room = k - above.sum(dim=-1, keepdim=True)  # [R, 1]
    return above | (ties & (ties.cumsum(dim=-1) <= room))


def exponential_race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row: ``argmax(probs / E)`` with ``E ~ Exp(1)``.

    Token i wins with probability ``probs[i] / sum(probs)`` (the minimum of independent
    exponentials with rates ``probs`` is attained at i with that probability), so one
    argmax samples every row at once, and each row's outcome depends only on its own
    noise — which is what lets a seeded row ignore the rest of the batch.
    """
    # probs, noise: [R, V] -> [R]
    tiny = torch.finfo(noise.dtype).tiny
    return (probs / noise.clamp_min(tiny)).argmax(dim=-1)


def token_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen token's logprob and rank, and the ``num_top`` best (id, logprob) pairs.

    The rank counts tokens strictly more likely than the chosen one, plus one, so a
    greedy pick is always rank 1 even when it ties with another token.
    """
    # logprobs: [R, V] (log_softmax); token_ids: [R]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [R, 1]
    rank = (logprobs > chosen).sum(dim=-1) + 1  # [R]
    top_lps, top_ids = logprobs.topk(num_top, dim=-1)  # [R, K] best first
    return chosen.squeeze(1), rank, top_ids, top_lps

"""Rejection sampling: which drafts the target keeps, so its distribution is kept exactly.

The verify pass samples a token ``x_i`` at every verify position i (0..k) from the
target's distribution ``p_i`` as the sampler would without speculation (same grammar
mask, bias, penalties that count the drafts before i, temperature and filters, same
generator), where ``p_i`` assumes drafts 0..i-1 were accepted.

Deterministic drafts (n-gram lookups, a greedy draft model: q is one-hot on the draft
``d_i``) need nothing else: accept ``d_i`` iff ``x_i == d_i``. That accepts with
probability ``p_i(d_i)`` = min(1, p/q), and on a mismatch ``x_i`` is distributed as p_i
with d_i removed and renormalised = the residual max(0, p - q) normalised — the standard
rule. Under greedy decoding ``x_i`` is the argmax, so this is "accept while the drafts
equal the target's argmax, then emit the target's token".

Sampled drafts (q a real distribution) go through ``rejection_sample``: accept with
probability min(1, p/q), else draw from the normalised residual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accept_deterministic(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """The tokens a verify step emits: the drafts while each equals the target's sample at
    its position, then the target's sample at the first mismatch (or the bonus position
    after the last draft). ``sampled`` has ``len(drafts) + 1`` entries."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return [*drafts[:a], sampled[a]]


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, drafts: Sequence[int],
                     uniform: torch.Tensor, residual_noise: torch.Tensor) -> list[int]:
    """Emitted tokens for drafts drawn from ``draft_probs``.

    target_probs: [k + 1, V] (row k is the bonus position); draft_probs: [k, V];
    uniform: [k] in [0, 1); residual_noise: [k + 1, V] Exp(1) draws for the exponential
    race that samples a residual (or the bonus) row.
    """
    k = len(drafts)
    ids = torch.as_tensor(list(drafts), dtype=torch.long, device=target_probs.device)
    p = target_probs[:k].gather(1, ids.unsqueeze(1)).squeeze(1)  # [k]
    q = draft_probs.gather(1, ids.unsqueeze(1)).squeeze(1)       # [k]
    accept = (uniform * q < p).tolist()  # u < p/q without dividing by a zero q
    a = 0
    while a < k and accept[a]:
        a += 1
    if a < k:
        row = (target_probs[a] - draft_probs[a]).clamp_min(0.0)
        if float(row.sum()) <= 0.0:  # p == q: the residual is empty, p itself is exact
            row = target_probs[a]
    else:
        row = target_probs[k]
    tiny = torch.finfo(residual_noise.dtype).tiny
    last = int((row / residual_noise[a].clamp_min(tiny)).argmax())
    return [*list(drafts[:a]), last]

"""Prompt logprobs: the log-probability of each prompt token given the tokens before it.

A prefill chunk's hidden state at position i predicts token i + 1, so a chunk of a request
that asked for ``prompt_logprobs`` yields the logprobs of the prompt tokens its positions
predict (the chunk's last position predicts the next chunk's first token, known already;
the prompt's last position predicts the first generated token, which the sampler reports).
Everything is queued on the device with the step; the host reads it back in
``PromptLogprobs.to_host`` when the step lands, so async scheduling is not held up.

Rows go through the LM head in slices: a 2,048-token chunk against a 128k vocabulary would
otherwise need a gigabyte of float32 logits at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llmesh.engine.outputs import TokenLogprob
from llmesh.engine.request import Request
from llmesh.engine.sampling_ops import to_device, token_logprobs
from llmesh.engine.scheduler_output import SchedulerOutput

ROWS_PER_SLICE = 256
"""Prompt positions sent through the LM head at once."""


@dataclass(frozen=True)
class PromptSpan:
    """Positions of one chunk whose next token is a prompt token."""

    request: Request
    first_target: int
    """Index in the prompt of the token the span's first position predicts (≥ 1)."""
    flat_start: int
    """Flat index of that position in the step's tokens."""
    length: int


def plan_prompt_logprobs(scheduled: SchedulerOutput, query_start_loc: np.ndarray) -> list[PromptSpan]:
    """The spans of this step that predict prompt tokens, for requests that asked for them."""
    spans = []
    for s, c in enumerate(scheduled.chunks):
        req = c.request
        if req.sampling_params.prompt_logprobs is None:
            continue
        end = min(c.start_pos + c.num_new_tokens, req.num_prompt_tokens - 1)  # last predictor of a prompt token
        if end > c.start_pos:
            spans.append(PromptSpan(req, c.start_pos + 1, int(query_start_loc[s]), end - c.start_pos))
    return spans


class PromptLogprobs:
    """One step's prompt logprobs, computed on the device, read back on demand."""

    def __init__(self, spans: list[PromptSpan], hidden: torch.Tensor,
                 compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        # hidden: [T, H] the step's final hidden states (T ≥ every span's end)
        self.spans = spans
        self.num_top = max(sp.request.sampling_params.prompt_logprobs for sp in spans)
        flat = np.concatenate([np.arange(sp.flat_start, sp.flat_start + sp.length) for sp in spans])
        targets = np.concatenate([sp.request.prompt_token_ids[sp.first_target:sp.first_target + sp.length]
                                  for sp in spans])
        device = hidden.device
        flat_t, targets_t = to_device(flat, torch.long, device), to_device(targets, torch.long, device)
        parts = []
        for i in range(0, len(flat), ROWS_PER_SLICE):
            rows = flat_t[i:i + ROWS_PER_SLICE]
            logprobs = compute_logits(hidden[rows]).float().log_softmax(dim=-1)  # [R, V]
            num_top = min(self.num_top, logprobs.shape[1])
            chosen, rank, top_ids, top_lps = token_logprobs(logprobs, targets_t[i:i + ROWS_PER_SLICE], num_top)
            parts.append(torch.cat([chosen.double().unsqueeze(1), rank.double().unsqueeze(1),
                                    top_ids.double(), top_lps.double().clamp_min(-9999.0)], dim=1))
        self._packed = torch.cat(parts)  # [M, 2 + 2K] float64: ids and ranks exact below 2**53
        self._targets = targets
        self._host: torch.Tensor | None = None
        if device.type == "cuda":
            self._host = torch.empty(self._packed.shape, dtype=torch.float64, pin_memory=True)
            self._host.copy_(self._packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def to_host(self) -> dict[str, tuple[int, list[TokenLogprob]]]:
        """Request id → (prompt index of the first entry, the entries in prompt order)."""
        if self._host is not None:
            self._event.synchronize()
            rows = self._host.tolist()
        else:
            rows = self._packed.tolist()
        k = (len(rows[0]) - 2) // 2 if rows else 0
        out: dict[str, tuple[int, list[TokenLogprob]]] = {}
        i = 0
        for sp in self.spans:
            n_top = min(sp.request.sampling_params.prompt_logprobs, k)
            entries = []
            for j in range(sp.length):
                row = rows[i + j]
                entries.append(TokenLogprob(
                    token_id=int(self._targets[i + j]), logprob=row[0], rank=int(row[1]),
                    top=tuple(zip((int(t) for t in row[2:2 + n_top]), row[2 + k:2 + k + n_top]))))
            out[sp.request.request_id] = (sp.first_target, entries)
            i += sp.length
        return out


def collect(request: Request, first_target: int, entries: list[TokenLogprob]) -> None:
    """Add a chunk's entries to the request's prompt logprobs; positions already collected
    (a chunk recomputed after preemption) are not added twice."""
    have = len(request.prompt_logprobs)  # entries for prompt tokens 1 .. have
    skip = have + 1 - first_target
    if skip < 0:
        raise RuntimeError(f"prompt logprobs of request {request.request_id!r} skipped prompt tokens "
                           f"{have + 1}..{first_target - 1}")
    request.prompt_logprobs.extend(entries[skip:])

"""Pooling: an embedding request's final hidden states → its vector (the one implementation,
shared by every model-runner backend).

An embedding request is a Request with ``pooling`` set. It is scheduled like a prompt
(chunked prefill, prefix cache), never samples and never decodes: the step that computes
its last prompt token also produces its vector, and the engine core then finishes it, so
its KV blocks go back to the pool (full ones stay in the prefix cache) at once.

- ``last`` reads the hidden state of the last prompt token. A prefix hit always leaves the
  last token to compute (``KVCacheManager.get_computed_blocks``), so a fully cached prompt
  still yields it.
- ``mean`` sums every chunk's hidden states into ``request.pooling_state`` (float32, on the
  device) and divides by the prompt length at the last chunk. A chunk that starts at 0
  starts a fresh sum, so a request preempted and recomputed does not count twice. Mean
  requests do not read the prefix cache (``PoolingParams.reads_prefix_cache``).

Vectors are gathered on the device in one [N, H] float32 tensor and copied to the host
once per step; truncation (``dimensions``) and normalization run there on N rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmesh.engine.pooling_params import PoolingParams
from llmesh.engine.request import Request
from llmesh.engine.scheduler_output import ScheduledChunk


@dataclass
class PooledBatch:
    """The vectors of the requests whose prompt ended this step, still on the device."""

    requests: list[Request]
    vectors: torch.Tensor  # [N, H] float32
    _host: torch.Tensor | None = None
    _copied: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Queue the device-to-host copy behind the step's work, without waiting for it."""
        cuda = self.vectors.device.type == "cuda"
        self._host = torch.empty(self.vectors.shape, dtype=torch.float32, pin_memory=cuda)
        self._host.copy_(self.vectors, non_blocking=cuda)
        if cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def to_host(self) -> dict[str, np.ndarray]:
        """Request id → its finished vector (float32); waits for this step's copy only (not
        for a step queued after it)."""
        if self._host is None:
            self.start_copy()
        if self._copied is not None:
            self._copied.synchronize()
        rows = self._host.numpy()
        return {r.request_id: finish_vector(rows[i], r.pooling) for i, r in enumerate(self.requests)}


def has_pooling(chunks: Sequence[ScheduledChunk]) -> bool:
    return any(c.request.pooling is not None for c in chunks)


def pool_step(hidden: torch.Tensor, chunks: Sequence[ScheduledChunk]) -> PooledBatch | None:
    """Pool a step's embedding chunks; the vectors of prompts that end this step, or None.

    hidden: [T', H] the step's final hidden states (after the final norm), the chunks' tokens
    back to back in chunk order (T' ≥ T: rows past the step's T tokens are padding)."""
    done: list[Request] = []
    rows: list[torch.Tensor] = []
    offset = 0
    for c in chunks:
        req, n = c.request, c.num_new_tokens
        params = req.pooling
        if params is not None:
            ends_prompt = c.start_pos + n == req.num_prompt_tokens
            if params.mode == "mean":
                part = hidden[offset: offset + n].float().sum(dim=0)  # [H]
                req.pooling_state = part if c.start_pos == 0 else req.pooling_state + part
                if ends_prompt:
                    rows.append(req.pooling_state / req.num_prompt_tokens)
                    req.pooling_state = None
            elif ends_prompt:
                rows.append(hidden[offset + n - 1].float())  # [H]
            if ends_prompt:
                done.append(req)
        offset += n
    if not done:
        return None
    return PooledBatch(done, torch.stack(rows))  # [N, H]


def finish_vector(vector: np.ndarray, params: PoolingParams) -> np.ndarray:
    """Truncate to ``dimensions`` (Matryoshka) and then L2-normalize, as the params ask."""
    out = np.array(vector[: params.dimensions] if params.dimensions else vector, dtype=np.float32)
    if params.normalize:
        norm = float(np.linalg.norm(out))
        out /= max(norm, 1e-12)  # F.normalize's epsilon: a zero vector stays zero
    return out

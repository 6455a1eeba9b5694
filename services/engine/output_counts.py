"""Per-request output-token counts on the device: what penalties read each step."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmesh.engine.request import Request
from llmesh.engine.sampling_ops import count_tokens, to_device


@dataclass
class _CountsRow:
    request: Request
    slot: int
    tokens: int
    """Output tokens the row holds (-1: not built yet)."""


class OutputTokenCounts:
    """How often each request with a penalty generated each token, kept on the device.

    One ``[slots, V]`` int32 table of at most ``max_rows`` rows (it grows by doubling up to
    that, so it never holds more than ``max_rows * V * 4`` bytes). A request holds a row
    (its slot) from its first penalised step until the scheduler reports it finished
    (``release``: a later owner's rebuild of the slot is queued after every add to it, so
    stream order makes reuse safe). Each step adds the tokens just sampled on the device,
    so a penalty row never waits for the host to learn the previous step's token (async
    scheduling keeps running). Verify rows (speculative decoding) are counted when their
    accepted tokens are known, on the host (``add_host``).

    The host tallies how many tokens each row holds; a row whose tally disagrees with
    the request's own count (a new row, one taken back from a preempted request while
    the table was full, or tokens that came from elsewhere, e.g. a caller of the bare
    sampler) is rebuilt from ``output_token_ids``, which then holds all of them.
    """

    def __init__(self, device: torch.device, max_rows: int = 256) -> None:
        if max_rows < 1:
            raise ValueError(f"sampler: max_rows must be >= 1, got {max_rows}")
        self.device = device
        self.max_rows = max_rows
        self._table: torch.Tensor | None = None  # [S, V] int32, S <= max_rows
        self._rows: collections.OrderedDict[str, _CountsRow] = collections.OrderedDict()
        """request id → its row, least recently sampled first (the order rows are taken back in)."""
        self._free: list[int] = []
        self.rebuilds = 0
        """Rows built from the host's tokens: once per request, unless its row was taken back."""

    @property
    def num_rows(self) -> int:
        """Rows held by requests."""
        return len(self._rows)

    @torch.inference_mode()
    def rows(self, requests: Sequence[Request], vocab: int) -> torch.Tensor:
        """``[R]`` slots of ``requests`` on the device, their rows brought up to date."""
        slots, stale, batch = [], [], set()
        for r in requests:
            row = self._rows.get(r.request_id)
            if row is None or row.request is not r:  # new, or its id now names another request
                slot = self._allocate(vocab, batch) if row is None else row.slot
                row = self._rows[r.request_id] = _CountsRow(r, slot, -1)
            self._rows.move_to_end(r.request_id)
            batch.add(r.request_id)
            # tokens sampled before this step: landed on the host, or still on their way
            # (a step in flight besides this one: num_pending_tokens counts both)
            expected = r.num_output_tokens + max(0, r.num_pending_tokens - 1)
            if row.tokens != expected:
                if expected != r.num_output_tokens:
                    raise RuntimeError(f"sampler: request {r.request_id!r} counts {row.tokens} output tokens "
                                       f"on the device, expected {expected} (some are not on the host yet)")
                stale.append((row.slot, r.output_token_ids))
                row.tokens = expected
            slots.append(row.slot)
        if stale:
            self.rebuilds += len(stale)
            idx = to_device([slot for slot, _ in stale], torch.long, self.device)
            self._table[idx] = count_tokens([ids for _, ids in stale], vocab, self.device)
        return to_device(slots, torch.long, self.device)

    def release(self, request_ids: Sequence[str]) -> None:
        """Give back the rows of finished (or aborted) requests."""
        for request_id in request_ids:
            row = self._rows.pop(request_id, None)
            if row is not None:
                self._free.append(row.slot)

    @torch.inference_mode()
    def add(self, requests: Sequence[Request], slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count ``token_ids[i]`` (on the device) for ``requests[i]`` (slot ``slots[i]``)."""
        # slots, token_ids: [R]; one flat index_add (atomic adds on a GPU: no sort, no range check)
        flat = slots * self._table.shape[1] + token_ids
        self._table.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        for r in requests:
            self._rows[r.request_id].tokens += 1

    @torch.inference_mode()
    def add_host(self, request: Request, token_ids: Sequence[int]) -> None:
        """Count tokens known on the host (a verify chunk's accepted ones)."""
        row = self._rows.get(request.request_id)
        if row is None or row.request is not request or not token_ids:
            return
        flat = to_device([row.slot * self._table.shape[1] + t for t in token_ids], torch.long, self.device)
        self._table.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        row.tokens += len(token_ids)

    def _allocate(self, vocab: int, batch: set[str]) -> int:
        """A free slot: a released one, else a new one (the table grows up to ``max_rows``),
        else the least recently sampled row outside ``batch`` (a preempted or finished
        request's: rebuilt from the host if that request samples again)."""
        if self._free:
            return self._free.pop()
        size = 0 if self._table is None else self._table.shape[0]
        if size < self.max_rows:
            grown = torch.zeros(min(self.max_rows, max(8, 2 * size)), vocab, dtype=torch.int32, device=self.device)
            if self._table is not None:
                grown[:size] = self._table
            self._table = grown
            self._free.extend(range(grown.shape[0] - 1, size, -1))
            return size
        oldest = next(iter(self._rows))
        if oldest in batch:  # rows used this step move to the end: every row is in this batch
            raise RuntimeError(f"sampler: a batch has more than {self.max_rows} requests with penalties "
                               f"(the output-count table's max_rows)")
        return self._rows.pop(oldest).slot

    @torch.inference_mode()
    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """``[R, V]`` int32 copies of the rows of ``slots``."""
        return self._table[slots]

"""A step's inputs staged on the host, padded to a CUDA-graph shape, and sent in one copy.

The GPU runner replays a captured graph for a step whose token count fits a bucket, so
its inputs live in static device buffers of the bucket's largest shape. This module fills
them: every per-token array is computed with numpy over the whole batch (never per token
in Python), all of it is packed into one pinned int64 buffer, sent with one asynchronous
host-to-device copy (pageable memory would make the copy wait for the device to drain,
which async scheduling cannot afford), and split into the typed buffers on the device.

Padding rows have slot -1 (their K/V is not written) and belong to no sequence (they sit
after ``query_start_loc[-1]``); padding sequences have context length 0 and an empty
query range.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from llmesh.engine.request import Request
from llmesh.engine.scheduler_output import SchedulerOutput


@dataclass
class HostStep:
    """One step on the host: arrays at their real sizes, plus who samples."""

    num_tokens: int
    num_seqs: int
    token_ids: np.ndarray          # [T] int64 (0 where the token is still on the device)
    positions: np.ndarray          # [T] int64
    slot_mapping: np.ndarray       # [T] int64
    query_start_loc: np.ndarray    # [S + 1] int64
    seq_lens: np.ndarray           # [S] int64
    block_ids: np.ndarray          # [sum of table lengths] int64, the tables back to back
    table_lens: np.ndarray         # [S] int64
    logits_indices: np.ndarray     # [R] int64: one row per sampling chunk, k + 1 for a verify chunk
    sampling_requests: list[Request]
    spec_drafts: list[tuple[int, ...]]  # per sampling request, the drafts its chunk verifies
    pending_index: list[int]       # flat indices whose token is last step's sample (device)
    pending_requests: list[Request]
    max_query_len: int
    max_seq_len: int

    def block_table_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of each entry of ``block_ids`` in a padded [S, max_blocks] table."""
        rows = np.repeat(np.arange(self.num_seqs), self.table_lens)
        starts = np.cumsum(self.table_lens) - self.table_lens
        return rows, np.arange(len(self.block_ids)) - np.repeat(starts, self.table_lens)

    def padded_block_tables(self) -> np.ndarray:
        """[S, longest table] int32, zero-padded."""
        tables = np.zeros((self.num_seqs, int(self.table_lens.max())), np.int32)
        tables[self.block_table_coords()] = self.block_ids
        return tables


def warmup_step(num_tokens: int, max_seqs: int, max_len: int, block_size: int, decode_row: bool) -> HostStep:
    """A step of ``num_tokens`` tokens that no request sent, for a runner to compile the kernels
    of a step shape before serving: fresh prompts of at most ``max_len`` tokens each (token 0,
    positions from 0), or with ``decode_row`` one decode first (a token at position 1 after one
    cached token), which makes the attention a mixed batch's instead of fresh prompts' only.
    Every slot is -1, so nothing is written to the K/V pool, and every table names block 0,
    whose contents (zeros, or some request's K/V) are finite; nothing samples."""
    if num_tokens < 1 + decode_row:
        raise ValueError(f"a warm-up step of {num_tokens} tokens holds no prompt")
    prompt_tokens = num_tokens - decode_row
    n = -(-prompt_tokens // max_len)
    if n + decode_row > max_seqs:
        raise ValueError(f"{prompt_tokens} prompt tokens need {n} sequences of at most {max_len}: "
                         f"more than {max_seqs - decode_row}")
    lens = np.full(n, prompt_tokens // n, np.int64)
    lens[: prompt_tokens % n] += 1
    starts = np.zeros(n, np.int64)
    if decode_row:
        lens, starts = np.concatenate([[1], lens]), np.concatenate([[1], starts])
    qsl = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=qsl[1:])
    seq_lens = starts + lens
    positions = np.concatenate([np.arange(a, a + q) for a, q in zip(starts, lens)])
    table_lens = -(-seq_lens // block_size)
    return HostStep(
        num_tokens=num_tokens, num_seqs=len(lens), token_ids=np.zeros(num_tokens, np.int64), positions=positions,
        slot_mapping=np.full(num_tokens, -1, np.int64), query_start_loc=qsl, seq_lens=seq_lens,
        block_ids=np.zeros(int(table_lens.sum()), np.int64), table_lens=table_lens,
        logits_indices=np.zeros(0, np.int64), sampling_requests=[], spec_drafts=[], pending_index=[],
        pending_requests=[], max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()))


def stage_host(scheduled: SchedulerOutput, block_size: int) -> HostStep:
    """Flatten a step's chunks (both backends' one staging); per-token arrays come from array
    ops over the batch, the chunks' own token ids from list slices."""
    chunks = scheduled.chunks
    num_seqs = len(chunks)
    starts = np.fromiter((c.start_pos for c in chunks), np.int64, num_seqs)
    lens = np.fromiter((c.num_new_tokens for c in chunks), np.int64, num_seqs)
    qsl = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(lens, out=qsl[1:])
    t = int(qsl[-1])
    ends = starts + lens

    token_ids: list[int] = []
    pending_index, pending_requests = [], []
    logits_idx, sampling, drafts = [], [], []
    tables = []
    for s, c in enumerate(chunks):
        req = c.request
        k = c.num_spec_tokens
        known_end = min(int(ends[s]) - k, req.num_tokens)
        start = c.start_pos
        if known_end > start:
            p = req.num_prompt_tokens
            if start >= p:
                token_ids.extend(req.output_token_ids[start - p: known_end - p])
            elif known_end <= p:
                token_ids.extend(req.prompt_token_ids[start:known_end])
            else:
                token_ids.extend(req.prompt_token_ids[start:])
                token_ids.extend(req.output_token_ids[: known_end - p])
        if ends[s] - k > known_end:  # the last input is the token the previous step sampled
            pending_index.append(len(token_ids))
            pending_requests.append(req)
            token_ids.append(0)
        token_ids.extend(c.spec_token_ids)
        if c.samples:
            logits_idx.extend(range(int(qsl[s + 1]) - 1 - k, int(qsl[s + 1])))
            sampling.append(req)
            drafts.append(c.spec_token_ids)
        tables.append(req.block_ids[: -(-int(ends[s]) // block_size)])

    table_lens = np.fromiter((len(x) for x in tables), np.int64, num_seqs)
    block_ids = np.fromiter(itertools.chain.from_iterable(tables), np.int64, int(table_lens.sum()))
    # position of each flat token, and its pool slot through its sequence's table
    seq_of_token = np.repeat(np.arange(num_seqs), lens)
    positions = np.arange(t, dtype=np.int64) - np.repeat(qsl[:-1] - starts, lens)
    table_start = np.zeros(num_seqs, np.int64)
    np.cumsum(table_lens[:-1], out=table_start[1:])
    block = block_ids[table_start[seq_of_token] + positions // block_size]
    slots = block * block_size + positions % block_size
    return HostStep(
        num_tokens=t, num_seqs=num_seqs, token_ids=np.asarray(token_ids, np.int64), positions=positions,
        slot_mapping=slots, query_start_loc=qsl, seq_lens=ends, block_ids=block_ids, table_lens=table_lens,
        logits_indices=np.asarray(logits_idx, np.int64), sampling_requests=sampling, spec_drafts=drafts,
        pending_index=pending_index, pending_requests=pending_requests,
        max_query_len=int(lens.max()), max_seq_len=int(ends.max()))


class StaticInputs:
    """Device buffers a captured graph reads, sized for the largest bucket; and the copy in."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks, self.device = max_tokens, max_seqs, max_blocks, device
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_tokens, **i64)
        self.positions = torch.zeros(max_tokens, **i64)
        self.slot_mapping = torch.full((max_tokens,), -1, **i64)
        self.query_start_loc = torch.zeros(max_seqs + 1, **i32)
        self.seq_lens = torch.zeros(max_seqs, **i32)
        self.block_tables = torch.zeros(max_seqs, max_blocks, **i32)
        self.logits_indices = torch.zeros(max_tokens, **i64)  # a verify chunk samples every position
        # one packed transfer: ids, positions, slots | qsl | lens | tables | logits indices
        self._sizes = [max_tokens] * 3 + [max_seqs + 1, max_seqs, max_seqs * max_blocks, max_tokens]
        self._staging = torch.zeros(sum(self._sizes), **i64)
        self._pinned = [torch.zeros(sum(self._sizes), dtype=torch.int64, pin_memory=device.type == "cuda")
                        for _ in range(2)]
        self._copied = [None, None]
        self._turn = 0

    def load(self, step: HostStep, t_pad: int, s_pad: int) -> None:
        """Fill the first ``t_pad`` tokens / ``s_pad`` sequences (padded) with ``step``."""
        t, s = step.num_tokens, step.num_seqs
        if t > t_pad or s > s_pad or t_pad > self.max_tokens or s_pad > self.max_seqs:
            raise ValueError(f"step of {t} tokens / {s} sequences does not fit {t_pad} / {s_pad}")
        # Two pinned buffers in turn: the copy out of one may still be queued behind the
        # step in flight while the host fills the other.
        buf, event = self._pinned[self._turn], self._copied[self._turn]
        if event is not None:
            event.synchronize()
        host = buf.numpy()
        parts = np.split(host, np.cumsum(self._sizes)[:-1])
        ids, pos, slots, qsl, lens, tables, logits = parts
        ids[:t_pad] = 0
        ids[:t] = step.token_ids
        pos[:t_pad] = 0
        pos[:t] = step.positions
        slots[:t_pad] = -1
        slots[:t] = step.slot_mapping
        qsl[: s + 1] = step.query_start_loc
        qsl[s + 1: s_pad + 1] = t
        lens[:s_pad] = 0
        lens[:s] = step.seq_lens
        tables2d = tables.reshape(self.max_seqs, self.max_blocks)
        tables2d[:s_pad] = 0
        tables2d[step.block_table_coords()] = step.block_ids
        n = len(step.logits_indices)
        logits[:t_pad] = 0
        logits[:n] = step.logits_indices
        self._staging.copy_(buf, non_blocking=True)
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            self._copied[self._turn] = ev
        self._turn ^= 1
        dev = self._staging.split(self._sizes)
        self.input_ids[:t_pad].copy_(dev[0][:t_pad])
        self.positions[:t_pad].copy_(dev[1][:t_pad])
        self.slot_mapping[:t_pad].copy_(dev[2][:t_pad])
        self.query_start_loc[: s_pad + 1].copy_(dev[3][: s_pad + 1])
        self.seq_lens[:s_pad].copy_(dev[4][:s_pad])
        self.block_tables[:s_pad].copy_(dev[5].view(self.max_seqs, self.max_blocks)[:s_pad])
        self.logits_indices[:t_pad].copy_(dev[6][:t_pad])

"""What rank 0 sends a tensor-parallel worker each step: the staged step's arrays, packed
into one int64 buffer (raw bytes over the worker's pipe, no pickling of objects).

Layout: a header of HEADER_LEN values, then the arrays back to back:
token_ids [T] | positions [T] | slot_mapping [T] | query_start_loc [S+1] | seq_lens [S] |
table_lens [S] | block_ids [B] | logits_indices [R] | pending_index [P].
Tokens still on rank 0's device (async scheduling) are 0 here; their values follow through
a broadcast on the process group, in stream order with the forward pass.
"""

from __future__ import annotations

import numpy as np

from llmesh.engine.step_inputs import HostStep

OP_STEP, OP_STOP = 1, 2
HEADER_LEN = 8


def pack_step(host: HostStep) -> bytes:
    header = np.array([OP_STEP, host.num_tokens, host.num_seqs, len(host.block_ids), len(host.logits_indices),
                       len(host.pending_index), host.max_query_len, host.max_seq_len], np.int64)
    return np.concatenate([header, host.token_ids, host.positions, host.slot_mapping, host.query_start_loc,
                           host.seq_lens, host.table_lens, host.block_ids, host.logits_indices,
                           np.asarray(host.pending_index, np.int64)]).astype(np.int64, copy=False).tobytes()


STOP_MESSAGE = np.array([OP_STOP] + [0] * (HEADER_LEN - 1), np.int64).tobytes()


def unpack_step(buf: bytes) -> HostStep | None:
    """The step (None for the stop message). The worker's copy names no requests: it
    samples nothing, and ``pending_index`` says which input ids arrive by broadcast."""
    a = np.frombuffer(buf, np.int64).copy()  # writable: the arrays become tensors
    op, t, s, b, r, p, max_q, max_seq = (int(v) for v in a[:HEADER_LEN])
    if op == OP_STOP:
        return None
    sizes = [t, t, t, s + 1, s, s, b, r, p]
    parts = np.split(a[HEADER_LEN:], np.cumsum(sizes)[:-1])
    ids, pos, slots, qsl, lens, table_lens, block_ids, logits, pending = parts
    return HostStep(num_tokens=t, num_seqs=s, token_ids=ids, positions=pos, slot_mapping=slots,
                    query_start_loc=qsl, seq_lens=lens, block_ids=block_ids, table_lens=table_lens,
                    logits_indices=logits, sampling_requests=[], spec_drafts=[],
                    pending_index=pending.tolist(), pending_requests=[], max_query_len=max_q,
                    max_seq_len=max_seq)

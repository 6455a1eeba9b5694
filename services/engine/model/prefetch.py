"""Weights into L2 while a decode step's small kernels leave HBM idle (opt-in, LLMESH_L2_PREFETCH=1).

After a layer's qkv projection, the next kernels (RoPE and the K/V write, the decode attention
and its reduce) read a few kilobytes; the o_proj GEMV after them streams its whole weight. The
forward pass (llama.py) asks for that weight here as soon as the qkv projection is queued: on a
side stream, behind the main stream's work so far, `llmesh.kernels.l2_prefetch` requests the
weight's bytes (those its kernel will read at this batch size, quant/linear.kernel_operands) into
L2, and the main stream goes on without waiting. The side stream rejoins the main one at the end
of the forward pass (`join`), as a CUDA graph capture requires of a forked stream.

Only inside a CUDA graph capture (the decode steps): there the fork costs nothing a step, where
an eager step would pay a Triton launch per layer on the host. Only up to MAX_TOKENS rows: past
them the GEMMs are no longer weight streams. Off by default until a device measures it
(bench/plans/open_goals.plan, the l2-prefetch A/B); a prefetch changes no value, so greedy
output is the same either way.
"""

from __future__ import annotations

import os

import torch

from llmesh.engine.quant.linear import Weight, kernel_operands

PREFETCH_ENV = "LLMESH_L2_PREFETCH"
"""1: prefetch each layer's o_proj weight into L2 during its attention (decode graphs, sm90+)."""
MAX_TOKENS = 64
"""Rows up to which a step's o_proj is asked for (the decode batch sizes where it streams weights)."""


def prefetch_wanted(device: torch.device, ops: str) -> bool:
    """LLMESH_L2_PREFETCH=1, the triton op table, and a CUDA device of compute capability 9.0 or
    later (cp.async.bulk.prefetch is sm90's)."""
    if os.environ.get(PREFETCH_ENV, "0").strip() != "1" or ops != "triton" or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


class WeightPrefetcher:
    """One a model: its side stream and whether a fork is open."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = device
        self.enabled = enabled
        self.side = None
        if enabled:
            from llmesh.kernels.l2_prefetch import l2_prefetch, scratch

            self.side = torch.cuda.Stream(device)
            # The kernel compiled and loaded and its scratch made now, eagerly: a module load or an
            # allocation inside the first capture could fail it. Its own 16 bytes: the launch a
            # weight's prefetch specialises to (every byte count and address a multiple of 16).
            l2_prefetch(scratch(device))
        self.forked = False
        self.bytes_asked = 0
        """Bytes the last captured forward pass asked for (for the benchmark's record)."""

    def weights(self, w: Weight | list[Weight], tokens: int) -> None:
        """Ask for w's bytes in L2 on the side stream, behind what the current stream has queued."""
        if not self.enabled or tokens > MAX_TOKENS or not torch.cuda.is_current_stream_capturing():
            return
        from llmesh.kernels.l2_prefetch import l2_prefetch

        if not self.forked:
            self.bytes_asked = 0
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self.bytes_asked += sum(l2_prefetch(t) for t in kernel_operands(w, tokens, self.device))
        self.forked = True

    def join(self) -> None:
        """The main stream waits for the side stream's requests (issued at once; the copies into
        L2 go on by themselves), closing the fork."""
        if self.forked:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.forked = False

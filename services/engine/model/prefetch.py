"""Weights into L2 while a decode step's small kernels leave HBM idle (opt-in, LLMESH_L2_PREFETCH).

Between a layer's qkv projection and its o_proj GEMV run kernels that read a few kilobytes (RoPE
and the K/V write, the decode attention and its reduce), while the o_proj GEMV then streams its
whole weight. The forward pass (llama.py) asks for that weight here as soon as `norm_qkv_rope` has
queued its kernels (the GEMV, and RoPE with the K/V write where they are a kernel of their own),
so the request overlaps the attention and its reduce: on a side stream, behind the main stream's
work so far, `llmesh.kernels.l2_prefetch` requests the weight's bytes (those its kernel will read
at this batch size, quant/linear.kernel_operands) into L2, and the main stream goes on without
waiting. The side stream rejoins the main one at the end of the forward pass (`join`), as a CUDA
graph capture requires of a forked stream. It is a high-priority stream, so its one-warp programs
are not queued behind the attention's or the early-launched GEMV's (a hint: a graph keeps node
priorities only where it is instantiated to).

Modes (LLMESH_L2_PREFETCH): 0 (default) off; 1 o_proj's weight; 2 that and, in a dense layer,
the first LEAD_BYTES of the MLP's gate/up weight, which the o_proj GEMV (reading L2) and the norm
after it would otherwise leave HBM idle for. Only inside a CUDA graph capture (the decode graphs,
and mixed graphs of up to MAX_TOKENS tokens): there the fork costs nothing a step, where an eager
step would pay a Triton launch per layer on the host. Only up to MAX_TOKENS rows: past them the
GEMMs are no longer weight streams. Off by default: the A/B on both devices (bench/plans/
open_goals.plan's l2-prefetch-ab, kernel_profile_<dev>_*_tables_l2pf*.json) found no gain, the 8B
INT4 batch-1 step 2.184 / 2.198 / 2.255 ms in modes 0 / 1 / 2 on the H200, 2.576 / 2.599 / 2.575
on the H100, Qwen3-30B-A3B's 2.861 / 2.951 and 3.255 / 3.371 in modes 0 / 1. A prefetch changes no
value, so greedy output is the same in every mode.
"""

from __future__ import annotations

import os

import torch

from llmesh.engine.quant.linear import Weight, kernel_operands

PREFETCH_ENV = "LLMESH_L2_PREFETCH"
"""0 off, 1 each layer's o_proj weight during its attention, 2 also the gate/up weight's lead."""
MODES = (0, 1, 2)
MAX_TOKENS = 64
"""Rows up to which a step's weights are asked for (the decode batch sizes where they stream)."""
LEAD_BYTES = 16 << 20
"""Mode 2: the bytes of gate/up asked for with o_proj (with o_proj's 8.9 MB in INT4, 25 MB of the
50 MB L2 of an H100 / H200, which nothing between the request and the gate/up GEMV streams through:
the attention reads kilobytes and the o_proj GEMV the L2)."""


def prefetch_mode(device: torch.device, ops: str) -> int:
    """LLMESH_L2_PREFETCH's mode where it can run: the triton op table on an NVIDIA GPU of compute
    capability 9.0 or later (cp.async.bulk.prefetch is sm90's PTX; ROCm reports MI300 as 9.x too);
    0 elsewhere."""
    raw = os.environ.get(PREFETCH_ENV, "0").strip() or "0"
    if raw not in {str(m) for m in MODES}:
        raise ValueError(f"{PREFETCH_ENV}={raw!r}: expected one of {', '.join(map(str, MODES))}")
    if raw == "0" or ops != "triton" or device.type != "cuda" or torch.version.hip is not None:
        return 0
    return int(raw) if torch.cuda.get_device_capability(device) >= (9, 0) else 0


class WeightPrefetcher:
    """One a model: its mode, its side stream and whether a fork is open."""

    def __init__(self, device: torch.device, mode: int) -> None:
        self.device = device
        self.mode = mode
        self.side = None
        if mode:
            from llmesh.kernels.l2_prefetch import l2_prefetch

            self.side = torch.cuda.Stream(device, priority=-1)
            # The kernel compiled and loaded now, eagerly: a module load inside the first capture
            # could fail it. 16 bytes of a fresh tensor: the launch a weight's prefetch specialises
            # to (every byte count and address a multiple of 16).
            l2_prefetch(torch.zeros(16, dtype=torch.uint8, device=device))
        self.forked = False
        self.bytes_asked = 0
        """Bytes the last captured forward pass asked for (kernel_profile.py records it)."""

    def attention_window(self, o_proj: Weight | list[Weight], gate_up: Weight | list[Weight] | None,
                         tokens: int) -> None:
        """Called once norm_qkv_rope has queued a layer's kernels: ask for o_proj's weight (and in
        mode 2 the first LEAD_BYTES of gate/up's) on the side stream, behind what the current
        stream has queued."""
        if not self.mode or tokens > MAX_TOKENS or not torch.cuda.is_current_stream_capturing():
            return
        from llmesh.kernels.l2_prefetch import l2_prefetch

        if not self.forked:
            self.bytes_asked = 0
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            self.bytes_asked += sum(l2_prefetch(t) for t in kernel_operands(o_proj, tokens, self.device))
            if self.mode == 2 and gate_up is not None:
                lead = kernel_operands(gate_up, tokens, self.device)
                share = LEAD_BYTES / max(1, sum(t.numel() * t.element_size() for t in lead))
                # the same leading share of each tensor: whichever programs read it find it in L2
                self.bytes_asked += sum(l2_prefetch(t, max_bytes=int(share * t.numel() * t.element_size()))
                                        for t in lead)
        self.forked = True

    def join(self) -> None:
        """The main stream waits for the side stream's requests (issued at once; the copies into
        L2 go on by themselves), closing the fork."""
        if self.forked:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.forked = False

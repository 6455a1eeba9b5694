"""The ``triton`` model-runner backend: Triton kernels, CUDA graphs for decode batches.

Same interface as TorchModelRunner (SchedulerOutput in, sampled tokens out). Decode-only
steps replay a CUDA graph captured for the smallest bucketed batch size that fits (the
launch overhead of ~400 small kernels per step disappears); steps with prefill chunks run
eagerly through the prefill kernel. Inputs are staged on the host with array ops and
copied once per step; sampling runs on the GPU with one host sync for the sampled ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model_runner import ModelRunnerOutput, TorchModelRunner, build_metadata, stage_chunks
from llmesh.engine.request import Request
from llmesh.engine.sampler import Sampler
from llmesh.engine.scheduler_output import SchedulerOutput
from llmesh.kernels.paged_attention import AttentionMetadata

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class TritonModelRunner(TorchModelRunner):
    """The torch runner's model and pool on the triton op table."""

    ops = "triton"

    def __init__(self, cfg: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]], *, device: torch.device,
                 dtype: torch.dtype, block_size: int, sampler: Sampler, max_model_len: int, max_num_seqs: int,
                 num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float = 0.9, cuda_graphs: bool = True, linear_method: str = "none") -> None:
        self.max_blocks = -(-max_model_len // block_size)
        super().__init__(cfg, weights, device=device, dtype=dtype, block_size=block_size, sampler=sampler,
                         num_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
                         gpu_memory_utilization=gpu_memory_utilization, linear_method=linear_method,
                         max_model_len=max_model_len)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self._init_static(max(1, min(max_num_seqs, GRAPH_BATCH_SIZES[-1])))
        if self.use_graphs:
            self._capture_graphs()

    # ---- decode graphs ------------------------------------------------------------------
    def _init_static(self, max_bs: int) -> None:
        dev = self.device
        self.graph_sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_bs] or [1]
        n = self.graph_sizes[-1]
        self.s_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.s_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.s_lens = torch.zeros(n, dtype=torch.int32, device=dev)

    def _static_meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.s_slots[:bs], block_tables=self.s_tables[:bs],
                                     seq_lens=self.s_lens[:bs], query_start_loc=None, max_query_len=1,
                                     max_seq_len=self.max_model_len)

    def _capture_graphs(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.graph_sizes):
                meta = self._static_meta(bs)
                for _ in range(2):  # compile the kernels and settle the allocator outside capture
                    self.model.forward(self.s_ids[:bs], self.s_pos[:bs], self.kv_caches, meta)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = self.model.forward(self.s_ids[:bs], self.s_pos[:bs], self.kv_caches, meta)
                self.graphs[bs] = (graph, out)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs", extra={"batch_sizes": self.graph_sizes,
                                                        "seconds": round(time.perf_counter() - t0, 2)})

    # ---- one step ---------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput, overlap: Callable[[], None] | None = None) -> ModelRunnerOutput:
        chunks = scheduled.chunks
        if not chunks:
            return ModelRunnerOutput()
        # Single-token chunks that sample are decodes (a 1-token prefill chunk is not).
        decode_only = all(c.num_new_tokens == 1 and c.samples for c in chunks)
        if decode_only and len(chunks) <= self.graph_sizes[-1]:
            hidden, reqs = self._run_decode(chunks)
        else:
            hidden, reqs = self._run_eager(scheduled)
        if overlap is not None:
            overlap()  # the forward pass is queued on the GPU; the host works meanwhile
        out = ModelRunnerOutput()
        if not reqs:
            return out
        logits = self.model.compute_logits(hidden)  # [N, vocab] float32
        if self.logits_observer is not None:
            self.logits_observer(reqs, logits)
        sampled = self.sampler(logits, reqs)
        for req, tok, lp in zip(reqs, sampled.token_ids, sampled.logprobs):
            out.sampled_token_ids[req.request_id] = tok
            if lp is not None:
                out.logprobs[req.request_id] = lp
        return out

    def _run_decode(self, chunks) -> tuple[torch.Tensor, list[Request]]:
        """Stage a decode batch into the static buffers, padded to a graph size, and run it."""
        n, bs, blk = len(chunks), next(b for b in self.graph_sizes if b >= len(chunks)), self.block_size
        ids = np.zeros(bs, np.int64)
        pos = np.zeros(bs, np.int64)
        slots = np.full(bs, -1, np.int64)
        lens = np.zeros(bs, np.int32)
        tables = np.zeros((bs, self.max_blocks), np.int32)
        for i, c in enumerate(chunks):
            r, p = c.request, c.start_pos
            ids[i] = r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1]
            pos[i], lens[i] = p, p + 1
            table = r.block_ids
            slots[i] = table[p // blk] * blk + p % blk
            tables[i, : len(table)] = table
        self.s_ids[:bs].copy_(torch.from_numpy(ids), non_blocking=True)
        self.s_pos[:bs].copy_(torch.from_numpy(pos), non_blocking=True)
        self.s_slots[:bs].copy_(torch.from_numpy(slots), non_blocking=True)
        self.s_lens[:bs].copy_(torch.from_numpy(lens), non_blocking=True)
        self.s_tables[:bs].copy_(torch.from_numpy(tables), non_blocking=True)
        if self.use_graphs:
            graph, out = self.graphs[bs]
            graph.replay()
        else:
            out = self.model.forward(self.s_ids[:bs], self.s_pos[:bs], self.kv_caches, self._static_meta(bs))
        return out[:n], [c.request for c in chunks]

    def _run_eager(self, scheduled: SchedulerOutput) -> tuple[torch.Tensor, list[Request]]:
        b, dev = stage_chunks(scheduled, self.block_size), self.device

        def t(x, dtype=torch.int64) -> torch.Tensor:
            return torch.as_tensor(x, dtype=dtype).to(dev, non_blocking=True)

        meta = build_metadata(b, dev)
        hidden = self.model.forward(t(b.token_ids), t(b.positions), self.kv_caches, meta)
        reqs = b.sampling_requests
        return hidden[t(b.logits_indices)] if reqs else hidden[:0], reqs

"""The ``triton`` model-runner backend: Triton kernels, a CUDA graph for (nearly) every step.

Same interface as TorchModelRunner (SchedulerOutput in, a StepHandle out). Three ways a
step runs, picked by its shape:

- decode-only batches (one sampling token per sequence) replay a graph captured per
  batch size, with the paged decode attention kernel;
- mixed batches (prefill chunks beside decodes) up to ``max_graph_tokens`` tokens replay
  a graph captured per token bucket, with the unified attention kernel, whose launch
  grid depends only on the bucket's shape, so the step's varying lengths live in the
  static buffers it reads;
- larger steps run eagerly (their GPU time dwarfs the launches, and under async
  scheduling the launches overlap the previous step anyway); their kernels compile at
  start-up, after the graphs' capture (``eager_warmup_sizes``).

Inputs are staged on the host with array ops and sent in one pinned copy
(step_inputs.py); decode inputs still on the device (async scheduling) are patched in
from the previous step's sampled ids. Sampling runs on the GPU; the host reads the
sampled ids back once per step, without waiting for work queued after them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.shard import ShardSpec
from llmesh.engine.model_runner import RunnerBase, SampledTokenFeed, StepHandle
from llmesh.engine.pooling import has_pooling, pool_step
from llmesh.engine.sampler import Sampler
from llmesh.engine.sampling_ops import greedy_ids
from llmesh.engine.scheduler_output import SchedulerOutput
from llmesh.engine.step_inputs import HostStep, StaticInputs, warmup_step
from llmesh.kernels.paged_attention import AttentionMetadata

log = logging.getLogger(__name__)

DECODE_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512,
                      640, 768, 896, 1024)
MIXED_TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536,
                       1792, 2048)


def eager_warmup_sizes(largest_graph_tokens: int, max_tokens: int) -> list[int]:
    """Token counts the runner steps through once at start-up, past its graphs' largest bucket.

    A step of more tokens than any mixed graph runs eagerly, and a Triton kernel compiles a
    variant for each tile config its size picks: the MoE GEMM's table is keyed by power-of-two
    token buckets (the smallest holding the step's), the quantized GEMMs' by the smallest
    measured M at or above it (the sweeps measure powers of two), and the MoE heuristic's
    thresholds fall on powers of two for the usual expert counts. On an H100 the first offline
    run of Qwen3-30B-A3B compiled eight variants in its eager steps, 5.4 s of a 29 s run, which a
    server would have spent inside a request's latency (moe_h100_order1_engine.json). So both
    ends of every bucket (b/2, b] that such steps reach. The kernels' per-step integers that are
    not tile choices (pair and block counts) are left unspecialised (``do_not_specialize``), so
    no size class of theirs is missed either; a choice made at some other size would still
    compile at its first step (tests/engine/test_eager_warmup.py checks the MoE path on a GPU)."""
    sizes: set[int] = set()
    b = 1
    while b // 2 < max_tokens:
        lo, hi = max(b // 2 + 1, largest_graph_tokens + 1), min(b, max_tokens)
        if lo <= hi:
            sizes |= {lo, hi}
        b *= 2
    return sorted(sizes)


@dataclass
class GraphStats:
    """How steps ran: the fraction replayed from a graph is what the benchmarks report."""

    decode_graph_steps: int = 0
    mixed_graph_steps: int = 0
    eager_steps: int = 0

    @property
    def graph_replay_frac(self) -> float:
        total = self.decode_graph_steps + self.mixed_graph_steps + self.eager_steps
        return (self.decode_graph_steps + self.mixed_graph_steps) / total if total else 0.0


class TritonModelRunner(RunnerBase):
    """The shared model on the triton op table, stepped through CUDA graphs."""

    ops = "triton"

    def __init__(self, cfg: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]], *, device: torch.device,
                 dtype: torch.dtype, block_size: int, sampler: Sampler, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int = 2048, num_blocks: int | None = None,
                 kv_cache_memory: int | None = None, gpu_memory_utilization: float = 0.9,
                 cuda_graphs: bool = True, max_graph_tokens: int = 2048, linear_method: str = "none",
                 extra_kv_pools: Sequence[int] = (), awq_calibration: list[int] | None = None,
                 shard: ShardSpec | None = None,
                 step_sender: Callable[[HostStep, SampledTokenFeed], None] | None = None,
                 kv_cache_dtype: str = "auto") -> None:
        self.max_blocks = -(-max_model_len // block_size)
        super().__init__(cfg, weights, device=device, dtype=dtype, block_size=block_size, sampler=sampler,
                         num_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
                         gpu_memory_utilization=gpu_memory_utilization, linear_method=linear_method,
                         max_model_len=max_model_len, extra_kv_pools=extra_kv_pools,
                         awq_calibration=awq_calibration, shard=shard, step_sender=step_sender,
                         kv_cache_dtype=kv_cache_dtype)
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.decode_sizes = [b for b in DECODE_BATCH_SIZES if b <= max_num_seqs] or [1]
        self.graph_sizes = self.decode_sizes  # the decode benchmark's name for them
        self.mixed_buckets = [b for b in MIXED_TOKEN_BUCKETS if b <= max_graph_tokens]
        self.max_num_seqs = max_num_seqs
        max_tokens = max(max_num_batched_tokens, self.decode_sizes[-1], *(self.mixed_buckets or [1]))
        self.max_num_batched_tokens = max_num_batched_tokens
        self.static = StaticInputs(max_tokens, max(max_num_seqs, self.decode_sizes[-1]), self.max_blocks, device)
        self.decode_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mixed_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.stats = GraphStats()
        if self.use_graphs:
            self._capture_graphs()

    # ---- graphs -------------------------------------------------------------------------
    def _meta(self, t: int, s: int, kind: str, max_query_len: int, max_seq_len: int,
              host: HostStep | None = None) -> AttentionMetadata:
        """Metadata over the static buffers; an eager step also carries its host lists (the
        attention dispatch reads them to pick the dense prefill path)."""
        st = self.static
        return AttentionMetadata(
            slot_mapping=st.slot_mapping[:t], block_tables=st.block_tables[:s], seq_lens=st.seq_lens[:s],
            query_start_loc=None if kind == "decode" else st.query_start_loc[: s + 1],
            max_query_len=max_query_len, max_seq_len=max_seq_len, unified=kind == "mixed",
            host_query_start_loc=None if host is None else host.query_start_loc.tolist(),
            host_seq_lens=None if host is None else host.seq_lens.tolist())

    def _mixed_seqs(self, bucket: int) -> int:
        return min(bucket, self.max_num_seqs)

    def _forward_static(self, t: int, s: int, kind: str) -> torch.Tensor:
        st = self.static
        max_q = 1 if kind == "decode" else t
        meta = self._meta(t, s, kind, max_q, self.max_model_len)
        return self.model.forward(st.input_ids[:t], st.positions[:t], self.kv_caches, meta, self.kv_scales)

    def _capture_graphs(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        shapes = [("mixed", b, self._mixed_seqs(b)) for b in reversed(self.mixed_buckets)]
        shapes += [("decode", b, b) for b in reversed(self.decode_sizes)]
        with torch.cuda.stream(stream):
            for kind, t, s in shapes:  # largest first: later graphs reuse the pool's memory
                for _ in range(2):  # compile the kernels and settle the allocator outside capture
                    self._forward_static(t, s, kind)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = self._forward_static(t, s, kind)
                (self.decode_graphs if kind == "decode" else self.mixed_graphs)[t] = (graph, out)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        eager = self._warm_eager_steps()
        # no warm-up step samples: the greedy sampler's kernel too, lest the first request compile it
        row = torch.zeros(1, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        greedy_ids(self.model.compute_logits(row))
        torch.cuda.synchronize(self.device)
        self.model.expert_tokens.zero_()  # the warm-up passes routed tokens no request sent
        log.info("captured CUDA graphs", extra={"decode_batch_sizes": self.decode_sizes,
                                                "mixed_token_buckets": self.mixed_buckets,
                                                "eager_warmup_tokens": eager,
                                                "seconds": round(time.perf_counter() - t0, 2)})

    def _warm_eager_steps(self) -> list[int]:
        """Run the steps too large for a graph once per size of ``eager_warmup_sizes``, as fresh
        prompts and as a mixed batch (their attention differs), so that their kernels compile
        now rather than inside a request, and a step too large for the memory left beside the
        pool fails here rather than under one; on the stream eager steps run on, whose cached
        blocks they will reuse. Returns the sizes."""
        longest = min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)  # what a step can hold
        sizes = eager_warmup_sizes(self.mixed_buckets[-1] if self.mixed_buckets else 0, longest)
        for t in sizes:
            for decode_row in (False, True):
                try:
                    step = warmup_step(t, self.max_num_seqs, self.max_model_len, self.block_size, decode_row)
                except ValueError:  # no step of the scheduler's has this shape (e.g. a decode beside a full batch)
                    continue
                self.forward_host(step)
        self.stats = GraphStats()  # what the benchmarks read counts requests' steps only
        return sizes

    def release_graphs(self) -> None:
        """Drop the captured graphs and the memory they hold; later steps run eager. Under
        tensor parallelism every rank calls it before leaving the group: destroying a group
        whose collectives were captured in graphs can hang (tp_executor._leave_group)."""
        if not self.decode_graphs and not self.mixed_graphs:
            return
        torch.cuda.synchronize(self.device)
        for graph, _ in (*self.decode_graphs.values(), *self.mixed_graphs.values()):
            graph.reset()
        self.decode_graphs.clear()
        self.mixed_graphs.clear()
        self.use_graphs = False

    # ---- one step ---------------------------------------------------------------------
    @staticmethod
    def _decode_only(host: HostStep) -> bool:
        # From the arrays alone: a tensor-parallel worker's step carries no requests, and every
        # rank must pick the same graph (their collectives pair up).
        return host.num_tokens == host.num_seqs and len(host.logits_indices) == host.num_seqs

    def forward_host(self, host: HostStep) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = host.num_tokens, host.num_seqs
        decode_only = self._decode_only(host)
        st = self.static
        if decode_only and self.use_graphs and s <= self.decode_sizes[-1]:
            bs = next(b for b in self.decode_sizes if b >= s)
            st.load(host, bs, bs)
            self.feed.patch(st.input_ids, host.pending_index, host.pending_requests)
            graph, out = self.decode_graphs[bs]
            graph.replay()
            self.stats.decode_graph_steps += 1
            return out, out[: len(host.logits_indices)]  # decodes sample in row order
        bucket = next((b for b in self.mixed_buckets if b >= t), None) if self.use_graphs else None
        if bucket is not None and s <= self._mixed_seqs(bucket):
            st.load(host, bucket, self._mixed_seqs(bucket))
            self.feed.patch(st.input_ids, host.pending_index, host.pending_requests)
            graph, out = self.mixed_graphs[bucket]
            graph.replay()
            self.stats.mixed_graph_steps += 1
        else:
            st.load(host, t, s)
            self.feed.patch(st.input_ids, host.pending_index, host.pending_requests)
            kind = "decode" if decode_only else "eager"
            meta = self._meta(t, s, kind, host.max_query_len, host.max_seq_len, host)
            out = self.model.forward(st.input_ids[:t], st.positions[:t], self.kv_caches, meta, self.kv_scales)
            self.stats.eager_steps += 1
        n = len(host.logits_indices)  # verify chunks (speculative decoding) sample k + 1 rows
        return out, (out[st.logits_indices[:n]] if n else out[:0])

    @torch.inference_mode()
    def launch(self, scheduled: SchedulerOutput) -> StepHandle:
        if not scheduled.chunks:
            return StepHandle(None)
        host = self.stage(scheduled)
        out, hidden = self.forward_host(host)
        decode_only = self._decode_only(host)
        prompt_lps = None if decode_only else self.prompt_logprobs(scheduled, host.query_start_loc, out)
        # [R, vocab] in the model dtype, a fresh tensor: the next graph replay does not overwrite it
        logits = self.model.compute_logits(hidden) if host.sampling_requests else None
        # An embedding chunk never samples, so its step is never decode-only: ``out`` holds
        # every token's hidden state, padded rows after the step's ``t``.
        pooled = pool_step(out, scheduled.chunks) if has_pooling(scheduled.chunks) else None
        if pooled is not None:
            pooled.start_copy()
        return StepHandle(self.sampling(logits, host), host.spec_drafts, prompt_logprobs=prompt_lps, pooled=pooled)

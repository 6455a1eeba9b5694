"""The model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

``TorchModelRunner`` is the reference backend (plain PyTorch, CPU or GPU). Every backend
takes the same SchedulerOutput and returns the same ModelRunnerOutput, so the engine does
not know which one runs.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from llmesh.engine.config import KV_CACHE_DTYPE_ALIASES
from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.llama import LlamaForCausalLM
from llmesh.engine.model.shard import ShardSpec
from llmesh.engine.outputs import TokenLogprob
from llmesh.engine.prompt_logprobs import PromptLogprobs, plan_prompt_logprobs
from llmesh.engine.pooling import PooledBatch, has_pooling, pool_step
from llmesh.engine.request import Request
from llmesh.engine.sampler import SampledBatch, Sampler
from llmesh.engine.sampling_ops import to_device
from llmesh.engine.scheduler_output import SchedulerOutput
from llmesh.engine.spec_decode.verify import accept_deterministic
from llmesh.engine.step_inputs import HostStep, stage_host
from llmesh.kernels.kv_quant_ref import KV_FP8_DTYPE, KV_SCALE_BYTES, KV_SCALE_DTYPE
from llmesh.kernels.paged_attention import AttentionMetadata

log = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """Request id → the tokens this step gives it (only requests whose chunk reached their
    end): one, or for a verify chunk the accepted drafts and the target's next token."""
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    """Request id → one entry per token in ``sampled_token_ids`` (requests that asked)."""
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] = field(default_factory=dict)
    """Request id → (prompt index of the first entry, entries) for chunks that asked for them."""
    pooled: dict[str, np.ndarray] = field(default_factory=dict)
    """Request id → the embedding of each embedding request whose prompt ended this step."""


class StepHandle:
    """A launched step: its forward pass is queued; its sampling runs at ``sample()``;
    ``result()`` samples if that has not happened, waits for the sampled tokens, prompt
    logprobs and pooled vectors (the device-to-host copies of this step alone) and returns
    them as host values.

    Sampling is separate because only it reads host state that the previous step's tokens
    change: the grammar's mask (every token its matcher accepted). The engine queues step
    N+1's forward, lands step N (the matchers advance) while the device computes, then
    samples N+1 with masks that see every token (vLLM V1 orders structured output the same
    way: the bitmask is only needed after the forward).

    ``drafts[i]`` are the drafts the step verifies for its i-th sampling request, whose
    rows in the sampled batch are its 1 + k verify positions; rejection sampling
    (``accept_deterministic``) picks the tokens each request keeps.
    """

    def __init__(self, sample: Callable[[], SampledBatch] | None = None,
                 drafts: list[tuple[int, ...]] | None = None, *,
                 prompt_logprobs: PromptLogprobs | None = None, pooled: PooledBatch | None = None) -> None:
        self._sample = sample
        self._sampled: SampledBatch | None = None
        self._drafts = drafts
        self._prompt_logprobs = prompt_logprobs
        self._pooled = pooled

    @torch.inference_mode()  # called after launch() returned, outside its inference mode
    def sample(self) -> None:
        """Queue the step's sampling (once); the next step's forward reads its tokens."""
        if self._sample is not None:
            self._sampled, self._sample = self._sample(), None

    def result(self) -> ModelRunnerOutput:
        self.sample()
        out = ModelRunnerOutput()
        if self._prompt_logprobs is not None:
            out.prompt_logprobs = self._prompt_logprobs.to_host()
        if self._pooled is not None:
            out.pooled = self._pooled.to_host()
        if self._sampled is None:
            return out
        host = self._sampled.to_host()
        rows = self._sampled.requests
        row = 0
        while row < len(rows):
            req = rows[row]
            drafts = self._drafts[len(out.sampled_token_ids)] if self._drafts else ()
            width = len(drafts) + 1
            tokens = accept_deterministic(drafts, host.token_ids[row: row + width])
            self._sampled.accept(req, tokens)
            out.sampled_token_ids[req.request_id] = tokens
            lps = host.logprobs[row: row + len(tokens)]
            if lps[0] is not None:
                out.logprobs[req.request_id] = lps
            row += width
        return out


class SampledTokenFeed:
    """The previous step's sampled ids, on the device, by request.

    Under async scheduling a step is staged before the previous step's tokens reach the
    host; a decode's input token is then read here, on the device, by the request's row
    in the previous step's batch.
    """

    def __init__(self) -> None:
        self._ids: torch.Tensor | None = None  # [N] int64, device
        self._rows: dict[str, int] = {}

    def set(self, sampled: SampledBatch | None) -> None:
        if sampled is None:
            self._ids, self._rows = None, {}
        else:
            self._ids = sampled.token_ids
            # A verifying request has several rows and its token is known only after
            # acceptance, on the host: it is never fed from here (such steps run synchronously).
            rows: dict[str, int] = {}
            for i, r in enumerate(sampled.requests):
                rows[r.request_id] = -1 if r.request_id in rows else i
            self._rows = {k: v for k, v in rows.items() if v >= 0}

    def values(self, requests: list[Request]) -> torch.Tensor:
        """[P] the token each of ``requests`` sampled last step, on the device."""
        if self._ids is None:
            raise RuntimeError("a step needs tokens sampled by the previous step, but none was kept")
        return self._ids[to_device([self._rows[r.request_id] for r in requests], torch.long, self._ids.device)]

    def patch(self, input_ids: torch.Tensor, flat_index: list[int], requests: list[Request]) -> None:
        """input_ids[flat_index[i]] = the token requests[i] sampled last step."""
        if not flat_index:
            return
        input_ids[to_device(flat_index, torch.long, input_ids.device)] = self.values(requests)


class BroadcastTokenFeed(SampledTokenFeed):
    """A tensor-parallel worker's feed: the tokens rank 0 sampled last step arrive by a
    broadcast from rank 0 (which sends them as it stages the step), in stream order."""

    def __init__(self, shard: ShardSpec) -> None:
        super().__init__()
        self.shard = shard

    def set(self, sampled: SampledBatch | None) -> None:
        """Nothing to keep: a worker samples nothing (its tokens come from ``patch``)."""

    def patch(self, input_ids: torch.Tensor, flat_index: list[int], requests: list[Request]) -> None:
        if not flat_index:
            return
        values = torch.empty(len(flat_index), dtype=torch.int64, device=input_ids.device)  # [P]
        torch.distributed.broadcast(values, src=0, group=self.shard.group)
        input_ids[to_device(flat_index, torch.long, input_ids.device)] = values


class ModelRunner(Protocol):
    num_blocks: int

    def launch(self, scheduled: SchedulerOutput) -> StepHandle:
        """Queue one step's device work and return without waiting for its results."""
        ...

    def release(self, request_ids: Sequence[str]) -> None:
        """Drop the per-request state of requests that finished (or were aborted)."""
        ...

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its sampled tokens."""
        ...


def kv_pool_dtype(kv_cache_dtype: str, dtype: torch.dtype, device: torch.device, ops: str) -> torch.dtype:
    """The element type of the KV pool for the ``kv_cache_dtype`` option; raises where FP8 cannot
    run (a PyTorch without float8, or the triton backend on a GPU without E4M3 conversions)."""
    if kv_cache_dtype == "auto":
        return dtype
    if KV_CACHE_DTYPE_ALIASES.get(kv_cache_dtype, kv_cache_dtype) != "fp8":
        raise ValueError(f"kv_cache_dtype must be auto or fp8 (alias fp8_e4m3), got {kv_cache_dtype!r}")
    if not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"kv_cache_dtype fp8: PyTorch {torch.__version__} has no float8_e4m3fn; "
                         "upgrade PyTorch or use kv_cache_dtype auto")
    if ops == "triton" and device.type == "cuda":
        from llmesh.kernels.fp8_gemm import fp8_support

        why = fp8_support(device)
        if why is not None:
            raise ValueError(f"kv_cache_dtype fp8 with the triton backend: {why}; use kv_cache_dtype auto "
                             "or the torch backend")
    return KV_FP8_DTYPE


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """K and V of every layer for one block (of one rank's KV heads under tensor parallelism),
    in a pool of ``dtype``; an FP8 pool adds its one-byte scale per (token, KV head)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token_head = cfg.head_dim * elem + (KV_SCALE_BYTES if dtype == KV_FP8_DTYPE else 0)
    return 2 * cfg.num_hidden_layers * block_size * (cfg.num_key_value_heads // tp_size) * per_token_head


def kv_budget(device: torch.device, kv_cache_memory: int | None, utilization: float) -> int:
    """Bytes for all KV pools of an engine: ``kv_cache_memory`` when set; on a GPU,
    ``utilization`` of the memory free now (call it once every model's weights are on the
    device); on the CPU, 1 GiB."""
    if kv_cache_memory is not None:
        return kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * utilization)
    return 1 << 30


def blocks_for_budget(budget: int, bytes_per_block: Sequence[int], block_size: int) -> int:
    """Blocks per pool when pools of these per-block sizes hold the same number of blocks
    (a draft model's pool shadows the target's block for block) and together fit ``budget``:
    num_blocks × sum(bytes_per_block) ≤ budget."""
    per_block = sum(bytes_per_block)
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(
            f"KV cache: {budget} bytes hold no block; one block of {block_size} tokens needs {per_block} "
            f"bytes (per pool: {list(bytes_per_block)})")
    return int(blocks)


def model_weight_bytes(model: LlamaForCausalLM) -> int:
    """Bytes the weights take, packed ones at their packed size."""
    return model.weight_bytes


@dataclass
class BatchInputs:
    input_ids: torch.Tensor            # [T]
    positions: torch.Tensor            # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor       # [R]: flat index of each sampled position (k + 1 per verify chunk)
    sampling_requests: list[Request]   # [N]
    spec_drafts: list[tuple[int, ...]]  # [N]: the drafts each sampling request's chunk verifies


def build_metadata(host: HostStep, device: torch.device) -> AttentionMetadata:
    """Attention metadata of a staged step: device tensors plus the host lists they came
    from (the torch reference loops over those without reading the device back). A step
    of single-token chunks is decode-only (query_start_loc None)."""
    qsl, lens = host.query_start_loc.tolist(), host.seq_lens.tolist()

    def t(x, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(x, dtype=dtype).to(device, non_blocking=True)

    return AttentionMetadata(
        slot_mapping=t(host.slot_mapping, torch.int64), block_tables=t(host.padded_block_tables(), torch.int32),
        seq_lens=t(lens, torch.int32),
        query_start_loc=None if host.num_tokens == host.num_seqs else t(qsl, torch.int32),
        max_query_len=host.max_query_len, max_seq_len=host.max_seq_len,
        host_query_start_loc=qsl, host_seq_lens=lens)


def inputs_from_host(host: HostStep, device: torch.device, feed: SampledTokenFeed | None = None) -> BatchInputs:
    """A staged step's input tensors and attention metadata."""
    def t(x) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.int64).to(device, non_blocking=True)

    input_ids = t(host.token_ids)
    if host.pending_index:
        if feed is None:
            raise RuntimeError("the step needs the previous step's sampled tokens")
        feed.patch(input_ids, host.pending_index, host.pending_requests)
    return BatchInputs(input_ids, t(host.positions), build_metadata(host, device), t(host.logits_indices),
                       host.sampling_requests, host.spec_drafts)


class RunnerBase(abc.ABC):
    """What every backend shares: the model (on the backend's op table, ``ops``), the paged
    KV pool, the sampler and the feed of last step's sampled ids. Backends differ in how a
    step runs (``launch``)."""

    ops = "torch"

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        sampler: Sampler,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        linear_method: str = "none",
        max_model_len: int | None = None,
        extra_kv_pools: Sequence[int] = (),
        allocate_kv_pool: bool = True,
        kv_cache_dtype: str = "auto",
        awq_calibration: list[int] | None = None,
        shard: ShardSpec | None = None,
        step_sender: Callable[[HostStep, SampledTokenFeed], None] | None = None,
    ) -> None:
        """``num_blocks`` sizes the KV pool exactly; else it takes the budget (``kv_budget``)
        shared with ``extra_kv_pools`` (bytes per block of other pools with as many blocks,
        e.g. a draft model's, whose weights are loaded already). With ``allocate_kv_pool``
        False the pool waits for ``init_kv_pool`` (a draft sized with its target).

        Tensor parallelism: ``shard`` places this runner in the group (its model holds one
        shard; every rank's pool has as many blocks, the smallest any rank can afford), and
        rank 0 hands each staged step to ``step_sender`` before running it, so the other
        ranks run the same forward pass (``run_host_step``)."""
        self.shard = shard or ShardSpec()
        self.step_sender = step_sender
        self.max_model_len = max_model_len
        self.cfg, self.device, self.dtype, self.block_size, self.sampler = cfg, device, dtype, block_size, sampler
        self.linear_method = linear_method
        self.logits_observer: Callable[[list[Request], torch.Tensor], None] | None = None
        """When set, sees each step's logits [N, vocab] as float32 (fidelity tests)."""
        self.feed = SampledTokenFeed()
        self.kv_dtype = kv_pool_dtype(kv_cache_dtype, dtype, device, self.ops)
        self._build_model(weights, awq_calibration)
        self.kv_bytes_per_block = kv_bytes_per_block(cfg, block_size, self.kv_dtype, self.shard.world_size)
        self.num_blocks = 0
        if allocate_kv_pool:
            blocks = num_blocks or blocks_for_budget(
                kv_budget(device, kv_cache_memory, gpu_memory_utilization),
                [self.kv_bytes_per_block, *extra_kv_pools], block_size)
            if self.shard.parallel:  # block tables are shared: every rank holds the same count
                count = torch.tensor([blocks], dtype=torch.int64, device=device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN, group=self.shard.group)
                blocks = int(count.item())
            self.init_kv_pool(blocks)

    def _build_model(self, weights: Iterable[tuple[str, torch.Tensor]], awq_calibration: list[int] | None) -> None:
        """``awq_calibration``: token ids; the model loads in float, is calibrated on them and
        quantized activation-aware to its linear method, int4, int8 or w4a8 (quant/activation_aware.py)."""
        t0 = time.perf_counter()
        method = "none" if awq_calibration else self.linear_method
        self.model = LlamaForCausalLM(self.cfg, weights, linear_method=method, ops=self.ops,
                                      device=self.device, dtype=self.dtype, max_positions=self.max_model_len,
                                      shard=self.shard)
        if awq_calibration:
            from llmesh.engine.quant.activation_aware import apply_awq

            self.awq_report = apply_awq(self.model, awq_calibration, fmt=self.linear_method)
        self.weight_bytes = self.model.weight_bytes
        if self.device.type == "cuda":
            from llmesh.engine.quant.linear import prepare_library_weights

            # the library kernels' (tinygemm, gemlite, FBGEMM) copies of the packed weights the measured
            # table sends to them: made now, so the KV pool is sized with them in memory
            self.library_weight_bytes = prepare_library_weights(self.model.linear_weights(), self.device,
                                                                self.dtype)
            torch.cuda.empty_cache()  # the unfused parts of fused weights
        elif self.device.type == "cpu" and self.ops == "torch":
            from llmesh.engine.quant.cpu_matmul import calibrate, cpu_dense_copies

            # which GEMM path is fastest per weight shape is the host's: timed on the model's own weights
            self.cpu_gemm_plan = calibrate(cpu_dense_copies(self.model.linear_weights(), self.dtype))
            if self.cpu_gemm_plan:
                log.info("cpu gemm paths measured", extra={"plan": self.cpu_gemm_plan})
        log.info("model weights loaded", extra={"seconds": round(time.perf_counter() - t0, 2),
                                                "weight_bytes": self.weight_bytes, "ops": self.ops,
                                                "library_weight_bytes": getattr(self, "library_weight_bytes", 0),
                                                "linear_method": self.linear_method})

    def init_kv_pool(self, num_blocks: int) -> None:
        c = self.cfg
        self.num_blocks = num_blocks
        # kv_caches: [L, 2, num_blocks, block_size, H_kv (this rank's), D], one preallocated pool
        shape = (c.num_hidden_layers, 2, num_blocks, self.block_size, self.model.num_kv_heads)
        self.kv_caches = torch.zeros((*shape, c.head_dim), dtype=self.kv_dtype, device=self.device)
        # kv_scales: [L, 2, num_blocks, block_size, H_kv] scale exponents beside an FP8 pool
        self.kv_scales = (torch.zeros(shape, dtype=KV_SCALE_DTYPE, device=self.device)
                          if self.kv_dtype == KV_FP8_DTYPE else None)
        log.info("KV pool allocated", extra={"ops": self.ops, "num_blocks": num_blocks,
                                             "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
                                             "block_size": self.block_size,
                                             "bytes_per_block": self.kv_bytes_per_block,
                                             "kv_bytes": self.kv_pool_bytes})

    @property
    def kv_pool_bytes(self) -> int:
        return self.num_blocks * self.kv_bytes_per_block

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its sampled tokens."""
        return self.launch(scheduled).result()

    def release(self, request_ids: Sequence[str]) -> None:
        self.sampler.release(request_ids)

    def sampling(self, logits: torch.Tensor, host: HostStep) -> Callable[[], SampledBatch] | None:
        """The step's sampling, to run once the host state it reads is current (see
        StepHandle); None when no row samples. Called at launch, with the forward queued:
        a step that samples nothing leaves no tokens for the next step to read."""
        if not host.sampling_requests:
            self.feed.set(None)
            return None
        if self.logits_observer is not None:
            self.logits_observer(host.sampling_requests, logits.float())

        def sample() -> SampledBatch:
            sampled = self.sampler.sample(logits, host.sampling_requests, host.spec_drafts)
            sampled.start_copy()
            self.feed.set(sampled)
            return sampled

        return sample

    def prompt_logprobs(self, scheduled: SchedulerOutput, query_start_loc, hidden: torch.Tensor
                        ) -> PromptLogprobs | None:
        """The step's prompt logprobs, queued on the device (None when no chunk asked)."""
        # hidden: [T, H], the final hidden state of every token of the step
        spans = plan_prompt_logprobs(scheduled, query_start_loc)
        return PromptLogprobs(spans, hidden, self.model.compute_logits) if spans else None

    def stage(self, scheduled: SchedulerOutput) -> HostStep:
        """The step's host arrays; rank 0 of a tensor-parallel group sends them to the others."""
        host = stage_host(scheduled, self.block_size)
        if self.step_sender is not None:
            self.step_sender(host, self.feed)
        return host

    @abc.abstractmethod
    def launch(self, scheduled: SchedulerOutput) -> StepHandle:
        """Queue one step's device work and return without waiting for its results."""

    @abc.abstractmethod
    def forward_host(self, host: HostStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model over a staged step: (every token's final hidden state [T', H],
        the rows that sample [R, H])."""

    @torch.inference_mode()
    def run_host_step(self, host: HostStep) -> None:
        """A tensor-parallel worker's step: rank 0's staged step (input ids already resolved),
        the same forward pass, and its part of the LM head for the rows that sample."""
        _, hidden = self.forward_host(host)
        if len(host.logits_indices):
            self.model.compute_logits(hidden)


class TorchModelRunner(RunnerBase):
    """Reference backend: the Llama-family model in plain PyTorch over the paged pool."""

    @torch.inference_mode()
    def launch(self, scheduled: SchedulerOutput) -> StepHandle:
        if not scheduled.chunks:
            return StepHandle(None)
        host = self.stage(scheduled)
        hidden, rows = self.forward_host(host)
        prompt_lps = self.prompt_logprobs(scheduled, host.query_start_loc, hidden)
        logits = self.model.compute_logits(rows) if host.sampling_requests else None  # [R, vocab]
        pooled = pool_step(hidden, scheduled.chunks) if has_pooling(scheduled.chunks) else None
        if pooled is not None:
            pooled.start_copy()
        return StepHandle(self.sampling(logits, host), host.spec_drafts, prompt_logprobs=prompt_lps, pooled=pooled)

    def forward_host(self, host: HostStep) -> tuple[torch.Tensor, torch.Tensor]:
        batch = inputs_from_host(host, self.device, self.feed)
        hidden = self.model.forward(batch.input_ids, batch.positions, self.kv_caches, batch.meta, self.kv_scales)
        return hidden, hidden[batch.logits_indices]

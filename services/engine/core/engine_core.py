"""EngineCore: the scheduler, the model runner and the KV cache. One ``step()`` is
schedule → launch → update, and returns what each request received.

With async scheduling (on for the triton backend on a GPU) the update is the previous
step's: step N+1 is scheduled and launched before step N's tokens are read back, so the
host's scheduling, staging and the front end's text work overlap the device's forward
pass, and the only host-device sync per step is for the sampled tokens.
A launched step is a forward pass, then its sampling (StepHandle.sample): a grammar's mask
for step N+1 depends on step N's token, so N+1's forward is queued, N lands (the matchers
advance) while the device computes, and N+1 is sampled after. Penalties need no such wait
(the sampler counts output tokens on the device).

Speculative decoding (a ``speculative`` config): after a step lands, the proposer drafts
tokens for running requests that speculate; the next schedule turns their decodes into
verify chunks. Proposing needs the accepted tokens on the host, so while any running
request speculates the core runs steps synchronously (land, propose, schedule); batches
with no speculating request keep the async path.

The core knows token ids only: tokenization, detokenization and stop strings belong to
the front end (``LLMEngine`` in-process, ``AsyncLLM`` across a process boundary). Not
thread-safe: exactly one thread drives it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from llmesh.engine.config import EngineConfig, default_step_tokens
from llmesh.engine.core.messages import EngineCoreOutput, EngineCoreRequest, EngineStats
from llmesh.engine.errors import InvalidRequestError, UnsupportedModelError
from llmesh.engine.kv_cache.events import KVEventPublisher
from llmesh.engine.kv_cache.manager import KVCacheManager
from llmesh.engine.loader import LoadedModel, load_model
from llmesh.engine.model.config import ModelConfig
from llmesh.engine.core.runner_factory import build_runner
from llmesh.engine.model_runner import ModelRunner, StepHandle
from llmesh.engine.prompt_logprobs import collect as collect_prompt_logprobs
from llmesh.engine.quant.config import resolve_quantization
from llmesh.engine.request import FinishReason, Request
from llmesh.engine.structured_output.advance import advance_grammars
from llmesh.engine.structured_output.spec import StructuredOutputSpec
from llmesh.engine.scheduler import Scheduler
from llmesh.engine.scheduler_output import SchedulerOutput

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_max_model_len(model_config: ModelConfig, config: EngineConfig) -> int:
    """The served window: the model's, capped by a sliding window and the configured cap."""
    window = model_config.max_position_embeddings
    if model_config.sliding_window:
        window = min(window, model_config.sliding_window)
    if config.max_model_len is not None:
        window = min(window, config.max_model_len)
    return window


def resolve_step_tokens(config: EngineConfig, device_type: str, max_model_len: int) -> int:
    """The step's token budget: the configured one, else the device's default (raised to the
    window when chunked prefill is off, or long prompts could never be scheduled)."""
    sched = config.scheduler
    if sched.max_num_batched_tokens is not None:
        return sched.max_num_batched_tokens
    tokens = default_step_tokens(device_type)
    return tokens if sched.enable_chunked_prefill else max(tokens, max_model_len)


class EngineCore:
    def __init__(self, config: EngineConfig, publisher: KVEventPublisher | None = None,
                 loaded: LoadedModel | None = None, on_worker_death: Callable[[str], None] | None = None) -> None:
        """``on_worker_death``: called from a watcher thread when a tensor-parallel worker
        exits (the engine core's process ends itself there; in-process, the next collective
        fails or times out instead)."""
        self.config = config
        self.on_worker_death = on_worker_death
        self._init_device()
        loaded = loaded or load_model(config.model, name=config.served_model_name)
        self.model_config = loaded.config
        self.model_name = loaded.config.name
        self.max_model_len = resolve_max_model_len(self.model_config, config)
        self.config.scheduler = replace(  # validates them
            self.config.scheduler, max_model_len=self.max_model_len,
            max_num_batched_tokens=resolve_step_tokens(self.config, self.device.type, self.max_model_len))
        from llmesh.engine.spec_decode import build_proposer
        from llmesh.engine.spec_decode.stats import SpecDecodeStats

        # A draft model's weights load before the target's KV pool is sized: both pools
        # share one budget (see _init_runner).
        self.proposer = build_proposer(config.speculative if config.speculative.enabled else None, self)
        self.spec_stats = SpecDecodeStats()
        self._init_runner(loaded)
        self._init_scheduler(publisher)
        async_scheduling = config.async_scheduling
        if async_scheduling is None:
            async_scheduling = config.backend == "triton" and self.device.type == "cuda"
        self.async_scheduling = async_scheduling
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None
        """The launched step whose tokens the host has not landed yet."""
        self._tokenizer_source = loaded.tokenizer_source
        self._grammars: Any = None
        """The compiled-grammar cache (``GrammarCache``), built at the first constrained request."""
        self._compiling: dict[str, tuple[Request, concurrent.futures.Future]] = {}
        """Constrained requests whose grammar is being compiled: admitted to the scheduler
        once it is ready, so the step loop never waits for a compilation."""
        self._steps = 0
        self._last_step_time = time.monotonic()
        self._expert_tokens_read = float("-inf")
        self.last_step_tokens = 0
        """Tokens the last step scheduled (the iteration-tokens metric)."""

    # ---- construction -----------------------------------------------------------------
    def _init_device(self) -> None:
        dev = self.config.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        dt = self.config.dtype
        if dt == "auto":
            dt = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = _DTYPES[dt]

    def _init_runner(self, loaded: LoadedModel) -> None:
        self.quantization = resolve_quantization(
            self.config.quantization, model=self.config.model, source_format=loaded.source_format,
            checkpoint_method=loaded.checkpoint_method, device=self.device, backend=self.config.backend)
        weights = loaded.weights_for(self.quantization)
        extra_kv_pools = ()
        if self.proposer is not None and self.proposer.kv_bytes_per_block:
            extra_kv_pools = (self.proposer.kv_bytes_per_block,)
        self.tp = None
        """The tensor-parallel group (tp_executor.py) when tensor_parallel_size > 1."""
        step_sender, shard = None, None
        if self.config.tensor_parallel_size > 1:
            from llmesh.engine.core.tp_executor import TensorParallelGroup
            from llmesh.engine.model.shard import check_shardable

            check_shardable(self.model_config, self.config.tensor_parallel_size,  # before any worker loads
                            expert_parallel=self.config.enable_expert_parallel)

            self.tp = TensorParallelGroup(self.config, self.model_config, self.quantization,
                                          max_model_len=self.max_model_len, device=self.device, dtype=self.dtype,
                                          on_death=self._on_worker_death)
            step_sender, shard = self.tp.send_step, self.tp.shard
        try:
            self.runner: ModelRunner = build_runner(
                self.config, self.model_config, weights, device=self.device, dtype=self.dtype,
                max_model_len=self.max_model_len, linear_method=self.quantization.linear_method,
                extra_kv_pools=extra_kv_pools, shard=shard, step_sender=step_sender,
                awq_calibration=self._awq_calibration(loaded))
        except BaseException:
            self.shutdown()  # the workers would wait for a rank 0 that never comes
            raise
        if self.tp is not None:
            self.tp.before_leave = getattr(self.runner, "release_graphs", None)
        if self.proposer is not None:
            self.proposer.init_kv_pool(self.runner.num_blocks)

    def _awq_calibration(self, loaded: LoadedModel) -> list[int] | None:
        """Token ids of the calibration text when the quantization is activation-aware, else None."""
        if not self.config.activation_aware:
            return None
        if self.model_config.num_experts:
            raise UnsupportedModelError(
                f"activation_aware folds scales into the norm before each MLP; in a mixture-of-experts "
                f"model ({self.model_config.architecture}) that norm feeds the router and every expert. "
                f"Use quantization={self.quantization.name!r} without it")
        from llmesh.engine.quant.activation_aware import FORMATS

        if self.quantization.linear_method not in FORMATS:
            raise UnsupportedModelError(
                f"activation_aware calibrates {' or '.join(FORMATS)} quantized on load; this engine serves "
                f"{self.quantization.name!r} (set quantization='int4' or 'int8'; FP8's error is its "
                f"mantissa, which the search does not reduce)")
        from pathlib import Path

        from llmesh.engine.quant.activation_aware import CALIBRATION_TOKENS
        from llmesh.engine.text.tokenizer import Tokenizer

        path = Path(self.config.calibration_text)
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            raise UnsupportedModelError(f"activation-aware quantization: cannot read calibration_text {path}: {exc}"
                                        ) from exc
        src = loaded.tokenizer_source
        tok = Tokenizer.from_hf_folder(src) if isinstance(src, str) else Tokenizer.from_gguf_data(src)
        ids = tok.encode(text, add_special_tokens=False)[:CALIBRATION_TOKENS]
        if len(ids) < 16:
            raise UnsupportedModelError(f"activation-aware INT4: calibration_text {path} has {len(ids)} tokens; "
                                        f"it needs at least 16")
        return ids

    def _on_worker_death(self, reason: str) -> None:
        if self.on_worker_death is not None:
            self.on_worker_death(reason)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing else outlives the core)."""
        if self.tp is not None:
            self.tp.shutdown()

    def _init_scheduler(self, publisher: KVEventPublisher | None) -> None:
        cache = self.config.cache
        self.kv = KVCacheManager(
            num_blocks=self.runner.num_blocks,
            block_size=cache.block_size,
            namespace=self.model_name,
            enable_prefix_caching=cache.enable_prefix_caching,
            publisher=publisher,
        )
        self.scheduler = Scheduler(self.config.scheduler, self.kv)
        pools = {"kv_blocks": self.runner.num_blocks, "kv_bytes": self.runner.kv_pool_bytes}
        if self.proposer is not None and self.proposer.kv_bytes_per_block:
            pools.update(draft_kv_blocks=self.runner.num_blocks,
                         draft_kv_bytes=self.runner.num_blocks * self.proposer.kv_bytes_per_block)
        log.info("engine ready", extra={"model": self.model_name, **pools,
                                         "block_size": cache.block_size, "max_model_len": self.max_model_len})

    # ---- requests -------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> Request:
        """Admit a request; raises InvalidRequestError (nothing is admitted) when it cannot run."""
        req = Request(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params,
            priority=int(request.priority),
            cache_salt=request.cache_salt,
            eos_token_ids=request.eos_token_ids,
            max_model_len=self.max_model_len,
            fork_of=request.fork_of,
            pooling=request.pooling,
        )
        if self.tp is not None and request.sampling_params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs are not supported with tensor parallelism "
                                      "(tensor_parallel_size > 1)", field="prompt_logprobs")
        spec = request.sampling_params.structured_output
        if spec is None:
            self.scheduler.add_request(req)
            return req
        if req.request_id in self._compiling or self.scheduler.get_request(req.request_id) is not None:
            raise InvalidRequestError(f"request_id {req.request_id!r} is already used by a live request",
                                      field="request_id")
        self._compiling[req.request_id] = (req, self._grammar_cache().get(spec))
        return req

    # ---- structured output ------------------------------------------------------------
    def _grammar_cache(self):
        if self._grammars is None:
            from llmesh.engine.structured_output.grammar import GrammarCache, tokenizer_info
            from llmesh.engine.text.tokenizer import Tokenizer

            src = self._tokenizer_source
            tok = Tokenizer.from_hf_folder(src) if isinstance(src, str) else Tokenizer.from_gguf_data(src)
            stops = set(self.model_config.eos_token_ids) | set(tok.eos_token_ids)
            self._grammars = GrammarCache(tokenizer_info(tok, self.model_config.vocab_size, stops))
        return self._grammars

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Hand the requests whose grammar is ready to the scheduler; a grammar that failed
        to compile fails its request alone. Waits briefly when nothing else can run."""
        if not self._compiling:
            return []
        if not self.scheduler.has_unfinished_requests() and self._inflight is None:
            concurrent.futures.wait([f for _, f in self._compiling.values()], timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        from llmesh.engine.structured_output.state import GrammarState

        failed = []
        for request_id, (req, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            try:
                req.grammar = GrammarState(future.result(), req.eos_token_ids | set(req.sampling_params.stop_token_ids))
            except Exception as e:  # noqa: BLE001 - this request fails; the core goes on
                spec: StructuredOutputSpec = req.sampling_params.structured_output
                log.warning("grammar compilation failed", extra={"request_id": request_id, "error": str(e)})
                req.finish_reason = FinishReason.ERROR
                failed.append(EngineCoreOutput(request_id=request_id, new_token_ids=[],
                                               finish_reason=FinishReason.ERROR,
                                               error=f"{spec.field} could not be compiled: {e}"))
                continue
            try:
                self.scheduler.add_request(req)
            except InvalidRequestError as e:
                req.finish_reason = FinishReason.ERROR
                failed.append(EngineCoreOutput(request_id=request_id, new_token_ids=[],
                                               finish_reason=FinishReason.ERROR, error=str(e)))
        return failed

    def finish_request(self, request_id: str, reason: FinishReason) -> int:
        """End a live request now (abort, a stop string the front end saw); returns the
        KV blocks freed (0 when the id is unknown or already finished)."""
        if self._compiling.pop(request_id, None) is not None:
            return 0  # still waiting for its grammar: it holds no blocks yet
        return self.scheduler.finish_request(request_id, reason)

    def abort_request(self, request_id: str) -> int:
        if self._compiling.pop(request_id, None) is not None:
            return 0
        return self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._inflight is not None or bool(self._compiling)

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """schedule → launch → update. With async scheduling the update is the previous
        step's, done while this one computes; otherwise this step's, after it finishes."""
        outputs: list[EngineCoreOutput] = self._admit_compiled()
        if self._inflight is not None and self._speculating():
            outputs.extend(self._land(self._inflight))
            self._inflight = None
            self._propose()
        scheduled = self.scheduler.schedule()
        self.runner.release(scheduled.finished_request_ids)  # any later use of their rows is queued after
        self.last_step_tokens = scheduled.num_batched_tokens
        launched = None if scheduled.is_empty else (scheduled, self.runner.launch(scheduled))
        previous, self._inflight = self._inflight, launched
        sample = launched[1].sample if launched is not None else None
        if sample is not None and (previous is None or not any(
                c.samples and c.request.grammar is not None for c in scheduled.chunks)):
            sample()  # no mask to wait for
        if previous is not None:
            outputs.extend(self._land(previous, sample))
        if sample is not None:
            sample()  # no-op when done already
        if self._inflight is not None and (not self.async_scheduling or self._speculating()):
            outputs.extend(self._land(self._inflight))
            self._inflight = None
        if self._inflight is None:
            self._propose()
        self.kv.flush_events()
        self._steps += 1
        self._last_step_time = time.monotonic()
        return outputs

    # ---- speculative decoding -----------------------------------------------------------
    def _speculates(self, req: Request) -> bool:
        return self.proposer is not None and req.sampling_params.speculative and req.pooling is None

    def _speculating(self) -> bool:
        """Some running request speculates: drafts are proposed from its tokens on the host, so
        such batches land each step before scheduling the next (synchronous steps). Not
        while the batch is past speculative_disable_batch_size: no drafts are proposed then,
        and such a (compute-bound) batch is where async scheduling pays most."""
        running = self.scheduler.running
        return (self.proposer is not None and len(running) <= self.config.speculative.speculative_disable_batch_size
                and any(self._speculates(r) for r in running))

    def _propose(self) -> None:
        """Draft tokens for every running request that speculates and is decoding; none while
        the batch is larger than speculative_disable_batch_size (compute-bound: verify width
        would cost more than it saves)."""
        if self.proposer is None:
            return
        spec = self.config.speculative
        running = self.scheduler.running
        for r in running:
            r.spec_token_ids = []
        self.proposer.retain({r.request_id for r in running})
        if len(running) > spec.speculative_disable_batch_size:
            return
        reqs = []
        for r in running:
            if not self._speculates(r) or r.num_pending_tokens or r.num_computed_tokens != r.num_tokens - 1:
                continue
            if r.spec_skip:
                r.spec_skip -= 1
                continue
            reqs.append(r)
        if not reqs:
            return
        k = spec.num_speculative_tokens
        limits = [max(0, min(k, r.sampling_params.max_tokens - r.num_output_tokens - 1)) for r in reqs]
        for req, proposal in zip(reqs, self.proposer.propose(reqs, limits)):
            drafts = proposal.token_ids[:k]
            if req.grammar is not None and drafts:
                drafts = drafts[: req.grammar.valid_prefix(drafts)]
            req.spec_token_ids = drafts

    def _land(self, launched: tuple[SchedulerOutput, StepHandle],
              sample_next: Callable[[], None] | None = None) -> list[EngineCoreOutput]:
        """Read a launched step's tokens back and advance its requests. ``sample_next``
        (the next step's sampling) runs as soon as the grammars have advanced, so the
        device samples while the host builds this step's outputs."""
        scheduled, handle = launched
        result = handle.result()
        for request_id, (first_target, entries) in result.prompt_logprobs.items():
            req = self.scheduler.get_request(request_id)
            if req is not None:  # not finished or aborted since the step was scheduled
                collect_prompt_logprobs(req, first_target, entries)
        before = {c.request_id: c.request.num_output_tokens for c in scheduled.chunks if c.samples}
        updated = self.scheduler.update_from_output(scheduled, result.sampled_token_ids)
        new_tokens = {r.request_id: r.output_token_ids[before[r.request_id]:] for r in updated}
        for chunk in scheduled.chunks:
            if chunk.num_spec_tokens and chunk.request_id in result.sampled_token_ids:
                accepted = len(result.sampled_token_ids[chunk.request_id]) - 1
                self.spec_stats.record(chunk.num_spec_tokens, accepted, len(new_tokens.get(chunk.request_id, ())))
                _back_off(chunk.request, accepted)
        advance_grammars(self.scheduler, updated, new_tokens)
        if sample_next is not None:
            sample_next()  # a grammar's mask now sees every token its request received
        outputs = [_output(req, new_tokens[req.request_id], result.logprobs.get(req.request_id)) for req in updated]
        for request_id, vector in result.pooled.items():
            req = self.scheduler.get_request(request_id)
            if req is None:
                continue  # aborted while its last chunk ran
            self.scheduler.finish_request(request_id, FinishReason.STOP)
            outputs.append(EngineCoreOutput(
                request_id=request_id, new_token_ids=[], finish_reason=FinishReason.STOP,
                num_cached_tokens=req.num_cached_tokens, queued_time=req.arrival_time,
                scheduled_time=req.scheduled_time, embedding=vector))
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.kv.num_total_blocks,
            steps=self._steps,
            last_step_time=self._last_step_time,
            prefix_cache_queries=self.scheduler.prefix_cache_queries_total,
            prefix_cache_hits=self.scheduler.prefix_cache_hits_total,
            num_preemptions=self.scheduler.num_preemptions_total,
            spec=self.spec_stats.snapshot() if self.proposer is not None else None,
            expert_tokens=self._expert_tokens(),
        )

    def _expert_tokens(self) -> dict[str, int] | None:
        """The model's per-expert token totals, read from the device at most once per
        EXPERT_TOKENS_INTERVAL_S (stats go out every step; one small copy per interval, never
        a host sync per layer); None for dense models and between reads."""
        model = getattr(self.runner, "model", None)
        counts = getattr(model, "expert_tokens", None)
        now = time.monotonic()
        if counts is None or counts.numel() == 0 or now - self._expert_tokens_read < EXPERT_TOKENS_INTERVAL_S:
            return None
        self._expert_tokens_read = now
        layers = model.config.sparse_layers
        return {f"{layers[row]}.{e}": n for row, per_expert in enumerate(counts.tolist())
                for e, n in enumerate(per_expert)}


EXPERT_TOKENS_INTERVAL_S = 1.0
"""Most often the per-expert token counts are copied from the device into the stats."""

SPEC_MAX_BACKOFF = 32
"""Most steps a request goes without drafts after verify steps that accepted nothing."""


def _back_off(req: Request, accepted: int) -> None:
    """After a verify step: drafts that all missed make the request skip proposals for
    exponentially longer (1, 3, 7, ... steps, capped), so a request whose context never
    predicts its output pays for verify width rarely; one accepted draft resets it."""
    if accepted:
        req.spec_misses = 0
        return
    req.spec_misses += 1
    req.spec_skip = min(2 ** req.spec_misses - 1, SPEC_MAX_BACKOFF)


def _output(req: Request, new_tokens: list[int], logprobs) -> EngineCoreOutput:
    """What ``req`` received this step: one token, or several from a verify chunk (cut at a
    stop: ``new_tokens`` holds only those appended)."""
    first = req.num_output_tokens == len(new_tokens)
    return EngineCoreOutput(
        request_id=req.request_id,
        new_token_ids=list(new_tokens),
        new_logprobs=list(logprobs[: len(new_tokens)]) if logprobs is not None else None,
        finish_reason=req.finish_reason if req.is_finished else None,
        stop_reason=req.stop_reason if req.is_finished else None,
        num_cached_tokens=req.num_cached_tokens,
        queued_time=req.arrival_time if first else 0.0,
        scheduled_time=req.scheduled_time if first else 0.0,
        prompt_logprobs=req.prompt_logprobs if first and req.sampling_params.prompt_logprobs is not None else None,
    )


# ---- utility calls (AsyncLLM.call sends these by reference to a core in another process) ----
def publish_kv_snapshot(core: EngineCore) -> None:
    """Publish the whole prefix-cache state to the KV event publisher (index resync)."""
    core.kv.publish_snapshot()


def abort_with_result(core: EngineCore, request_id: str) -> tuple[bool, int]:
    """Abort a request; (whether it was live, KV blocks freed)."""
    found = core.scheduler.get_request(request_id) is not None
    return found, core.abort_request(request_id)

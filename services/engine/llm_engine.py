"""LLMEngine: the synchronous engine core. One ``step()`` is schedule → execute → update.

Not thread-safe: exactly one thread drives it (``LLM`` in the caller's thread,
``AsyncLLM`` on its engine thread).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace

import torch

from llmesh.engine.config import EngineConfig
from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.kv_cache.events import KVEventPublisher
from llmesh.engine.kv_cache.manager import KVCacheManager
from llmesh.engine.loader import LoadedModel, load_model
from llmesh.engine.model_runner import ModelRunner, StepHandle, TorchModelRunner
from llmesh.engine.quant.config import resolve_quantization
from llmesh.engine.output_processor import OutputProcessor
from llmesh.engine.outputs import RequestOutput, TokenLogprob
from llmesh.engine.request import FinishReason, Priority, Request
from llmesh.engine.sampler import Sampler
from llmesh.engine.sampling_params import SamplingParams
from llmesh.engine.scheduler import Scheduler
from llmesh.engine.scheduler_output import SchedulerOutput
from llmesh.engine.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (the gRPC ``Load`` RPC reports it)."""

    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    steps: int
    last_step_time: float
    """time.monotonic() at the end of the last step (health: a stuck loop stops moving it)."""


class LLMEngine:
    def __init__(self, config: EngineConfig, publisher: KVEventPublisher | None = None) -> None:
        self.config = config
        self._init_device()
        loaded = load_model(config.model, name=config.served_model_name)
        self.model_config = loaded.config
        self.model_name = loaded.config.name
        self._init_tokenizer(loaded)
        self._init_window()
        self._init_runner(loaded)
        self._init_scheduler(publisher)
        async_scheduling = config.async_scheduling
        if async_scheduling is None:
            async_scheduling = config.backend == "triton" and self.device.type == "cuda"
        self.async_scheduling = async_scheduling
        """Step N+1 is scheduled and launched before step N's tokens are processed."""
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._pending_outputs: list[RequestOutput] = []
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None
        """The launched step whose tokens the host has not processed yet."""
        self._steps = 0
        self._last_step_time = time.monotonic()

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

    def _init_tokenizer(self, loaded: LoadedModel) -> None:
        src = loaded.tokenizer_source
        self.tokenizer = Tokenizer.from_hf_folder(src) if isinstance(src, str) else Tokenizer.from_gguf_data(src)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)

    def _init_window(self) -> None:
        window = self.model_config.max_position_embeddings
        if self.model_config.sliding_window:
            window = min(window, self.model_config.sliding_window)
        if self.config.max_model_len is not None:
            window = min(window, self.config.max_model_len)
        self.max_model_len = window
        self.config.scheduler = replace(self.config.scheduler, max_model_len=window)  # validates it

    def _init_runner(self, loaded: LoadedModel) -> None:
        cache = self.config.cache
        self.quantization = resolve_quantization(
            self.config.quantization, model=self.config.model, source_format=loaded.source_format,
            checkpoint_method=loaded.checkpoint_method, device=self.device, backend=self.config.backend)
        weights = loaded.weights_for(self.quantization)
        common = dict(device=self.device, dtype=self.dtype, block_size=cache.block_size,
                      sampler=Sampler(seed=self.config.seed, device=self.device), num_blocks=cache.num_kv_blocks,
                      kv_cache_memory=cache.kv_cache_memory, gpu_memory_utilization=cache.gpu_memory_utilization,
                      linear_method=self.quantization.linear_method)
        if self.config.backend == "triton":
            from llmesh.engine.triton_runner import TritonModelRunner

            self.runner: ModelRunner = TritonModelRunner(
                self.model_config, weights, max_model_len=self.max_model_len,
                max_num_seqs=self.config.scheduler.max_num_seqs,
                max_num_batched_tokens=self.config.scheduler.max_num_batched_tokens,
                cuda_graphs=self.config.cuda_graphs, **common)
        else:
            self.runner = TorchModelRunner(self.model_config, weights, max_model_len=self.max_model_len, **common)

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
        log.info("engine ready", extra={"model": self.model_name, "kv_blocks": self.runner.num_blocks,
                                         "block_size": cache.block_size, "max_model_len": self.max_model_len})

    # ---- requests -------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = Priority.INTERACTIVE,
        cache_salt: str | None = None,
    ) -> Request:
        """Admit a request; raises InvalidRequestError (nothing is admitted) when it cannot run."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})",
                                          field="prompt_token_ids")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        req = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=token_ids,
            sampling_params=params,
            priority=int(priority),
            cache_salt=cache_salt,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        self.scheduler.add_request(req)
        self.output_processor.add_request(req)
        return req

    def abort_request(self, request_id: str, *, emit_output: bool = True) -> int:
        """Abort at any moment; returns how many KV blocks were freed (0 if unknown/finished).

        With ``emit_output`` the next step returns a final ABORT delta for the request;
        callers that end the stream themselves turn it off."""
        req = self.scheduler.get_request(request_id)
        freed = self.scheduler.abort_request(request_id)
        self.output_processor.remove(request_id)
        if req is not None and emit_output:
            self._pending_outputs.append(RequestOutput(
                request_id=request_id, prompt_token_ids=req.prompt_token_ids, finished=True,
                finish_reason=FinishReason.ABORT, num_cached_tokens=req.num_cached_tokens))
        return freed

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or bool(self._pending_outputs)
                or self._inflight is not None)

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule → launch → update. With async scheduling the update is the previous
        step's, done while this one computes; otherwise this step's, after it finishes."""
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._inflight is not None and self._needs_known_tokens():
            outputs.extend(self._finish_step(self._inflight))
            self._inflight = None
        scheduled = self.scheduler.schedule()
        launched = None if scheduled.is_empty else (scheduled, self.runner.launch(scheduled))
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            outputs.extend(self._finish_step(previous))
        if not self.async_scheduling and self._inflight is not None:
            outputs.extend(self._finish_step(self._inflight))
            self._inflight = None
        self.kv.flush_events()
        self._steps += 1
        self._last_step_time = time.monotonic()
        return outputs

    def _needs_known_tokens(self) -> bool:
        """Penalties count every output token, so the step in flight must land before the
        next is sampled; such batches run one step at a time."""
        return any(r.sampling_params.repetition_penalty != 1.0 or r.sampling_params.presence_penalty != 0.0
                   or r.sampling_params.frequency_penalty != 0.0 for r in self.scheduler.running)

    def _finish_step(self, launched: tuple[SchedulerOutput, StepHandle]) -> list[RequestOutput]:
        scheduled, handle = launched
        result = handle.result()
        updated = self.scheduler.update_from_output(scheduled, result.sampled_token_ids)
        return self._process([(req, result.logprobs.get(req.request_id)) for req in updated])

    def _process(self, items: list[tuple[Request, TokenLogprob | None]]) -> list[RequestOutput]:
        """Detokenize and check stop strings for requests that received tokens."""
        outputs = []
        for req, logprob in items:
            if not self.output_processor.has(req.request_id):
                continue  # aborted meanwhile; its final delta is already pending
            delta, hit_stop = self.output_processor.process(req, logprob)
            if hit_stop:
                # With async scheduling the request may already be in the next step's batch:
                # finishing it now makes that step drop its token.
                self.scheduler.finish_request(req.request_id, FinishReason.STOP)
                req.stop_reason = delta.stop_reason
            outputs.append(delta)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.kv.num_total_blocks,
            steps=self._steps,
            last_step_time=self._last_step_time,
        )

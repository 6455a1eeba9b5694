"""AsyncLLM: the engine for asyncio callers (the gRPC servicer), with the core in its own process.

This process keeps the front end: tokenization and checks (InputProcessor), incremental
detokenization and stop strings (OutputProcessor), the per-request streams. The engine
core (scheduler, model runner, KV cache) runs in a child process (core/core_proc.py), so
its step loop never waits for the GIL held by gRPC, protobuf or detokenization work.

Commands go to the core through a pipe and are applied before its next step, so an abort
frees the request's KV blocks within one step. Outputs come back on a reader thread that
detokenizes them and hands deltas to each caller's event loop. A core that dies or whose
step fails ends every stream at once with EngineDeadError, and new requests are refused
until ``restart_core`` has started a fresh core (the engine service does that; see
docs/operations.md). See docs/engine-core.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from llmesh.engine.config import EngineConfig
from llmesh.engine.core.core_client import CoreClient
from llmesh.engine.core.core_proc import CoreFaults
from llmesh.engine.core.engine_core import abort_with_result
from llmesh.engine.core.messages import AbortRequests, EngineCoreOutputs, EngineStats, UtilityCall
from llmesh.engine.errors import (
    EngineClosingError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
)
from llmesh.engine.input_processor import InputProcessor
from llmesh.engine.kv_cache.events import KVEventPublisher
from llmesh.engine.loader import load_model
from llmesh.engine.metrics import EngineMetrics
from llmesh.engine.output_processor import OutputProcessor
from llmesh.engine.parallel_sampling import fan_out
from llmesh.engine.outputs import EmbeddingOutput, RequestOutput
from llmesh.engine.pooling_params import PoolingParams, pooling_for_model
from llmesh.engine.request import FinishReason, Priority
from llmesh.engine.sampling_params import SamplingParams
from llmesh.engine.stats import IterationStats, RequestStats
from llmesh.engine.stream_delivery import Stream, deliver, merge, next_item, resolve
from llmesh.overload import RetryEstimator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AbortResult:
    found: bool
    """Whether a live (waiting or running) request had this id."""
    freed_blocks: int


class AsyncLLM:
    def __init__(self, config: EngineConfig, publisher: KVEventPublisher | None = None, *,
                 fault_step_delay_s: float = 0.0, fault_fail_step_at: int = 0,
                 fault_fail_admission: bool = False, log_level: str | None = None) -> None:
        loaded = load_model(config.model, name=config.served_model_name)  # config and tokenizer; no weights
        self.config = config
        self.model_config = loaded.config
        self.model_name = loaded.config.name
        self.input_processor = InputProcessor(loaded)
        self.output_processor = OutputProcessor(self.input_processor.tokenizer)
        self.metrics = EngineMetrics(self.model_name)
        self._publisher = publisher
        self._lock = threading.Lock()
        """Guards streams, calls and the output processor (the reader thread vs callers)."""
        self._streams: dict[str, Stream] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._choices: dict[str, list[str]] = {}
        """A live request's core id, when n > 1 → its choices' core request ids."""
        self._core_ids: dict[str, str] = {}
        """A live request's id as its caller gave it → the id it runs under in the core."""
        self._submissions = itertools.count()
        self._call_ids = itertools.count()
        self._dead: str | None = None
        self.closing = False
        """Set by shutdown(): a core that goes away now is not a failure to recover from."""
        self._death_listeners: list[Callable[[str], None]] = []
        self._progress = time.monotonic()
        self._stats: EngineStats | None = None
        self._faults = CoreFaults(step_delay_s=fault_step_delay_s, fail_at_step=fault_fail_step_at,
                                  fail_admission=fault_fail_admission)
        self._log_level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        self.core_starts = 1
        """Cores started so far (1 + restarts)."""
        self._core = self._start_core()
        self._retry = RetryEstimator()
        """Streams ending (finished or dropped): how soon a refused caller may find room."""
        ready = self._core.ready
        self.max_model_len = ready.max_model_len
        self.config.scheduler.max_model_len = ready.max_model_len
        self.kv_blocks_total = ready.num_kv_blocks
        self.device, self.dtype, self.quantization = ready.device, ready.dtype, ready.quantization
        if self._stats is None:
            self._stats = EngineStats(0, 0, 0, ready.num_kv_blocks, 0, time.monotonic())

    def _start_core(self) -> CoreClient:
        return CoreClient(self.config, on_message=self._on_message, on_death=self._on_death,
                          faults=self._faults, log_level=self._log_level)

    def restart_core(self) -> None:
        """Replace a dead core with a fresh process (blocks while it loads the model; call it
        from a thread). The old core's requests already ended with EngineDeadError and its
        KV blocks died with it, so the new core starts empty; new requests are refused, with
        the old core's failure as the reason, until this returns."""
        with self._lock:
            if self.closing:
                raise EngineClosingError("the engine is shutting down: no fresh core is started")
            if self._dead is None:
                raise RuntimeError("restart_core: the engine core is running")
            self._dead = f"{self._dead}; a fresh engine core is starting"
        self._core.shutdown(timeout=2)  # reap the old process (a failed core is already exiting)
        core = self._start_core()
        with self._lock:
            if self.closing:  # shutdown() came while the fresh core loaded: it must not outlive us
                core.shutdown(timeout=2)
                raise EngineClosingError("the engine is shutting down: the fresh core was stopped")
            self._core = core
            self._stats = EngineStats(0, 0, 0, core.ready.num_kv_blocks, 0, time.monotonic())
            self._progress = time.monotonic()
            self.core_starts += 1
            self._dead = None

    @property
    def tokenizer(self):
        return self.input_processor.tokenizer

    @property
    def core_pid(self) -> int:
        """The engine-core process (tests kill it)."""
        return self._core.pid

    @property
    def dead(self) -> str | None:
        """Why the core is gone, or None while it runs."""
        return self._dead

    # ---- public API (any event loop) ------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        request_id: str,
        priority: int = Priority.INTERACTIVE,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas of one request. Raises InvalidRequestError before the first
        delta when the request cannot be admitted, EngineOverloadedError when the waiting
        queue is full, EngineDeadError when the core is or goes away. Closing or
        cancelling the iterator aborts the request."""
        self._check_room()  # the cheap refusal first: a full queue costs no input processing
        arrival = time.monotonic()
        core_id = self._core_id(request_id)
        core_req = self.input_processor.process(prompt, params, request_id=core_id, priority=priority,
                                                cache_salt=cache_salt)
        choices = fan_out(core_req)
        index_of = {c.request_id: i for i, c in enumerate(choices)}
        stream = Stream(asyncio.get_running_loop())
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if request_id in self._core_ids:
                raise InvalidRequestError(f"request_id {request_id!r} is already used by a live request",
                                          field="request_id")
            self._check_room()
            for c in choices:
                self._streams[c.request_id] = stream
                self.output_processor.add_request(c, arrival)
            self._core_ids[request_id] = core_id
            if len(choices) > 1:
                self._choices[core_id] = list(index_of)
        live = set(index_of)
        try:
            for c in choices:
                self._core.send(c)
            while live:
                item = await next_item(stream)
                # A slow reader gets several tokens of a choice per delta.
                while (not item.finished and stream.items and not isinstance(stream.items[0], BaseException)
                       and stream.items[0].request_id == item.request_id):
                    item = merge(item, stream.items.popleft())
                if item.finished:
                    live.discard(item.request_id)
                item.index = index_of.get(item.request_id, 0)
                item.request_id = request_id
                yield item
        finally:
            with self._lock:
                self._choices.pop(core_id, None)
                if self._core_ids.get(request_id) == core_id:
                    del self._core_ids[request_id]
            for choice_id in live:
                self._forget(choice_id, stream)

    def _core_id(self, request_id: str) -> str:
        """The id a submission runs under in the core: the caller's plus a number no other
        submission of this engine has. An aborted request's last outputs may still be on their
        way back from the core when its caller reuses the id (a router escalating, a client
        retrying); keyed by the caller's id alone, they would land in the new request's stream
        (the escalation test caught a token of the aborted one at the head of the next)."""
        return f"{request_id}#{next(self._submissions)}"

    def pooling_params(self, dimensions: int | None = None) -> PoolingParams:
        """The PoolingParams of an embedding request to this engine (InvalidRequestError naming
        the model when it runs without a pooling mode, or cannot give ``dimensions``)."""
        p = self.config.pooler
        return pooling_for_model(self.model_name, p.pooling, p.normalize, p.matryoshka,
                                 self.model_config.hidden_size, dimensions)

    async def embed(
        self,
        prompts: list[str | list[int]],
        *,
        request_id: str,
        dimensions: int | None = None,
        priority: int = Priority.INTERACTIVE,
        cache_salt: str | None = None,
    ) -> list[EmbeddingOutput]:
        """The vectors of a batch of prompts, in order; input i runs as ``<request_id>/<i>``.

        The batch is refused as a whole (EngineOverloadedError) when the waiting queue is
        full, and fails as a whole when any input fails; cancelling the call aborts every
        input still running. Raises InvalidRequestError when the engine serves no
        embeddings or an input cannot run."""
        self._check_room()
        pooling = self.pooling_params(dimensions)
        arrival = time.monotonic()
        core_id = self._core_id(request_id)
        reqs = [self.input_processor.process(p, None, request_id=f"{core_id}/{i}", priority=priority,
                                             cache_salt=cache_salt, pooling=pooling)
                for i, p in enumerate(prompts)]
        stream = Stream(asyncio.get_running_loop())
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if request_id in self._core_ids:
                raise InvalidRequestError(f"request_id {request_id!r} is already used by a live request",
                                          field="request_id")
            self._check_room()
            for r in reqs:
                self._streams[r.request_id] = stream
                self.output_processor.add_request(r, arrival)
            self._core_ids[request_id] = core_id
        live = {r.request_id for r in reqs}
        done: dict[str, RequestOutput] = {}
        try:
            for r in reqs:
                self._core.send(r)
            while live:
                item = await next_item(stream)
                if not item.finished:
                    continue
                live.discard(item.request_id)
                if item.embedding is None:
                    raise EngineError(f"embedding input {item.request_id} ended without a vector "
                                      f"({item.finish_reason}{': ' + item.error if item.error else ''})")
                done[item.request_id] = item
        finally:
            with self._lock:
                if self._core_ids.get(request_id) == core_id:
                    del self._core_ids[request_id]
            for rid in live:
                self._forget(rid, stream)
        return [EmbeddingOutput(f"{request_id}/{i}", r.prompt_token_ids, done[r.request_id].embedding.tolist(),
                                done[r.request_id].num_cached_tokens) for i, r in enumerate(reqs)]

    async def abort(self, request_id: str) -> int:
        """Abort a request; returns how many KV blocks were freed."""
        return (await self.abort_request(request_id)).freed_blocks

    async def abort_request(self, request_id: str) -> AbortResult:
        """Abort a request (every choice of it) by the id its caller gave; says whether it was
        live and how many KV blocks were freed. Its stream ends with an ABORT delta per choice."""
        with self._lock:
            core_id, dead = self._core_ids.get(request_id), self._dead
        if dead is not None:
            raise EngineDeadError(dead)
        if core_id is None:
            return AbortResult(False, 0)  # not live here: the core holds nothing under it either
        return await self._abort_core(core_id)

    async def _abort_core(self, request_id: str) -> AbortResult:
        with self._lock:
            choice_ids = self._choices.get(request_id)
        if choice_ids is not None:
            results = [await self._abort_core(c) for c in choice_ids]
            return AbortResult(any(r.found for r in results), sum(r.freed_blocks for r in results))
        with self._lock:
            stream = self._streams.pop(request_id, None)
            self._record_abort(self.output_processor.remove(request_id))
        if stream is not None:
            deliver(stream, [RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ABORT)])
        found, freed = await self.call(abort_with_result, request_id)
        return AbortResult(found, freed)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(core, *args)`` in the core process between steps and return its result
        (or raise its error). ``fn`` travels by reference, so it must be a module-level
        function the core process can import; ``core`` is the EngineCore."""
        try:
            payload = pickle.dumps((fn, args))
        except Exception as e:
            raise TypeError(f"AsyncLLM.call runs its function in the engine-core process, so it must pickle "
                            f"(a module-level function, picklable arguments); {fn!r} does not: {e}") from e
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            call_id = next(self._call_ids)
            self._calls[call_id] = (loop, fut)
        try:
            self._core.send(UtilityCall(call_id, payload))
        except EngineDeadError:
            with self._lock:
                self._calls.pop(call_id, None)
            raise
        return await fut

    def stats(self) -> EngineStats:
        """The core's load as of its last message (each step, and every quarter second idle)."""
        return self._stats

    @property
    def has_work(self) -> bool:
        return bool(self._streams) or bool(self._calls)

    def seconds_since_progress(self) -> float:
        """Seconds since the core last finished a step or found nothing to do; grows
        without bound only when a step is stuck (health checks read it)."""
        return time.monotonic() - self._progress

    def on_core_death(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` (from the reader thread) when the core fails; not on shutdown."""
        self._death_listeners.append(listener)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self.closing = True
        self._fail_all("the engine is shutting down")
        self._core.shutdown(timeout)

    def _check_room(self) -> None:
        """Refuse a request the waiting queue has no room for, before the core sees it.

        Waiting = live streams that the core cannot start at its next step. From its last
        report (R running, W waiting): with nobody waiting, the free seats
        (max_num_seqs − R) take new requests; with some waiting, something other than
        seats (KV blocks) holds them, so every request beyond the running ones waits.
        Between reports this counts requests the core has just started as waiting, so the
        cap errs on the side of refusing. Nothing is allocated yet, so a refusal holds no
        KV block and no request slot.
        """
        s, sched = self._stats, self.config.scheduler
        free_seats = max(0, sched.max_num_seqs - s.num_running) if s.num_waiting == 0 else 0
        waiting = max(0, len(self._streams) - s.num_running - free_seats)
        if waiting >= sched.waiting_cap:
            hint = self._retry.hint(waiting - sched.waiting_cap + 1)
            raise EngineOverloadedError(
                f"the engine is overloaded: its waiting queue is full ({waiting} requests waiting, "
                f"max_waiting_requests={sched.waiting_cap}, {s.num_running} running)", retry_after_s=hint)

    # ---- the reader thread -------------------------------------------------------------------
    def _forget(self, request_id: str, stream: Stream) -> None:
        """The caller stopped listening: drop the stream and abort the request in the core."""
        with self._lock:
            if self._streams.get(request_id) is not stream:
                return
            del self._streams[request_id]
            self._record_abort(self.output_processor.remove(request_id))
            self._retry.finished()
            if self._dead is not None:
                return
        try:
            self._core.send(AbortRequests([request_id]))
        except EngineDeadError:
            pass  # a dead core holds no request and no block: nothing left to abort

    def _on_message(self, msg: EngineCoreOutputs) -> None:
        for batch in msg.kv_events:
            if self._publisher is not None:
                self._publisher.publish(batch)
        deliveries: dict[int, tuple[Stream, list]] = {}
        stopped: list[str] = []
        iteration = IterationStats(step_tokens=msg.step_tokens)
        with self._lock:
            if msg.stats is not None:
                self._stats, self._progress = msg.stats, msg.progress_time
            for out in msg.outputs:
                stream = self._streams.get(out.request_id)
                if stream is None or not self.output_processor.has(out.request_id):
                    continue  # aborted or stopped meanwhile
                delta, hit_stop = self.output_processor.process(out, iteration, msg.progress_time)
                if hit_stop:
                    stopped.append(out.request_id)
                if delta.finished:
                    del self._streams[out.request_id]
                    self._retry.finished()
                deliveries.setdefault(id(stream), (stream, []))[1].append(delta)
            for rej in msg.rejected:
                stream = self._streams.pop(rej.request_id, None)
                self.output_processor.remove(rej.request_id)
                if stream is not None:
                    err = (InvalidRequestError(rej.message, field=rej.field) if rej.invalid
                           else EngineError(f"the engine core could not admit the request: {rej.message}"))
                    deliveries.setdefault(id(stream), (stream, []))[1].append(err)
            calls = [(self._calls.pop(r.call_id), r) for r in msg.utility_results if r.call_id in self._calls]
        self.metrics.record(msg.stats, None if iteration.is_empty else iteration)
        if stopped:
            try:
                self._core.send(AbortRequests(stopped, FinishReason.STOP))
            except EngineDeadError:
                pass  # the stream already ended on its stop string; a dead core has nothing to free
        for stream, items in deliveries.values():
            deliver(stream, items)
        for (loop, fut), res in calls:
            resolve(loop, fut, res.result, res.error)

    def _record_abort(self, stats: RequestStats | None) -> None:
        """A live request the caller gave up on (cancel, disconnect, Abort) ends as 'abort'."""
        if stats is None:
            return
        iteration = IterationStats()
        iteration.finish(stats, str(FinishReason.ABORT), time.monotonic())
        self.metrics.record(None, iteration)

    def _on_death(self, reason: str) -> None:
        self._fail_all(reason)
        if not self.closing:
            for listener in self._death_listeners:
                listener(reason)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = reason
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
            for request_id in streams:
                self.output_processor.remove(request_id)
        for stream in streams.values():
            deliver(stream, [EngineDeadError(reason)])
        for loop, fut in calls.values():
            resolve(loop, fut, None, EngineDeadError(reason))

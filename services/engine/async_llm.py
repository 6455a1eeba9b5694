"""AsyncLLM: the engine for asyncio callers (the gRPC servicer).

The engine core is synchronous and single-threaded; it runs on one dedicated thread that
loops schedule → execute → update. Torch releases the GIL inside its kernels, so the
event loop stays responsive while a step runs. Callers talk to that thread through a
command queue (add / abort) and receive outputs through one asyncio.Queue per request.
An abort is applied before the next step starts, so a cancelled request's KV blocks are
free within one scheduler step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from llmesh.engine.config import EngineConfig
from llmesh.engine.kv_cache.events import KVEventPublisher
from llmesh.engine.llm_engine import EngineStats, LLMEngine
from llmesh.engine.outputs import RequestOutput
from llmesh.engine.request import FinishReason, Priority
from llmesh.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AbortResult:
    found: bool
    """Whether a live (waiting or running) request had this id."""
    freed_blocks: int


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    def __init__(self, config: EngineConfig, publisher: KVEventPublisher | None = None) -> None:
        self.engine = LLMEngine(config, publisher=publisher)
        self._commands: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._last_progress = time.monotonic()
        self.fault_step_delay_s = 0.0
        """Fault injection for tests of health and deadlines: sleep this long before each step."""
        self._thread = threading.Thread(target=self._run, name="llmesh-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

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
        delta when the request cannot be admitted. Closing or cancelling the iterator
        aborts the request."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        admitted: asyncio.Future = loop.create_future()

        def add() -> None:
            try:
                self.engine.add_request(prompt, params, request_id=request_id, priority=priority,
                                        cache_salt=cache_salt)
                self._streams[request_id] = stream
                _resolve(loop, admitted, None)
            except Exception as e:  # handed to the caller, whose mistake it usually is
                _resolve(loop, admitted, e)

        self._submit(add)
        error = await admitted
        if error is not None:
            raise error
        finished = False
        try:
            while True:
                out: RequestOutput = await stream.queue.get()
                while not out.finished and not stream.queue.empty():
                    out = _merge(out, stream.queue.get_nowait())  # a slow reader gets several tokens per delta
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._submit(lambda: self._abort_now(request_id))

    async def abort(self, request_id: str) -> int:
        """Abort a request; returns how many KV blocks were freed."""
        return (await self.abort_request(request_id)).freed_blocks

    async def abort_request(self, request_id: str) -> AbortResult:
        """Abort a request; says whether it was live and how many KV blocks were freed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._submit(lambda: _resolve(loop, fut, self._abort_now(request_id)))
        return await fut

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except Exception as e:
                loop.call_soon_threadsafe(lambda err=e: fut.done() or fut.set_exception(err))
                return
            _resolve(loop, fut, result)

        self._submit(run)
        return await fut

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests() or bool(self._commands)

    def seconds_since_progress(self) -> float:
        """Seconds since the engine thread last finished a step or found nothing to do;
        grows without bound only when a step is stuck (health checks read it)."""
        return time.monotonic() - self._last_progress

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- engine thread ----------------------------------------------------------------------
    def _submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(fn)
        self._wake.set()

    def _abort_now(self, request_id: str) -> AbortResult:
        found = self.engine.scheduler.get_request(request_id) is not None
        freed = self.engine.abort_request(request_id, emit_output=False)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            _deliver(stream, [RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ABORT)])
        return AbortResult(found, freed)

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                commands, self._commands = self._commands, []
                self._wake.clear()
            for fn in commands:
                fn()
            if not self.engine.has_unfinished_requests():
                self._last_progress = time.monotonic()
                self._wake.wait(0.5)
                continue
            if self.fault_step_delay_s:
                time.sleep(self.fault_step_delay_s)
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, never the thread
                log.error("engine step failed: %s\n%s", e, traceback.format_exc())
                outputs = self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
            self._dispatch(outputs)
            self._last_progress = time.monotonic()
        self._fail_all("the engine is shutting down")

    def _fail_all(self, message: str) -> list[RequestOutput]:
        outs = []
        for request_id in list(self._streams):
            self.engine.abort_request(request_id, emit_output=False)
            outs.append(RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ERROR,
                                      error=message))
        self._dispatch(outs)
        return []

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_stream: dict[int, tuple[_Stream, list[RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_stream.setdefault(id(stream), (stream, []))[1].append(out)
        for stream, outs in by_stream.values():
            _deliver(stream, outs)


def _deliver(stream: _Stream, outs: list[RequestOutput]) -> None:
    def put() -> None:
        for o in outs:
            stream.queue.put_nowait(o)
    try:
        stream.loop.call_soon_threadsafe(put)
    except RuntimeError:  # the caller's loop is closed: nobody is listening any more
        pass


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One delta covering ``a`` then ``b`` (b may be the last one)."""
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return RequestOutput(
        request_id=a.request_id, prompt_token_ids=a.prompt_token_ids or b.prompt_token_ids,
        token_ids=a.token_ids + b.token_ids, text=a.text + b.text, logprobs=logprobs,
        finished=b.finished, finish_reason=b.finish_reason, stop_reason=b.stop_reason,
        num_cached_tokens=b.num_cached_tokens or a.num_cached_tokens, error=b.error)


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any) -> None:
    def set_() -> None:
        if not fut.done():
            fut.set_result(value)
    try:
        loop.call_soon_threadsafe(set_)
    except RuntimeError:
        pass

"""The serving load generator: streams a workload over gRPC and times every token.

Three targets speak the same workload: ``GatewayTarget`` (the public Inference API, with
an optional API key), ``RouterTarget`` (Router.Generate, the hop behind the gateway) and
``EngineTarget`` (one engine's Engine.Generate, token ids as they are). Requests leave at their arrival offsets (Poisson, or all at once) and an
optional semaphore caps how many are in flight (fixed concurrency).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import itertools
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import aiohttp
import grpc
from tqdm.auto import tqdm

from llmesh.bench.workloads import RequestSpec, arrival_offsets
from llmesh.client import AsyncLlmeshClient
from llmesh.engine.errors import InvalidRequestError
from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc

_FINISH_ERROR = common_pb2.FINISH_REASON_ERROR
SAME_CHUNK = "same-chunk"
"""Third item of a streamed tuple: its tokens arrived with the previous message (no new time)."""


@dataclasses.dataclass
class RequestResult:
    """Timings of one request, in seconds from its own send time."""

    prompt_len: int
    max_tokens: int
    group: str = ""
    sent_at: float = 0.0
    """Seconds from the start of the run."""
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    """Arrival of each streamed message that carried tokens."""
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)
    e2e: float = 0.0
    error: str = ""
    """'' on success, else the gRPC status name (or FINISH_ERROR / FINISH_ABORT)."""
    detail: str = ""
    """The error's message, for the report."""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def output_len(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        n = self.output_len
        return (self.e2e - self.chunk_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        """Gaps between streamed messages (a message may carry several tokens)."""
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]


@dataclasses.dataclass
class RunResult:
    label: str
    rate: float
    max_concurrency: int | None
    duration_s: float
    requests: list[RequestResult]


class Target(abc.ABC):
    """Where requests go; ``stream`` yields (token count, finish error) per message, and
    optionally a third item: the error's detail, or SAME_CHUNK (tokens of the previous message)."""

    name = "target"

    async def open(self) -> None:
        """Connect (the default target needs nothing)."""

    async def close(self) -> None:
        """Disconnect (the default target holds nothing)."""

    @abc.abstractmethod
    def stream(self, spec: RequestSpec, ignore_eos: bool, timeout: float) -> AsyncIterator[tuple[int, str]]:
        """Send one request and stream its messages."""


class GatewayTarget(Target):
    """The gateway's Inference.Generate with token-id prompts, over ``connections`` TCP
    connections taken in turn per request (a gateway of several workers balances
    connections, not requests: one connection reaches one worker)."""

    name = "gateway"

    def __init__(self, address: str, model: str = "auto", api_key: str | None = None, connections: int = 1) -> None:
        self.address, self.model, self.api_key = address, model, api_key
        self.connections = max(1, connections)
        self._clients: list[AsyncLlmeshClient] = []
        self._next = 0

    @property
    def _client(self) -> AsyncLlmeshClient:
        self._next = (self._next + 1) % len(self._clients)
        return self._clients[self._next]

    async def open(self) -> None:
        self._clients = [AsyncLlmeshClient(self.address, api_key=self.api_key, own_connection=self.connections > 1)
                         for _ in range(self.connections)]

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients = []

    async def resolve_model(self, timeout: float = 10.0) -> int:
        """Pin the model (token-id prompts need an explicit one; "auto" works only when the
        gateway serves a single model); returns its max_model_len."""
        models = await self._client.list_models(timeout=timeout)
        names = [m.name for m in models]
        if self.model == "auto" and len(models) == 1:
            self.model = names[0]
        card = next((m for m in models if m.name == self.model), None)
        if card is None:
            raise InvalidRequestError(f"pick a model with --model: the gateway serves {', '.join(names) or 'none'}"
                                      f" and token-id prompts belong to one model (got {self.model!r})",
                                      field="model")
        return card.max_model_len

    async def stream(self, spec, ignore_eos, timeout):
        async for chunk in self._client.generate(spec.prompt_token_ids, self.model, timeout=timeout,
                                                 max_tokens=spec.max_tokens, temperature=0.0,
                                                 ignore_eos=ignore_eos):
            bad = chunk.finish_reason in ("error", "abort")
            yield len(chunk.token_ids), f"FINISH_{chunk.finish_reason.upper()}" if bad else ""


class _InternalTarget(Target):
    """A service behind the gateway, called over its own stub with raw token ids.
    ``credential``: the mesh secret's metadata (``Mesh.credential()``) where the internal
    services require it."""

    def __init__(self, address: str, credential: list[tuple[str, str]] | None = None) -> None:
        self.address = address
        self._metadata = credential or None
        self._channel: grpc.aio.Channel | None = None

    @abc.abstractmethod
    def _make_stub(self, channel: grpc.aio.Channel):
        """The service's stub over ``channel``."""

    @abc.abstractmethod
    def _request(self, spec: RequestSpec, sampling: common_pb2.SamplingParams):
        """The service's Generate request for ``spec``."""

    async def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = self._make_stub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def stream(self, spec, ignore_eos, timeout):
        sampling = common_pb2.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        call = self._stub.Generate(self._request(spec, sampling), timeout=timeout, metadata=self._metadata)
        try:
            async for msg in call:
                yield len(msg.token_ids), _finish_error(msg.finish_reason)
        finally:
            call.cancel()


class EngineTarget(_InternalTarget):
    """One engine's Engine.Generate, bypassing gateway and router."""

    name = "engine"

    def _make_stub(self, channel):
        return engine_pb2_grpc.EngineStub(channel)

    def _request(self, spec, sampling):
        return engine_pb2.EngineGenerateRequest(request_id=uuid.uuid4().hex,
                                                prompt_token_ids=spec.prompt_token_ids, sampling=sampling)

    async def info(self, timeout: float = 10.0) -> engine_pb2.InfoResponse:
        return await self._stub.Info(engine_pb2.InfoRequest(), timeout=timeout, metadata=self._metadata)


class RouterTarget(_InternalTarget):
    """The router's Router.Generate (what the gateway calls): the mesh without the gateway hop."""

    name = "router"

    def __init__(self, address: str, model: str, credential: list[tuple[str, str]] | None = None) -> None:
        super().__init__(address, credential)
        self.model = model

    def _make_stub(self, channel):
        return router_pb2_grpc.RouterStub(channel)

    def _request(self, spec, sampling):
        return router_pb2.RouteRequest(request_id=uuid.uuid4().hex, model=self.model,
                                       prompt_token_ids=spec.prompt_token_ids, sampling=sampling)


def run_loop(coro):
    """Run ``coro`` on uvloop when installed (as the services run): the load generator must not
    be what saturates. Returns its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _finish_error(finish_reason: int) -> str:
    """'' unless the stream ended in error or abort (then FINISH_ERROR / FINISH_ABORT)."""
    if finish_reason not in (_FINISH_ERROR, common_pb2.FINISH_REASON_ABORT):
        return ""
    return "FINISH_" + common_pb2.FinishReason.Name(finish_reason).removeprefix("FINISH_REASON_")


async def _one(target: Target, spec: RequestSpec, ignore_eos: bool, timeout: float, t_start: float,
               t0: float) -> RequestResult:
    res = RequestResult(len(spec.prompt_token_ids), spec.max_tokens, spec.group, sent_at=t_start - t0)
    try:
        async for item in target.stream(spec, ignore_eos, timeout):
            n, err, extra = item[0], item[1], item[2] if len(item) > 2 else ""
            if n and extra == SAME_CHUNK and res.chunk_tokens:
                res.chunk_tokens[-1] += n
            elif n:
                res.chunk_times.append(time.perf_counter() - t_start)
                res.chunk_tokens.append(n)
            if err:
                res.error = err
                res.detail = extra if extra != SAME_CHUNK else ""
    except grpc.aio.AioRpcError as e:
        res.error, res.detail = e.code().name, e.details() or ""
    except (aiohttp.ClientError, TimeoutError) as e:
        res.error, res.detail = type(e).__name__, str(e)
    res.e2e = time.perf_counter() - t_start
    return res


async def run_load(target: Target, requests: Sequence[RequestSpec], *, rate: float = float("inf"),
                   max_concurrency: int | None = None, seed: int = 0, ignore_eos: bool = True,
                   timeout: float = 600.0, label: str = "", progress: bool = True) -> RunResult:
    """Send ``requests`` at their Poisson arrival times (or all at once for an infinite
    rate), at most ``max_concurrency`` in flight; returns every request's timings."""
    offsets = arrival_offsets(len(requests), rate, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc=label or target.name, unit="req", file=sys.stderr,
               disable=not progress, leave=False)
    t0 = time.perf_counter()

    async def fire(offset: float, spec: RequestSpec) -> RequestResult:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is None:
            res = await _one(target, spec, ignore_eos, timeout, time.perf_counter(), t0)
        else:
            async with sem:
                res = await _one(target, spec, ignore_eos, timeout, time.perf_counter(), t0)
        bar.update(1)
        return res

    try:
        results = await asyncio.gather(*(fire(o, s) for o, s in zip(offsets, requests, strict=True)))
    finally:
        bar.close()
    return RunResult(label or target.name, rate, max_concurrency, time.perf_counter() - t0, list(results))

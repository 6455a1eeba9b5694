"""A small typed Python client for the llmesh gateway (the public ``Inference`` API).

    from llmesh.client import LlmeshClient

    with LlmeshClient("localhost:50051") as client:
        for chunk in client.generate("Once upon a time", max_tokens=32, temperature=0):
            print(chunk.text, end="", flush=True)

``AsyncLlmeshClient`` has the same methods for asyncio (``async for chunk in
client.generate(...)``). Streams are cancelled when the caller stops iterating (``break``
or closing the iterator), which frees the request's engine resources at once. Errors
are ``grpc.RpcError`` carrying the gateway's status code and message.

The API key comes from ``api_key=`` or the ``LLMESH_API_KEY`` environment variable and
is sent as ``authorization: Bearer <key>`` metadata, only when set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2

DEFAULT_ADDRESS = "localhost:50051"
API_KEY_ENV = "LLMESH_API_KEY"

_SAMPLING_FIELDS = frozenset(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
_PRIORITIES = {"interactive": common_pb2.PRIORITY_INTERACTIVE, "batch": common_pb2.PRIORITY_BATCH}


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Logprob:
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]
    """(token id, logprob) of the most likely tokens at this step, best first."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One streamed message: the text and tokens produced since the previous one."""

    text: str
    token_ids: list[int]
    model: str
    request_id: str
    finish_reason: str | None = None
    """On the last chunk: "stop", "length", "abort" or "error"; None before."""
    stop_reason: str = ""
    usage: Usage | None = None
    """Token counts, on the last chunk only."""
    replica: str = ""
    logprobs: list[Logprob] = dataclasses.field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: common_pb2.GenerateResponse) -> Chunk:
        finish = None
        if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            finish = common_pb2.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()
        usage = Usage(msg.usage.prompt_tokens, msg.usage.cached_tokens,
                      msg.usage.completion_tokens) if msg.HasField("usage") else None
        logprobs = [Logprob(lp.token_id, lp.logprob, lp.rank, [(t.token_id, t.logprob) for t in lp.top])
                    for lp in msg.logprobs]
        return cls(msg.text, list(msg.token_ids), msg.model, msg.request_id, finish, msg.stop_reason,
                   usage, msg.replica, logprobs)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    size_class: str
    max_model_len: int
    healthy_replicas: int
    replicas: int
    has_chat_template: bool = False
    """Chat renders conversations with the model's own template (``llmesh generate`` uses it)."""
    generation_defaults: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Sampling values the gateway applies where a request leaves them unset."""

    @classmethod
    def from_proto(cls, card: router_pb2.ModelCard) -> ModelInfo:
        defaults = {f.name: v for f, v in card.generation_defaults.ListFields()}
        return cls(card.name, card.size_class, card.max_model_len, card.healthy_replicas, card.replicas,
                   card.has_chat_template, defaults)


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    token_ids: list[int]
    tokens: list[str]
    max_model_len: int


Message = Mapping[str, str]
"""A chat message: {"role": "user", "content": "..."}."""


def sampling_params(**sampling: Any) -> common_pb2.SamplingParams:
    """The proto SamplingParams from keyword arguments named as its fields.

    Unset fields take the server's defaults; the gateway checks the ranges.
    """
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameters {sorted(unknown)}; known: {sorted(_SAMPLING_FIELDS)}")
    return common_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})


def _priority(priority: str | None) -> int:
    if priority is None:
        return common_pb2.PRIORITY_UNSPECIFIED
    if priority not in _PRIORITIES:
        raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, got {priority!r}")
    return _PRIORITIES[priority]


def generate_request(prompt: str | Sequence[int], model: str, request_id: str = "",
                     priority: str | None = None, **sampling: Any) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=model, sampling=sampling_params(**sampling),
                                        priority=_priority(priority), request_id=request_id)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _messages(messages: Sequence[Message]) -> list[inference_pb2.ChatMessage]:
    return [inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def chat_request(messages: Sequence[Message], model: str, request_id: str = "",
                 priority: str | None = None, **sampling: Any) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(model=model, messages=_messages(messages),
                                     sampling=sampling_params(**sampling), priority=_priority(priority),
                                     request_id=request_id)


def tokenize_request(model: str, text: str = "", messages: Sequence[Message] | None = None,
                     add_special_tokens: bool | None = None) -> inference_pb2.TokenizeRequest:
    req = inference_pb2.TokenizeRequest(model=model, text=text, messages=_messages(messages or []))
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The key given, else LLMESH_API_KEY, else the local admin key `llmesh up` created."""
    from llmesh.keys_cli import api_key_from_env_or_file

    key = api_key if api_key is not None else api_key_from_env_or_file()
    return (("authorization", f"Bearer {key}"),) if key else ()


def _tls(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    """TLS to the gateway when given the CA that signed its certificate (or LLMESH_TLS_CA)."""
    path = tls_ca or os.environ.get("LLMESH_TLS_CA")
    return grpc.ssl_channel_credentials(root_certificates=open(path, "rb").read()) if path else None


class _Base:
    def __init__(self, address: str, api_key: str | None, timeout: float | None) -> None:
        self.address = address
        self.timeout = timeout
        """Default deadline of each call in seconds (None: no deadline)."""
        self._metadata = _metadata(api_key)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class LlmeshClient(_Base):
    """Blocking client over one channel; use it as a context manager or call close()."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None,
                 timeout: float | None = None, tls_ca: str | None = None) -> None:
        super().__init__(address, api_key, timeout)
        creds = _tls(tls_ca)
        self._channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def generate(self, prompt: str | Sequence[int], model: str = "auto", *, timeout: float | None = None,
                 request_id: str = "", priority: str | None = None, **sampling: Any) -> Iterator[Chunk]:
        """Stream the completion of ``prompt`` (text, or token ids of ``model``)."""
        req = generate_request(prompt, model, request_id, priority, **sampling)
        return self._stream(self._stub.Generate(req, timeout=self._timeout(timeout), metadata=self._metadata))

    def chat(self, messages: Sequence[Message], model: str = "auto", *, timeout: float | None = None,
             request_id: str = "", priority: str | None = None, **sampling: Any) -> Iterator[Chunk]:
        """Stream the next assistant message of the conversation ``messages``."""
        req = chat_request(messages, model, request_id, priority, **sampling)
        return self._stream(self._stub.Chat(req, timeout=self._timeout(timeout), metadata=self._metadata))

    def tokenize(self, text: str = "", model: str = "", *, messages: Sequence[Message] | None = None,
                 add_special_tokens: bool | None = None, timeout: float | None = None) -> TokenizeResult:
        resp = self._stub.Tokenize(tokenize_request(model, text, messages, add_special_tokens),
                                   timeout=self._timeout(timeout), metadata=self._metadata)
        return TokenizeResult(list(resp.token_ids), list(resp.tokens), resp.max_model_len)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        resp = self._stub.ListModels(inference_pb2.ListModelsRequest(), timeout=self._timeout(timeout),
                                     metadata=self._metadata)
        return [ModelInfo.from_proto(c) for c in resp.models]

    @staticmethod
    def _stream(call) -> Iterator[Chunk]:
        try:
            for msg in call:
                yield Chunk.from_proto(msg)
        finally:
            call.cancel()  # no-op once the stream ended; aborts the request when the caller stopped early

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LlmeshClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncLlmeshClient(_Base):
    """asyncio client over one grpc.aio channel; create it inside a running event loop."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None,
                 timeout: float | None = None, tls_ca: str | None = None, own_connection: bool = False) -> None:
        """``own_connection``: a TCP connection no other channel of this process shares (channels
        to one address share one by default), e.g. to reach every worker of a gateway."""
        super().__init__(address, api_key, timeout)
        creds = _tls(tls_ca)
        options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else None
        self._channel = (grpc.aio.secure_channel(address, creds, options=options) if creds
                         else grpc.aio.insecure_channel(address, options=options))
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def generate(self, prompt: str | Sequence[int], model: str = "auto", *, timeout: float | None = None,
                 request_id: str = "", priority: str | None = None, **sampling: Any) -> AsyncIterator[Chunk]:
        req = generate_request(prompt, model, request_id, priority, **sampling)
        return self._stream(self._stub.Generate(req, timeout=self._timeout(timeout), metadata=self._metadata))

    def chat(self, messages: Sequence[Message], model: str = "auto", *, timeout: float | None = None,
             request_id: str = "", priority: str | None = None, **sampling: Any) -> AsyncIterator[Chunk]:
        req = chat_request(messages, model, request_id, priority, **sampling)
        return self._stream(self._stub.Chat(req, timeout=self._timeout(timeout), metadata=self._metadata))

    async def tokenize(self, text: str = "", model: str = "", *, messages: Sequence[Message] | None = None,
                       add_special_tokens: bool | None = None, timeout: float | None = None) -> TokenizeResult:
        resp = await self._stub.Tokenize(tokenize_request(model, text, messages, add_special_tokens),
                                         timeout=self._timeout(timeout), metadata=self._metadata)
        return TokenizeResult(list(resp.token_ids), list(resp.tokens), resp.max_model_len)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        resp = await self._stub.ListModels(inference_pb2.ListModelsRequest(), timeout=self._timeout(timeout),
                                           metadata=self._metadata)
        return [ModelInfo.from_proto(c) for c in resp.models]

    @staticmethod
    async def _stream(call) -> AsyncIterator[Chunk]:
        try:
            async for msg in call:
                yield Chunk.from_proto(msg)
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLlmeshClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

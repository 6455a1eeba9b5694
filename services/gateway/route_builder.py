"""From a Generate/Chat request to the router's RouteRequest, cheap checks first.

``check`` does everything that needs no tokenizer — size, request id, priority, the
prompt's presence and byte size, stop-string limits, sampling ranges, the model name and
the caller's right to it — so that a bad request, or one whose key has no budget left
(the rate limit runs between the two), is refused before any tokenizing. ``build`` then
tokenizes (large prompts in the tokenizer workers, off the event loop), fits the model
window and fills in the effective sampling.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc

from llmesh.errors import ServiceError, invalid_argument, unavailable
from llmesh.gateway import metrics
from llmesh.gateway.caller import Caller
from llmesh.gateway.catalog import ModelCatalog
from llmesh.gateway.config import GatewayConfig
from llmesh.gateway.generation_defaults import GenerationDefaults, apply_defaults
from llmesh.gateway.tokenizers import ModelTokenizers, TokenizerPool, input_bytes
from llmesh.gateway.tool_calls import ToolUse, forced_spec, template_messages, tool_use_of
from llmesh.gateway.validation import (
    AUTO,
    check_messages,
    check_priority,
    check_prompt_bytes,
    check_prompt_present,
    check_request_id,
    check_request_size,
    check_stop_limits,
    check_token_ids,
    fit_window,
    resolve_model,
    sampling_proto_with,
    to_sampling_params,
)
from llmesh.sampling_proto import structured_output_to_proto
from llmesh.v1 import common_pb2, inference_pb2, router_pb2


@dataclasses.dataclass
class CheckedRequest:
    """A Generate/Chat request that passed every check needing no tokenizer."""

    model: str
    """A served model, or ``auto``."""
    candidates: list[str]
    """The models its prompt is tokenized for: the one named, or every allowed one for auto."""
    sampling: common_pb2.SamplingParams
    priority: int
    """After the caller's tier (``tier_priority``)."""
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tool_use: ToolUse | None = None
    """Chat with tools: what the template renders and how calls are parsed from the output."""

    @property
    def known_tokens(self) -> int:
        """Tokens it reserves for sure, before tokenizing: a token-id prompt's length (a
        text prompt: at least one) plus max_tokens (unset: at least one)."""
        prompt = len(self.token_ids) if self.token_ids is not None else 1
        choices = self.sampling.n if self.sampling.HasField("n") else 1
        return prompt + choices * (self.sampling.max_tokens if self.sampling.HasField("max_tokens") else 1)

    @property
    def prompt_text(self) -> str:
        """What ``auto``'s policy reads: the text, or the last user message."""
        if self.messages is not None:
            return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        return self.text or ""


class RouteBuilder:
    def __init__(self, config: GatewayConfig, tokenizers: ModelTokenizers, pool: TokenizerPool,
                 catalog: ModelCatalog, defaults: GenerationDefaults) -> None:
        self._config = config
        self._tokenizers = tokenizers
        self._pool = pool
        self._catalog = catalog
        self._defaults = defaults

    # ---- checks that need no tokenizer -------------------------------------------------------
    async def check(self, request: inference_pb2.GenerateRequest | inference_pb2.ChatRequest,
                    caller: Caller) -> CheckedRequest:
        cfg = self._config
        check_request_size(request.ByteSize(), cfg.max_request_bytes)
        check_request_id(request.request_id)
        check_priority(request.priority)
        text = token_ids = messages = use = None
        sampling = request.sampling
        if isinstance(request, inference_pb2.ChatRequest):
            messages = check_messages([(m.role, m.content) for m in request.messages])
            for message, extra in zip(messages, template_messages(request.messages)):
                message.update(extra)
            check_prompt_bytes(input_bytes(messages=messages), cfg.max_prompt_bytes, "messages")
            use = tool_use_of(request, request.parallel_tool_calls if request.HasField("parallel_tool_calls")
                              else True)
            sampling = _forced_call_sampling(sampling, use)
        else:
            kind = request.WhichOneof("prompt")
            check_prompt_present(kind, request.text, request.token_ids.ids)
            if kind == "text":
                text = request.text
                check_prompt_bytes(input_bytes(text), cfg.max_prompt_bytes, "prompt.text")
            else:
                token_ids = list(request.token_ids.ids)
        check_stop_limits(sampling, cfg.max_stop_strings, cfg.max_stop_chars)
        to_sampling_params(sampling, cfg.default_max_tokens)
        priority = tier_priority(request.priority, caller)
        model = await self._resolve(request.model, caller)
        if token_ids is not None:
            if model == AUTO:
                raise invalid_argument("a token_ids prompt needs an explicit model: token ids belong to one "
                                       "model's tokenizer; send prompt text to use 'auto'")
            check_token_ids(token_ids, self.tokenizer(model).vocab_size, model, "prompt.token_ids")
            candidates = [model]
        else:
            candidates = self._candidates(model, caller)
        return CheckedRequest(model, candidates, sampling, priority, text, token_ids, messages, use)

    async def _resolve(self, requested: str, caller: Caller) -> str:
        cards = await self._catalog.cards(requested.strip())
        check_allowed(requested.strip(), list(cards), caller)
        return resolve_model(requested, [n for n in cards if caller.may_use(n)])

    def _candidates(self, model: str, caller: Caller) -> list[str]:
        if model != AUTO:
            self.tokenizer(model)
            return [model]
        names = [n for n in self._catalog.names if caller.may_use(n) and self._tokenizers.get(n)]
        if not names:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "no served model has a tokenizer in the gateway's models file")
        return names

    def tokenizer(self, model: str):
        tok = self._tokenizers.get(model)
        if tok is None and model in self._tokenizers.unavailable:
            raise unavailable(self._tokenizers.unavailable[model])
        if tok is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the gateway has no tokenizer for model {model!r}: add it to the gateway's "
                               "models file")
        return tok

    # ---- tokenizing and the route ----------------------------------------------------------
    async def build(self, checked: CheckedRequest, caller: Caller) -> router_pb2.RouteRequest:
        """Tokenize for every candidate model and build the RouteRequest."""
        if checked.token_ids is not None:
            prompts = {checked.model: checked.token_ids}
        else:
            encoded = await asyncio.gather(*(self._encode(m, checked) for m in checked.candidates))
            prompts = dict(zip(checked.candidates, encoded))
        return self._route_request(checked, prompts, caller)

    async def _encode(self, model: str, checked: CheckedRequest) -> list[int]:
        tok = self.tokenizer(model)
        if checked.messages is not None:
            tools = checked.tool_use.tools if checked.tool_use is not None else None
            return await self._pool.encode_chat(tok, model, checked.messages, tools)
        return await self._pool.encode(tok, model, checked.text or "")

    def _route_request(self, checked: CheckedRequest, prompts: dict[str, list[int]],
                       caller: Caller) -> router_pb2.RouteRequest:
        """Window checks, the effective max_tokens, and the RouteRequest itself (its
        request_id is set once the request is admitted, by the servicer's ``stream``).

        For ``auto`` only the models whose window fits the prompt are offered to the
        router; the request fails only when none does.
        """
        sampling, model = checked.sampling, checked.model
        requested = sampling.max_tokens if sampling.HasField("max_tokens") else None
        fitting: dict[str, int] = {}
        errors: list[ServiceError] = []
        for name, ids in prompts.items():
            try:
                fitting[name] = fit_window(len(ids), requested, self._config.default_max_tokens,
                                           self._catalog.window(name), name)
            except ServiceError as e:
                errors.append(e)
        if not fitting:
            raise errors[0]
        for name in fitting:
            tok = self._tokenizers.get(name)
            bad = next((t for t in sorted(sampling.logit_bias) if tok is not None and t >= tok.vocab_size), None)
            if bad is not None:
                raise invalid_argument(f"sampling.logit_bias: token id {bad} is outside model {name!r}'s "
                                       f"vocabulary [0, {tok.vocab_size})")
        max_tokens = min(fitting.values())
        effective = sampling_proto_with(sampling, max_tokens)
        apply_defaults(effective, self._defaults.common(fitting) if model == AUTO else self._defaults.of(model))
        to_sampling_params(effective, max_tokens)
        route = router_pb2.RouteRequest(
            model=model, sampling=effective, priority=checked.priority,
            cache_salt=caller.cache_salt, prompt_text=checked.prompt_text if model == AUTO else "",
            tier=caller.tier)
        if model == AUTO:
            for name in fitting:
                route.prompt_token_ids_by_model[name].ids.extend(prompts[name])
        else:
            route.prompt_token_ids.extend(prompts[model])
        return route


def _forced_call_sampling(sampling: common_pb2.SamplingParams, use: ToolUse | None) -> common_pb2.SamplingParams:
    """A forced function call (tool_choice "required" or a name) is generated under the
    grammar of its arguments' schema, put into the request's sampling."""
    forced = forced_spec(use) if use is not None else None
    if forced is None:
        return sampling
    if sampling.WhichOneof("structured_output") is not None:
        raise invalid_argument("tool_choice forces a function call, which is generated under its own "
                               "grammar: drop sampling.structured_output (or use tool_choice auto)")
    out = common_pb2.SamplingParams()
    out.CopyFrom(sampling)
    structured_output_to_proto(forced, out)
    return out


def check_allowed(model: str, served, caller: Caller) -> None:
    """A served model outside the key's list is PERMISSION_DENIED (not NOT_FOUND)."""
    if model in served and not caller.may_use(model):
        metrics.AUTH_FAILURES.labels("model_not_allowed").inc()
        allowed = ", ".join(sorted(n for n in served if caller.may_use(n))) or "none"
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                           f"API key {caller.key_id} may not use model {model!r}; it may use: {allowed}")


def tier_priority(priority: int, caller: Caller) -> int:
    """The key's tier is the request's priority: an interactive key's unset priority becomes
    interactive; a batch key's requests run at batch priority and may not ask for interactive."""
    if caller.tier == "interactive" and priority == common_pb2.PRIORITY_UNSPECIFIED:
        return common_pb2.PRIORITY_INTERACTIVE
    if caller.tier != "batch":
        return priority
    if priority == common_pb2.PRIORITY_INTERACTIVE:
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                           "this API key's tier is batch: it cannot ask for PRIORITY_INTERACTIVE "
                           "(leave priority unset or use PRIORITY_BATCH)")
    return common_pb2.PRIORITY_BATCH

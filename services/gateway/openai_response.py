"""The gateway's streamed messages → OpenAI's response objects (whole and SSE chunks).

One ``CompletionBuilder`` per request turns each ``GenerateResponse`` of the shared
stream into a chunk of ``chat.completion.chunk`` or ``text_completion`` objects, and
accumulates them into the non-streaming object. Token strings for logprobs come from
the serving model's tokenizer (the stream carries ids).
"""

from __future__ import annotations

import time
from typing import Any

from llmesh.engine.text.tokenizer import Tokenizer
from llmesh.gateway.http_errors import HttpError
from llmesh.v1 import common_pb2

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


def _tool_call_json(call: common_pb2.ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def usage_json(usage: common_pb2.Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class CompletionBuilder:
    """Builds one request's OpenAI objects; ``chat`` picks the chat or completions shape."""

    def __init__(self, chat: bool, request_id: str, tokenizer_of, logprobs: bool) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = ""
        self._tokenizer_of = tokenizer_of
        self._logprobs = logprobs
        self._texts: list[str] = []
        self._lp_items: list[tuple[str, float, list]] = []
        self._last_lp: list[tuple[str, float, list]] | None = None
        self._text_offset = 0
        self.finish_reason: str | None = None
        self.usage: common_pb2.Usage | None = None
        self._sent_role = False
        self.tool_calls: list[common_pb2.ToolCall] = []

    # ---- per message ---------------------------------------------------------------------
    def observe(self, resp: common_pb2.GenerateResponse) -> None:
        """Take in one streamed message (call before ``chunk``)."""
        self.model = resp.model or self.model
        if resp.finish_reason == common_pb2.FINISH_REASON_ERROR:
            raise HttpError(500, f"the engine failed the request: {resp.stop_reason or 'see the engine log'}",
                            type_="server_error")
        if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = FINISH_REASONS[resp.finish_reason]
        if resp.HasField("usage"):
            self.usage = resp.usage
        self.tool_calls.extend(resp.tool_calls)
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        self._texts.append(resp.text)
        self._last_lp = self._logprob_items(resp) if self._logprobs and resp.logprobs else None
        self._lp_items.extend(self._last_lp or ())

    def chunk(self, resp: common_pb2.GenerateResponse) -> dict[str, Any] | None:
        """The SSE chunk of this message; None when it carries nothing to send."""
        logprobs = self._format(self._last_lp) if self._last_lp is not None else None
        if not resp.text and logprobs is None and self.finish_reason is None and self._sent_role:
            return None
        if self.chat:
            delta: dict[str, Any] = {}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            if resp.text or "role" in delta:
                delta["content"] = resp.text
            if resp.tool_calls:
                # Each call whole in one delta (OpenAI may split the arguments over several;
                # clients concatenate them by index either way).
                start = len(self.tool_calls) - len(resp.tool_calls)
                delta["tool_calls"] = [dict(_tool_call_json(c), index=start + i)
                                       for i, c in enumerate(resp.tool_calls)]
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": resp.text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        return self._object([choice], chunk=True)

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with stream_options.include_usage: usage, no choices."""
        out = self._object([], chunk=True)
        out["usage"] = usage_json(self.usage or common_pb2.Usage())
        return out

    # ---- the whole response ----------------------------------------------------------------
    def whole(self) -> dict[str, Any]:
        text = "".join(self._texts)
        logprobs = self._whole_logprobs() if self._logprobs else None
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tool_calls:
                message["content"] = text or None  # OpenAI's shape for an answer that is only calls
                message["tool_calls"] = [_tool_call_json(c) for c in self.tool_calls]
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        out = self._object([choice], chunk=False)
        out["usage"] = usage_json(self.usage or common_pb2.Usage())
        return out

    def _object(self, choices: list, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    # ---- logprobs ----------------------------------------------------------------------------
    def _token(self, tok: Tokenizer | None, token_id: int) -> str:
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)

    def _logprob_items(self, resp: common_pb2.GenerateResponse) -> list[tuple[str, float, list]]:
        """(token text, logprob, [(alternative text, logprob)]) of each token of ``resp``."""
        tok = self._tokenizer_of(self.model)
        return [(self._token(tok, lp.token_id), lp.logprob,
                 [(self._token(tok, t.token_id), t.logprob) for t in lp.top]) for lp in resp.logprobs]

    def _whole_logprobs(self) -> dict[str, Any]:
        self._text_offset = 0
        return self._format(self._lp_items)

    def _format(self, items: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
        if self.chat:
            return {"content": [
                {"token": t, "logprob": p, "bytes": list(t.encode("utf-8")),
                 "top_logprobs": [{"token": a, "logprob": q, "bytes": list(a.encode("utf-8"))} for a, q in top]}
                for t, p, top in items]}
        offsets = []
        for t, _, _ in items:
            offsets.append(self._text_offset)
            self._text_offset += len(t)
        return {"tokens": [t for t, _, _ in items], "token_logprobs": [p for _, p, _ in items],
                "top_logprobs": [dict(top) for _, _, top in items], "text_offset": offsets}

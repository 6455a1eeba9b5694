"""The gateway's streamed messages → OpenAI's response objects (whole and SSE chunks).

One ``CompletionBuilder`` per request turns each ``GenerateResponse`` of the shared
stream into a chunk of ``chat.completion.chunk`` or ``text_completion`` objects, and
accumulates them into the non-streaming object. Token strings for logprobs come from
the serving model's tokenizer (the stream carries ids).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class _ChoiceState:
    """What one choice has sent so far."""

    texts: list[str] = dataclasses.field(default_factory=list)
    lp_items: list[tuple[str, float, bytes, list]] = dataclasses.field(default_factory=list)
    last_lp: list | None = None
    finish_reason: str | None = None
    started: bool = False
    """Its first chunk went out (the chat role, the echoed prompt)."""
    echo: str = ""
    """The prompt text the choice starts with (``echo: true``)."""
    text_offset: int = 0
    tool_calls: list[common_pb2.ToolCall] = dataclasses.field(default_factory=list)


class CompletionBuilder:
    """Builds one request's OpenAI objects; ``chat`` picks the chat or completions shape.

    With n > 1 the stream's messages belong to choices by their ``index``; each chunk
    carries the one choice its message belongs to, as OpenAI streams them. With ``echo``
    a completion starts with its prompt (the gateway puts it on each choice's first
    message), and with logprobs too, the prompt's tokens lead the logprobs (the first
    one with none, as OpenAI reports it)."""

    def __init__(self, chat: bool, request_id: str, tokenizer_of, logprobs: bool, echo: bool = False) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = ""
        self._tokenizer_of = tokenizer_of
        self._logprobs = logprobs
        self._echo = echo
        self._choices: dict[int, _ChoiceState] = {}
        self.usage: common_pb2.Usage | None = None

    # ---- per message ---------------------------------------------------------------------
    def observe(self, resp: common_pb2.GenerateResponse) -> None:
        """Take in one streamed message (call before ``chunk``)."""
        self.model = resp.model or self.model
        if resp.finish_reason == common_pb2.FINISH_REASON_ERROR:
            raise HttpError(500, f"the engine failed the request: {resp.stop_reason or 'see the engine log'}",
                            type_="server_error")
        st = self._choices.get(resp.index)
        echo_items = []
        if st is None:
            st = self._choices[resp.index] = _ChoiceState(echo=resp.prompt_text if self._echo else "")
            if self._echo and self._logprobs:
                echo_items = self._prompt_items(resp)
        if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            st.finish_reason = FINISH_REASONS[resp.finish_reason]
        if resp.HasField("usage"):
            self.usage = resp.usage
        st.tool_calls.extend(resp.tool_calls)
        if st.tool_calls and st.finish_reason == "stop":
            st.finish_reason = "tool_calls"
        st.texts.append(resp.text)
        items = echo_items + (self._logprob_items(resp.logprobs) if self._logprobs else [])
        st.last_lp = items or None
        st.lp_items.extend(items)

    def chunk(self, resp: common_pb2.GenerateResponse) -> dict[str, Any] | None:
        """The SSE chunk of this message; None when it carries nothing to send."""
        st = self._choices[resp.index]
        logprobs = self._format(st, st.last_lp) if st.last_lp is not None else None
        if not resp.text and logprobs is None and st.finish_reason is None and st.started:
            return None
        first = not st.started
        st.started = True
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if resp.text or first:
                delta["content"] = resp.text
            if resp.tool_calls:
                # Each call whole in one delta (OpenAI may split the arguments over several;
                # clients concatenate them by index either way).
                start = len(st.tool_calls) - len(resp.tool_calls)
                delta["tool_calls"] = [dict(_tool_call_json(c), index=start + i)
                                       for i, c in enumerate(resp.tool_calls)]
            choice = {"index": resp.index, "delta": delta, "logprobs": logprobs, "finish_reason": st.finish_reason}
        else:
            text = (st.echo if first else "") + resp.text
            choice = {"index": resp.index, "text": text, "logprobs": logprobs, "finish_reason": st.finish_reason}
        return self._object([choice], chunk=True)

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with stream_options.include_usage: usage, no choices."""
        out = self._object([], chunk=True)
        out["usage"] = usage_json(self.usage or common_pb2.Usage())
        return out

    # ---- the whole response ----------------------------------------------------------------
    def whole(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            st = self._choices[index]
            text = "".join(st.texts)
            st.text_offset = 0
            logprobs = self._format(st, st.lp_items) if self._logprobs else None
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if st.tool_calls:
                    message["content"] = text or None  # OpenAI's shape for an answer that is only calls
                    message["tool_calls"] = [_tool_call_json(c) for c in st.tool_calls]
                choices.append({"index": index, "message": message, "logprobs": logprobs,
                                "finish_reason": st.finish_reason})
            else:
                choices.append({"index": index, "text": st.echo + text, "logprobs": logprobs,
                                "finish_reason": st.finish_reason})
        out = self._object(choices, chunk=False)
        out["usage"] = usage_json(self.usage or common_pb2.Usage())
        return out

    def _object(self, choices: list, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    # ---- logprobs ----------------------------------------------------------------------------
    def _token(self, tok: Tokenizer | None, token_id: int, text: str, raw: bytes) -> tuple[str, bytes]:
        """The token's text and bytes: the engine's when it sent them, else the gateway's tokenizer's."""
        if text or raw:
            return text, raw or text.encode("utf-8")
        text = tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)
        return text, text.encode("utf-8")

    def _prompt_items(self, resp: common_pb2.GenerateResponse) -> list[tuple[str, float | None, bytes, list | None]]:
        """The echoed prompt's logprob items: its first token (no logprob: nothing comes before
        it), then the engine's prompt logprobs."""
        if not resp.prompt_token_ids:
            return []
        text, raw = self._token(self._tokenizer_of(self.model), resp.prompt_token_ids[0], "", b"")
        return [(text, None, raw, None)] + self._logprob_items(resp.prompt_logprobs)

    def _logprob_items(self, logprobs) -> list[tuple[str, float, bytes, list]]:
        """(token text, logprob, bytes, [(alternative text, logprob, bytes)]) of each TokenLogprob."""
        tok = self._tokenizer_of(self.model)
        items = []
        for lp in logprobs:
            text, raw = self._token(tok, lp.token_id, lp.token, lp.token_bytes)
            top = [(*self._token(tok, t.token_id, t.token, t.token_bytes), t.logprob) for t in lp.top]
            items.append((text, lp.logprob, raw, [(a, q, b) for a, b, q in top]))
        return items

    def _format(self, st: _ChoiceState, items: list[tuple[str, float, bytes, list]]) -> dict[str, Any]:
        if self.chat:
            return {"content": [
                {"token": t, "logprob": p, "bytes": list(raw),
                 "top_logprobs": [{"token": a, "logprob": q, "bytes": list(b)} for a, q, b in top]}
                for t, p, raw, top in items]}
        offsets = []
        for t, _, _, _ in items:
            offsets.append(st.text_offset)
            st.text_offset += len(t)
        return {"tokens": [t for t, _, _, _ in items], "token_logprobs": [p for _, p, _, _ in items],
                "top_logprobs": [None if top is None else {a: q for a, q, _ in top} for _, _, _, top in items],
                "text_offset": offsets}

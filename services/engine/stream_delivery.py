"""Outputs handed from the engine's reader thread to each caller's event loop.

AsyncLLM's reader thread detokenizes the core's outputs and must not touch a caller's
asyncio objects directly: each request's deltas go into its Stream through the loop's
call_soon_threadsafe, and a caller whose loop has closed is simply not listening any more.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llmesh.engine.outputs import RequestOutput


@dataclass
class Stream:
    """One request's deltas on their way to the caller's event loop; an exception item
    ends the stream with that error."""

    loop: asyncio.AbstractEventLoop
    items: deque = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


async def next_item(stream: Stream) -> RequestOutput:
    """The stream's next output, waiting for one; raises the error that ended the stream."""
    while not stream.items:
        stream.ready.clear()
        await stream.ready.wait()
    item = stream.items.popleft()
    if isinstance(item, BaseException):
        raise item
    return item


def deliver(stream: Stream, items: list) -> None:
    def put() -> None:
        stream.items.extend(items)
        stream.ready.set()
    try:
        stream.loop.call_soon_threadsafe(put)
    except RuntimeError:  # the caller's loop is closed: nobody is listening any more
        pass


def merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One delta covering ``a`` then ``b`` (b may be the last one)."""
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return RequestOutput(
        request_id=a.request_id, prompt_token_ids=a.prompt_token_ids or b.prompt_token_ids,
        token_ids=a.token_ids + b.token_ids, text=a.text + b.text, logprobs=logprobs,
        finished=b.finished, finish_reason=b.finish_reason, stop_reason=b.stop_reason,
        num_cached_tokens=b.num_cached_tokens or a.num_cached_tokens, error=b.error, index=a.index,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        embedding=b.embedding)


def resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any,
             error: BaseException | None = None) -> None:
    def set_() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    try:
        loop.call_soon_threadsafe(set_)
    except RuntimeError:  # the caller's loop is closed: nobody awaits the result any more
        pass

"""Parallel sampling (``n`` > 1): one request fans out into n choices inside the engine.

As in vLLM V1's parent-request fan-out, the front end turns a request into n core
requests — one per choice — and merges their outputs back into one stream tagged with
the choice index. What is particular here is how the prompt is shared: choice 0 is
scheduled as usual, and every other choice names it in ``fork_of``; the scheduler admits
those only once choice 0's prompt is computed and gives them its prompt's full KV blocks
by reference (``KVCacheManager.fork_blocks``). The prompt is thus prefilled once, the
blocks are held n times and freed when the last choice lets go — whether or not prefix
caching is on.

Seeds: choice i of a seeded request samples with ``seed + i``, so choices differ from
each other yet each is reproducible; greedy choices are identical.
"""

from __future__ import annotations

import dataclasses

from llmesh.engine.core.messages import EngineCoreRequest

CHOICE_SEPARATOR = "#"
"""Between a request id and a choice index in the id of a choice's core request."""


def choice_request_id(request_id: str, index: int) -> str:
    return f"{request_id}{CHOICE_SEPARATOR}{index}"


def fan_out(request: EngineCoreRequest) -> list[EngineCoreRequest]:
    """The core requests of ``request``'s choices, choice 0 first; itself when n == 1."""
    params = request.sampling_params
    if params.n == 1:
        return [request]
    first = choice_request_id(request.request_id, 0)
    choices = []
    for i in range(params.n):
        seed = None if params.seed is None else params.seed + i
        choices.append(dataclasses.replace(
            request, request_id=choice_request_id(request.request_id, i),
            sampling_params=dataclasses.replace(params, n=1, seed=seed),
            fork_of=None if i == 0 else first))
    return choices

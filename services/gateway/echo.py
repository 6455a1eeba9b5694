"""``echo``: the prompt sent back on each choice's first message, as text and as token ids.

The ids are the ones the engine saw (the serving model's, after the gateway tokenized the
text); the text is the prompt as sent, or those ids decoded when the prompt was ids.
"""

from __future__ import annotations

from collections.abc import Callable

from llmesh.engine.text.tokenizer import Tokenizer
from llmesh.v1 import common_pb2, inference_pb2, router_pb2


class PromptEcho:
    def __init__(self, request: inference_pb2.GenerateRequest, route: router_pb2.RouteRequest,
                 tokenizer_of: Callable[[str], Tokenizer | None]) -> None:
        self._request, self._route, self._tokenizer_of = request, route, tokenizer_of
        self._sent: set[int] = set()

    def fill(self, resp: common_pb2.GenerateResponse) -> None:
        """Set the prompt on ``resp`` when it is the first message of its choice."""
        if resp.index in self._sent:
            return
        self._sent.add(resp.index)
        by_model = self._route.prompt_token_ids_by_model
        ids = list(by_model[resp.model].ids) if resp.model in by_model else list(self._route.prompt_token_ids)
        resp.prompt_token_ids[:] = ids
        if self._request.WhichOneof("prompt") == "text":
            resp.prompt_text = self._request.text
        else:
            tok = self._tokenizer_of(resp.model)
            resp.prompt_text = tok.decode(ids, skip_special_tokens=False) if tok is not None else ""

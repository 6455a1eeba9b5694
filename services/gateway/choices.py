"""A generation stream's messages gathered into whole choices (``n`` of them, by index).

The unary gRPC calls (Complete, ChatComplete) read a stream to its end and answer once.
"""

from __future__ import annotations

import dataclasses

from llmesh.v1 import common_pb2, inference_pb2


@dataclasses.dataclass
class Choice:
    """One choice so far."""

    index: int
    texts: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    stop_reason: str = ""
    tool_calls: list[common_pb2.ToolCall] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[common_pb2.TokenLogprob] = dataclasses.field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)


class ChoiceAccumulator:
    """Feed every message of a stream to ``add``; read ``choices`` (index order) at the end."""

    def __init__(self) -> None:
        self._choices: dict[int, Choice] = {}
        self.request_id = ""
        self.model = ""
        self.replica = ""
        self.usage: common_pb2.Usage | None = None
        self.prompt_text = ""
        self.prompt_token_ids: list[int] = []

    def add(self, resp: common_pb2.GenerateResponse) -> Choice:
        """Take in one message; returns the choice it belongs to."""
        self.request_id = resp.request_id or self.request_id
        self.model = resp.model or self.model
        self.replica = resp.replica or self.replica
        choice = self._choices.get(resp.index)
        if choice is None:
            choice = self._choices[resp.index] = Choice(resp.index)
        choice.texts.append(resp.text)
        choice.token_ids.extend(resp.token_ids)
        choice.logprobs.extend(resp.logprobs)
        choice.tool_calls.extend(resp.tool_calls)
        choice.prompt_logprobs.extend(resp.prompt_logprobs)
        if resp.prompt_token_ids:
            self.prompt_text, self.prompt_token_ids = resp.prompt_text, list(resp.prompt_token_ids)
        if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            choice.finish_reason, choice.stop_reason = resp.finish_reason, resp.stop_reason
        if resp.HasField("usage"):
            self.usage = resp.usage
        return choice

    @property
    def choices(self) -> list[Choice]:
        return [self._choices[i] for i in sorted(self._choices)]

    def response(self) -> inference_pb2.CompleteResponse:
        """The whole answer of a unary call."""
        out = inference_pb2.CompleteResponse(request_id=self.request_id, model=self.model, replica=self.replica,
                                             prompt_text=self.prompt_text, prompt_token_ids=self.prompt_token_ids)
        for c in self.choices:
            out.choices.add(index=c.index, text=c.text, token_ids=c.token_ids, logprobs=c.logprobs,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason, tool_calls=c.tool_calls,
                            prompt_logprobs=c.prompt_logprobs)
        if self.usage is not None:
            out.usage.CopyFrom(self.usage)
        return out

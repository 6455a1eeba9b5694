"""Turns sampled tokens into text deltas: incremental detokenization and stop strings.

Runs on the engine thread after each step. A stop string is matched on the text, so it
may span several tokens; the text before it is emitted, the stop string never is, and
the scheduler is told to finish the request.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmesh.engine.outputs import RequestOutput, TokenLogprob
from llmesh.engine.request import FinishReason, Request
from llmesh.engine.text.detokenizer import IncrementalDetokenizer
from llmesh.engine.text.stop import StopStringMatcher
from llmesh.engine.text.tokenizer import Tokenizer


@dataclass
class _RequestState:
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher | None
    num_sent_tokens: int = 0
    stopped_by_string: str | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(self, req: Request) -> None:
        sp = req.sampling_params
        self._states[req.request_id] = _RequestState(
            detokenizer=IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, sp.skip_special_tokens),
            stop=StopStringMatcher(sp.stop) if sp.stop else None,
        )

    def has(self, request_id: str) -> bool:
        return request_id in self._states

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, req: Request, logprob: TokenLogprob | None) -> tuple[RequestOutput, bool]:
        """Delta for the tokens ``req`` received since the last call.

        Returns the delta and whether a stop string just ended the request (the caller
        then finishes it in the scheduler). Finished requests are forgotten here.
        """
        st = self._states[req.request_id]
        new_ids = req.output_token_ids[st.num_sent_tokens :]
        st.num_sent_tokens = req.num_output_tokens
        text = st.detokenizer.add(new_ids)
        hit_stop = False
        if st.stop is not None and st.stopped_by_string is None:
            res = st.stop.feed(text)
            text = res.text
            if res.stopped:
                st.stopped_by_string = res.stop_string
                hit_stop = True
        finished = req.is_finished or hit_stop
        if finished and not hit_stop:
            text += self._flush(st)
        out = RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(new_ids),
            text=text,
            logprobs=[logprob] if logprob is not None else None,
            finished=finished,
            finish_reason=FinishReason.STOP if hit_stop else req.finish_reason,
            stop_reason=st.stopped_by_string if hit_stop else req.stop_reason,
            num_cached_tokens=req.num_cached_tokens,
        )
        if finished:
            self.remove(req.request_id)
        return out, hit_stop

    def _flush(self, st: _RequestState) -> str:
        text = st.detokenizer.flush()
        if st.stop is None:
            return text
        res = st.stop.feed(text)
        return res.text if res.stopped else res.text + st.stop.flush()

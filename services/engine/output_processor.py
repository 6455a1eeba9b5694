"""The front end's second half: core outputs (token ids) → text deltas, with incremental
detokenization and stop strings.

A stop string is matched on the text, so it may span several tokens; the text before it
is emitted, the stop string never is, and the caller finishes the request in the core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmesh.engine.core.messages import EngineCoreOutput, EngineCoreRequest
from llmesh.engine.outputs import RequestOutput
from llmesh.engine.request import FinishReason
from llmesh.engine.stats import IterationStats, RequestStats
from llmesh.engine.text.detokenizer import IncrementalDetokenizer
from llmesh.engine.text.stop import StopStringMatcher
from llmesh.engine.text.tokenizer import Tokenizer


@dataclass
class _RequestState:
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher | None
    stats: RequestStats = field(default_factory=lambda: RequestStats(time.monotonic(), 0))
    held: list[int] | None = None
    """Output ids not yet detokenized (None: text deltas per step)."""


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(self, req: EngineCoreRequest, arrival_time: float | None = None, *,
                    text_deltas: bool = True) -> None:
        """``arrival_time``: time.monotonic() when the request reached the front end (now if None).
        ``text_deltas`` False: a caller that reads the text only at the end (``LLM.generate``)
        gets it all in the final delta; without stop strings the tokens are then detokenized
        once at the finish rather than every step (at batch 256, profiled on a 2-core CPU with
        a tiny model, the step's text work went from 5.7 to 1.7 ms of about 30 ms of host work)."""
        sp = req.sampling_params
        self._states[req.request_id] = _RequestState(
            prompt_token_ids=req.prompt_token_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, sp.skip_special_tokens),
            stop=StopStringMatcher(sp.stop) if sp.stop else None,
            stats=RequestStats(time.monotonic() if arrival_time is None else arrival_time,
                               len(req.prompt_token_ids)),
            held=None if text_deltas or sp.stop else [],
        )

    def has(self, request_id: str) -> bool:
        return request_id in self._states

    def remove(self, request_id: str) -> RequestStats | None:
        """Forget a request; returns its timeline (None when it was not live)."""
        st = self._states.pop(request_id, None)
        return st.stats if st is not None else None

    def prompt_token_ids(self, request_id: str) -> list[int]:
        return self._states[request_id].prompt_token_ids

    def process(self, out: EngineCoreOutput, iteration: IterationStats | None = None,
                step_time: float = 0.0) -> tuple[RequestOutput, bool]:
        """The delta for one core output.

        Returns the delta and whether a stop string just ended the request (the caller
        then finishes it in the core with STOP). Finished requests are forgotten here.
        With ``iteration``, the output's tokens and timings (``step_time``: when the core's
        step ended) are accounted there.
        """
        st = self._states[out.request_id]
        now = time.monotonic()
        token_ids, logprobs = list(out.new_token_ids), out.new_logprobs
        hit_stop, stop_string = False, None
        if st.held is not None:
            st.held.extend(token_ids)
            text = ""
        elif st.stop is None:
            text = st.detokenizer.add(token_ids)
        else:
            # Several tokens at once (speculative decoding): fed one by one, so the tokens
            # after the one that completes a stop string are never emitted.
            text = ""
            for i, token in enumerate(token_ids):
                res = st.stop.feed(st.detokenizer.add([token]))
                text += res.text
                if res.stopped:
                    hit_stop, stop_string = True, res.stop_string
                    token_ids = token_ids[: i + 1]
                    logprobs = logprobs[: i + 1] if logprobs is not None else None
                    break
        if iteration is not None:  # the tokens cut after a stop string are not counted
            iteration.update_from_output(out, st.stats, step_time, now, num_tokens=len(token_ids))
        finished = out.finished or hit_stop
        if finished and not hit_stop:
            text += self._flush(st)
        delta = RequestOutput(
            request_id=out.request_id,
            prompt_token_ids=st.prompt_token_ids,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            finished=finished,
            finish_reason=FinishReason.STOP if hit_stop else out.finish_reason,
            stop_reason=stop_string if hit_stop else out.stop_reason,
            num_cached_tokens=out.num_cached_tokens,
            error=out.error,
            prompt_logprobs=out.prompt_logprobs,
            embedding=out.embedding,
        )
        if finished:
            self.remove(out.request_id)
            if iteration is not None:
                iteration.finish(st.stats, str(delta.finish_reason), now)
        return delta, hit_stop

    def _flush(self, st: _RequestState) -> str:
        if st.held is not None:  # the same detokenizer, fed every token at once
            return st.detokenizer.add(st.held) + st.detokenizer.flush()
        text = st.detokenizer.flush()
        if st.stop is None:
            return text
        res = st.stop.feed(text)
        return res.text if res.stopped else res.text + st.stop.flush()

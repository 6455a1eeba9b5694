"""``llmesh bench offline``: the same workloads through an in-process engine.

No gRPC, no other process: the step loop itself, so the difference from ``bench serve``
against one engine is what serving costs. Requests join the loop at their arrival
offsets (all at once by default: peak throughput) and are timed per step output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from llmesh.bench.loadgen import RequestResult, RunResult
from llmesh.bench.workloads import RequestSpec, arrival_offsets
from llmesh.engine import LLM, SamplingParams
from llmesh.engine.request import FinishReason


def load_engine(model: str | None, *, device: str = "cpu", dtype: str = "float32", **engine_kwargs) -> LLM:
    """The model (default: the demo model) as an ``LLM`` for :func:`run_offline`."""
    from llmesh.engine.loader import find_demo_model

    return LLM(model or find_demo_model(), device=device, dtype=dtype, **engine_kwargs)


def run_offline(llm: LLM, requests: Sequence[RequestSpec], *, rate: float = float("inf"), seed: int = 0,
                ignore_eos: bool = True, label: str = "offline", progress: bool = True) -> RunResult:
    """Run ``requests`` to completion in ``llm``'s step loop; timings as in ``run_load``."""
    engine = llm.engine
    offsets = arrival_offsets(len(requests), rate, seed)
    results: dict[str, RequestResult] = {}
    sent: dict[str, float] = {}
    bar = tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr, disable=not progress, leave=False)
    t0, nxt = time.perf_counter(), 0
    while nxt < len(requests) or engine.has_unfinished_requests():
        now = time.perf_counter()
        while nxt < len(requests) and t0 + offsets[nxt] <= now:
            spec = requests[nxt]
            params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=ignore_eos)
            rid = engine.add_request(spec.prompt_token_ids, params, request_id=f"bench-{nxt}").request_id
            results[rid] = RequestResult(len(spec.prompt_token_ids), spec.max_tokens, spec.group, sent_at=now - t0)
            sent[rid], nxt = now, nxt + 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, t0 + offsets[nxt] - time.perf_counter()))
            continue
        for delta in engine.step():
            res, at = results[delta.request_id], time.perf_counter() - sent[delta.request_id]
            if delta.token_ids:
                res.chunk_times.append(at)
                res.chunk_tokens.append(len(delta.token_ids))
            if delta.finished:
                res.e2e = at
                if delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    res.error = f"FINISH_{delta.finish_reason.name}"
                bar.update(1)
    bar.close()
    return RunResult(label, rate, None, time.perf_counter() - t0, list(results.values()))

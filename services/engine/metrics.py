"""The engine's Prometheus metrics, at parity with vLLM V1's (served on --metrics-port by
GrpcServer). Every metric is labelled by the served model's name (``model``).

The front end records them (``EngineMetrics.record``) from each message of the core:
the core's state and counters (``EngineStats``) and what that message's outputs brought
(``IterationStats``). Buckets are vLLM's.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from llmesh.engine.core.messages import EngineStats
from llmesh.engine.request import FinishReason
from llmesh.engine.stats import IterationStats


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value``."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


_TOKEN_BUCKETS = build_1_2_5_buckets(1_000_000)
"""vLLM sizes these to the model window; one process may serve engines of several windows
(tests), so they reach past any window served here."""
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                          20.0, 40.0, 80.0)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

_M = ["model"]

NUM_RUNNING = Gauge("llmesh_engine_num_requests_running", "Requests in the running batch.", _M)
NUM_WAITING = Gauge("llmesh_engine_num_requests_waiting", "Requests waiting for admission (preempted ones "
                    "included).", _M)
KV_CACHE_USAGE = Gauge("llmesh_engine_kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests; 1 "
                       "means full (cached free blocks count as free).", _M)
PREFIX_CACHE_QUERIES = Counter("llmesh_engine_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                               "cache, once per request at its first admission.", _M)
PREFIX_CACHE_HITS = Counter("llmesh_engine_prefix_cache_hits", "Prompt tokens found in the prefix cache "
                            "(their K/V was not computed again).", _M)
PREEMPTIONS = Counter("llmesh_engine_num_preemptions", "Requests preempted (blocks freed, recomputed later) "
                      "because the KV cache ran out.", _M)
PROMPT_TOKENS = Counter("llmesh_engine_prompt_tokens", "Prompt tokens of requests that got their first token "
                        "(cached ones included).", _M)
GENERATION_TOKENS = Counter("llmesh_engine_generation_tokens", "Tokens generated.", _M)
REQUEST_SUCCESS = Counter("llmesh_engine_request_success", "Requests finished, by reason (stop, length, "
                          "abort, error).", _M + ["finished_reason"])

SPEC_VERIFY_STEPS = Counter("llmesh_engine_spec_decode_verify_steps", "Verify chunks run by speculative "
                            "decoding (one per speculating request per step).", _M)
SPEC_PROPOSED = Counter("llmesh_engine_spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", _M)
SPEC_ACCEPTED = Counter("llmesh_engine_spec_decode_num_accepted_tokens", "Draft tokens the target accepted.", _M)
SPEC_EMITTED = Counter("llmesh_engine_spec_decode_num_emitted_tokens", "Tokens verify chunks emitted: accepted "
                       "drafts plus the target's own token, cut at a stop.", _M)
SPEC_ACCEPTANCE = Gauge("llmesh_engine_spec_decode_acceptance_rate", "Accepted / proposed draft tokens since "
                        "the core started.", _M)
SPEC_MEAN_LENGTH = Gauge("llmesh_engine_spec_decode_mean_accepted_length", "Tokens per verify step (accepted "
                         "drafts + 1) since the core started.", _M)

EXPERT_TOKENS = Counter("llmesh_engine_expert_tokens", "Tokens routed to each expert of a mixture of experts, "
                        "by expert = \"layer.expert\" (decoder layer index, expert index); each token counts "
                        "once per expert of its top-k.", _M + ["expert"])

ITERATION_TOKENS = Histogram("llmesh_engine_iteration_tokens_total", "Tokens computed per engine step "
                             "(prefill chunks and decodes).", _M, buckets=_ITERATION_TOKEN_BUCKETS)
REQUEST_PROMPT_TOKENS = Histogram("llmesh_engine_request_prompt_tokens", "Prompt tokens per finished request.",
                                  _M, buckets=_TOKEN_BUCKETS)
REQUEST_GENERATION_TOKENS = Histogram("llmesh_engine_request_generation_tokens", "Generated tokens per "
                                      "finished request.", _M, buckets=_TOKEN_BUCKETS)
TTFT = Histogram("llmesh_engine_time_to_first_token_seconds", "From the engine receiving a request to its first "
                 "token.", _M, buckets=_TTFT_BUCKETS)
ITL = Histogram("llmesh_engine_inter_token_latency_seconds", "Between consecutive output tokens of a request "
                "(one observation per token).", _M, buckets=_TOKEN_LATENCY_BUCKETS)
TPOT = Histogram("llmesh_engine_time_per_output_token_seconds", "A finished request's mean time per output token "
                 "after the first (decode time / (tokens - 1)).", _M, buckets=_TOKEN_LATENCY_BUCKETS)
E2E_LATENCY = Histogram("llmesh_engine_e2e_request_latency_seconds", "From the engine receiving a request to its "
                        "end.", _M, buckets=_REQUEST_LATENCY_BUCKETS)
QUEUE_TIME = Histogram("llmesh_engine_request_queue_time_seconds", "Waiting before a request's first "
                       "admission.", _M, buckets=_REQUEST_LATENCY_BUCKETS)
PREFILL_TIME = Histogram("llmesh_engine_request_prefill_time_seconds", "From a request's first admission to "
                         "its first token.", _M, buckets=_REQUEST_LATENCY_BUCKETS)
DECODE_TIME = Histogram("llmesh_engine_request_decode_time_seconds", "From a request's first token to its "
                        "last.", _M, buckets=_REQUEST_LATENCY_BUCKETS)


class EngineMetrics:
    """The metrics of one served model, fed by its front end."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._last: EngineStats | None = None
        self._experts: dict[str, int] = {}
        """The last per-expert totals seen (they arrive only now and then)."""
        self._running, self._waiting, self._kv = (g.labels(model) for g in (NUM_RUNNING, NUM_WAITING,
                                                                               KV_CACHE_USAGE))
        self._queries, self._hits, self._preemptions = (c.labels(model) for c in (
            PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, PREEMPTIONS))
        self._spec = [c.labels(model) for c in (SPEC_VERIFY_STEPS, SPEC_PROPOSED, SPEC_ACCEPTED, SPEC_EMITTED)]
        self._spec_rate, self._spec_len = SPEC_ACCEPTANCE.labels(model), SPEC_MEAN_LENGTH.labels(model)
        self._prompt, self._generation = PROMPT_TOKENS.labels(model), GENERATION_TOKENS.labels(model)
        self._success = {str(r): REQUEST_SUCCESS.labels(model, str(r)) for r in FinishReason}
        self._iteration = ITERATION_TOKENS.labels(model)
        self._ttft, self._itl, self._tpot = TTFT.labels(model), ITL.labels(model), TPOT.labels(model)
        self._req_prompt = REQUEST_PROMPT_TOKENS.labels(model)
        self._req_generation = REQUEST_GENERATION_TOKENS.labels(model)
        self._e2e, self._queue = E2E_LATENCY.labels(model), QUEUE_TIME.labels(model)
        self._prefill, self._decode = PREFILL_TIME.labels(model), DECODE_TIME.labels(model)

    def record(self, stats: EngineStats | None, iteration: IterationStats | None) -> None:
        if stats is not None:
            self._record_state(stats)
        if iteration is not None:
            self._record_iteration(iteration)

    def _record_state(self, stats: EngineStats) -> None:
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._kv.set(stats.kv_cache_usage)
        last = self._last
        # The core sends totals since its start; the counters grow by the difference. A fresh
        # core (after a restart) counts from 0 again: its totals are all new.
        self._queries.inc(_grown(stats.prefix_cache_queries, last.prefix_cache_queries if last else None))
        self._hits.inc(_grown(stats.prefix_cache_hits, last.prefix_cache_hits if last else None))
        self._preemptions.inc(_grown(stats.num_preemptions, last.num_preemptions if last else None))
        if stats.spec is not None:
            prev = last.spec if last is not None else None
            for counter, name in zip(self._spec, ("verify_steps", "proposed", "accepted", "emitted")):
                counter.inc(_grown(getattr(stats.spec, name), getattr(prev, name) if prev else None))
            self._spec_rate.set(stats.spec.acceptance_rate)
            self._spec_len.set(stats.spec.mean_accepted_length)
        if stats.expert_tokens is not None:
            for expert, total in stats.expert_tokens.items():
                EXPERT_TOKENS.labels(self.model, expert).inc(_grown(total, self._experts.get(expert)))
            self._experts = stats.expert_tokens
        self._last = stats

    def _record_iteration(self, it: IterationStats) -> None:
        if it.step_tokens:
            self._iteration.observe(it.step_tokens)
        self._prompt.inc(it.num_prompt_tokens)
        self._generation.inc(it.num_generation_tokens)
        for v in it.time_to_first_tokens:
            self._ttft.observe(v)
        for v in it.inter_token_latencies:
            self._itl.observe(v)
        for f in it.finished:
            self._success[f.finish_reason].inc()
            self._e2e.observe(f.e2e_latency)
            self._req_prompt.observe(f.num_prompt_tokens)
            self._req_generation.observe(f.num_generation_tokens)
            if not f.started:
                continue  # aborted or failed before its first token: no prefill or decode to time
            self._queue.observe(f.queued_time)
            self._prefill.observe(f.prefill_time)
            self._decode.observe(f.decode_time)
            if f.time_per_output_token is not None:
                self._tpot.observe(f.time_per_output_token)


def _grown(total: int, previous: int | None) -> int:
    """How much a running total grew; a total below the previous one restarted from 0."""
    return total - previous if previous is not None and total >= previous else total

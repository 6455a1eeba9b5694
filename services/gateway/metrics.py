"""The gateway's Prometheus metrics (served on --metrics-port by GrpcServer)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REQUESTS = Counter(
    "llmesh_gateway_requests_total", "Finished Inference calls, by RPC, model and final status code.",
    ["rpc", "model", "code"])
PROMPT_TOKENS = Counter(
    "llmesh_gateway_prompt_tokens_total", "Prompt tokens sent to the router (after chat templates).",
    ["model"])
CACHED_TOKENS = Counter(
    "llmesh_gateway_cached_tokens_total", "Prompt tokens the engines served from the prefix cache.",
    ["model"])
COMPLETION_TOKENS = Counter(
    "llmesh_gateway_completion_tokens_total", "Tokens generated and streamed to clients.", ["model"])
TTFT = Histogram(
    "llmesh_gateway_ttft_seconds", "Time from the request's arrival to its first generated token.",
    ["model"], buckets=_LATENCY_BUCKETS)
DURATION = Histogram(
    "llmesh_gateway_request_duration_seconds", "Time from the request's arrival to the end of its stream.",
    ["rpc", "model"], buckets=_LATENCY_BUCKETS)
ROUTE_DECISIONS = Counter(
    "llmesh_gateway_route_decisions_total",
    "Direct routing's routes, by model and source: router (a Route call) or reused (an answer the router "
    "said holds for a while: one replica, a named model).", ["model", "source"])
# Gauges say how the workers of one gateway combine (``--workers``; the mode is ignored with one).
IN_FLIGHT = Gauge("llmesh_gateway_streams_in_flight", "Generate and Chat streams now open.",
                  multiprocess_mode="livesum")
AUTH_FAILURES = Counter(
    "llmesh_gateway_auth_failures_total", "Calls refused by authentication, by reason.", ["reason"])
RATE_LIMITED = Counter(
    "llmesh_gateway_rate_limited_total", "Calls refused by a rate limit, by limit.", ["limit"])
REDIS_ERRORS = Counter(
    "llmesh_gateway_redis_errors_total", "Redis calls that failed, by what they were for.", ["where"])
REDIS_UP = Gauge("llmesh_gateway_redis_up", "1 while the gateway's Redis answers its health probe, else 0.",
                 multiprocess_mode="livemin")
OVERLOADED = Counter(
    "llmesh_gateway_overloaded_total", "Calls refused because the gateway had max_streams streams open.")
RESPONSE_CACHE_HITS = Counter(
    "llmesh_gateway_response_cache_hits_total", "Requests answered from the response cache.", ["model"])
RESPONSE_CACHE_MISSES = Counter(
    "llmesh_gateway_response_cache_misses_total", "Response cache lookups that found no stored answer.",
    ["model"])
RESPONSE_CACHE_STORES = Counter(
    "llmesh_gateway_response_cache_stores_total", "Answers stored in the response cache.", ["model"])
RESPONSE_CACHE_STORED_BYTES = Counter(
    "llmesh_gateway_response_cache_stored_bytes_total", "Bytes of the answers stored in the response cache.",
    ["model"])
RESPONSE_CACHE_ERRORS = Counter(
    "llmesh_gateway_response_cache_errors_total", "Response cache calls that failed (the request went on "
    "without the cache), by operation: lookup, store, decode.", ["model", "op"])
RESPONSE_CACHE_SKIPPED = Counter(
    "llmesh_gateway_response_cache_skipped_total", "Requests the response cache left alone, by why: sampled "
    "(no seed), auto, off (key policy or bypass), unknown_model, unfinished, too_large.", ["model", "reason"])
RESPONSE_CACHE_EVICTIONS = Counter(
    "llmesh_gateway_response_cache_evictions_total", "Keys the response cache's Redis evicted under its "
    "maxmemory policy (INFO evicted_keys; the whole Redis's when it is shared).")
EMBEDDING_CACHE_HITS = Counter(
    "llmesh_gateway_embedding_cache_hits_total", "Embedding inputs answered from the cache (one per input, "
    "not per call).", ["model"])
EMBEDDING_CACHE_MISSES = Counter(
    "llmesh_gateway_embedding_cache_misses_total", "Embedding inputs looked up and not found (sent to the "
    "engine).", ["model"])
EMBEDDING_CACHE_STORES = Counter(
    "llmesh_gateway_embedding_cache_stores_total", "Embedding vectors stored in the cache.", ["model"])
EMBEDDING_CACHE_STORED_BYTES = Counter(
    "llmesh_gateway_embedding_cache_stored_bytes_total", "Bytes of the vectors stored in the cache.", ["model"])
EMBEDDING_CACHE_ERRORS = Counter(
    "llmesh_gateway_embedding_cache_errors_total", "Embedding cache calls that failed (the inputs went to the "
    "engine), by operation: lookup, store (one per batch), decode (one per damaged vector).", ["model", "op"])
EMBEDDING_CACHE_SKIPPED = Counter(
    "llmesh_gateway_embedding_cache_skipped_total", "Embed calls the cache left alone, by why: off (key "
    "policy or bypass), unknown_model.", ["model", "reason"])

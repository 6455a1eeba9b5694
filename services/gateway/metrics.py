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
IN_FLIGHT = Gauge("llmesh_gateway_streams_in_flight", "Generate and Chat streams now open.")
AUTH_FAILURES = Counter(
    "llmesh_gateway_auth_failures_total", "Calls refused by authentication, by reason.", ["reason"])
RATE_LIMITED = Counter(
    "llmesh_gateway_rate_limited_total", "Calls refused by a rate limit, by limit.", ["limit"])
REDIS_ERRORS = Counter(
    "llmesh_gateway_redis_errors_total", "Redis calls that failed, by what they were for.", ["where"])
REDIS_UP = Gauge("llmesh_gateway_redis_up", "1 while the gateway's Redis answers its health probe, else 0.")
OVERLOADED = Counter(
    "llmesh_gateway_overloaded_total", "Calls refused because the gateway had max_streams streams open.")

"""Prometheus metrics of the router service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter(
    "llmesh_router_model_decisions_total",
    "Model choices, by model and reason (explicit, default, auto_long_prompt, auto_hint_code, ...)",
    ["model", "reason"])
PICKS = Counter(
    "llmesh_router_replica_picks_total",
    "Replica choices, by model and reason (prefix_cache, least_loaded, only_replica, round_robin)",
    ["model", "reason"])
MATCHED_BLOCKS = Histogram(
    "llmesh_router_cached_blocks_matched",
    "Prefix blocks the chosen replica already held, per request",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
INDEX_ERRORS = Counter(
    "llmesh_router_prefix_index_errors_total",
    "Match calls to the prefix index that failed (the replica was then chosen by load)", ["code"])
FAILOVERS = Counter(
    "llmesh_router_failovers_total",
    "Requests retried on another replica after one failed before the first token", ["model"])
OVERLOADED = Counter(
    "llmesh_router_overloaded_refusals_total",
    "Engine refusals with RESOURCE_EXHAUSTED (waiting queue full), by model; another replica with room "
    "is tried", ["model"])
MIDSTREAM_FAILURES = Counter(
    "llmesh_router_midstream_failures_total",
    "Streams that failed after the first token (not retried: tokens were already sent)", ["model"])
ESCALATIONS = Counter(
    "llmesh_router_escalations_total",
    "'auto' requests whose small model was aborted for low confidence and answered by the large one",
    ["from_model", "to_model"])
ESCALATION_CHECKS = Counter(
    "llmesh_router_escalation_checks_total",
    "Confidence checks of the small model's first tokens, by outcome (kept, escalated)", ["model", "outcome"])
CONFIDENCE = Histogram(
    "llmesh_router_small_model_confidence_nats",
    "Mean token log-probability of the small model's first tokens, per checked 'auto' request",
    ["model"], buckets=(-8, -6, -5, -4, -3, -2.5, -2, -1.5, -1, -0.5, -0.25, -0.1, 0))
REQUESTS = Counter("llmesh_router_requests_total", "Routed requests, by model and final status code",
                   ["model", "code"])
ROUTES = Counter("llmesh_router_routes_total",
                 "Route decisions handed to callers that stream from the engine themselves, by model and "
                 "status code", ["model", "code"])
TTFT = Histogram(
    "llmesh_router_time_to_first_token_seconds", "From the router receiving a request to the first token",
    ["model"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
HEALTHY_REPLICAS = Gauge("llmesh_router_healthy_replicas", "Replicas in the pool now, by model", ["model"])

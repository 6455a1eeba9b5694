"""Prometheus metrics of the prefix-cache index service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCHES = Counter(
    "llmesh_prefix_index_batches_total",
    "KV event batches received, by outcome (in_order, snapshot, new_epoch, duplicate, gap, ...)",
    ["outcome"])
EVENTS = Counter(
    "llmesh_prefix_index_block_events_total",
    "Block entries applied from KV events, by kind (stored, removed, cleared)",
    ["kind"])
RESYNCS = Counter(
    "llmesh_prefix_index_resyncs_requested_total",
    "Snapshots asked of engines, by reason (gap, unknown_state, new_epoch_gap, heartbeat)",
    ["reason"])
HEARTBEATS = Counter("llmesh_prefix_index_heartbeats_total", "Heartbeats received, by outcome", ["outcome"])
MATCH_SECONDS = Histogram(
    "llmesh_prefix_index_match_seconds", "Time to answer Match",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
MATCH_BEST_BLOCKS = Histogram(
    "llmesh_prefix_index_match_best_blocks", "Longest prefix (in blocks) any replica held, per Match",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
MATCH_REQUESTS = Counter("llmesh_prefix_index_match_requests_total", "Match calls, by whether any replica hit",
                         ["hit"])
PURGES = Counter(
    "llmesh_prefix_index_purged_instances_total",
    "Replicas dropped from the index, by reason (forget, expired)", ["reason"])
REDIS_ERRORS = Counter("llmesh_prefix_index_redis_errors_total", "Calls failed because Redis was unreachable",
                       ["rpc"])
REDIS_UP = Gauge("llmesh_prefix_index_redis_up", "1 when the last Redis ping succeeded")

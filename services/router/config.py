"""Configuration of the router service (flags and LLMESH_ROUTER_* env)."""

from __future__ import annotations

import dataclasses
import math

from llmesh.config import option, require
from llmesh.grpc_server import ServiceConfig

REPLICA_POLICIES = ("cache_aware", "round_robin")


@dataclasses.dataclass
class RouterConfig(ServiceConfig):
    """The router picks the model and the engine replica of each request and streams from it."""

    port: int = option(50052, "gRPC port (0 picks a free one)")
    models_file: str = option("models.yaml", "the models file (YAML): models, size classes, replica addresses")
    prefix_index: str | None = option(
        None, "host:port of the prefix-cache index (unset: replicas are chosen by load alone)")
    cache_weight: float = option(
        1.0, "score per prefix block a replica already holds (score = blocks*cache_weight - load_weight*load)")
    load_weight: float = option(
        2.0, "score cost per unit of load (waiting + running requests + KV use fraction); with the "
             "defaults one queued request outweighs two cached blocks")
    health_check_interval_s: float = option(
        0.5, "seconds between health checks of each replica (a dead one leaves the pool within about this)")
    health_check_timeout_s: float = option(
        1.0, "deadline of one health check; a replica that misses health_check_misses in a row is unhealthy")
    health_check_misses: int = option(
        2, "health checks in a row that may pass their deadline before the replica leaves its pool (a slow "
           "answer under CPU load is not a dead engine); a refused connection or NOT_SERVING takes it out at once")
    stream_stall_timeout_s: float = option(
        2.0, "a stream whose replica has answered no health check for this long (a frozen engine) ends with "
             "UNAVAILABLE, or fails over before its first token, even without a client deadline; it ends "
             "within about this plus health_check_interval_s + health_check_timeout_s")
    load_poll_interval_s: float = option(0.5, "seconds between Load polls of each healthy replica")
    index_timeout_s: float = option(
        0.25, "deadline of the prefix-index Match; past it the replica is chosen by load alone (advisory index)")
    startup_wait_s: float = option(
        5.0, "at start, wait up to this long for the first health check of every replica before serving")
    max_failovers: int = option(
        2, "extra replicas tried when one fails before the first token (UNAVAILABLE, INTERNAL, UNKNOWN, "
           "or frozen)")
    auto_long_prompt_tokens: int = option(
        1024, "'auto' policy: prompts with more tokens than this go to the large model")
    auto_task_hints: bool = option(
        True, "'auto' policy: code, proofs, step-by-step and math in the prompt text go to the large model")
    auto_batch_tier_small: bool = option(True, "'auto' policy: the batch tier goes to the small model")
    policy: str = option(
        "cache_aware", "replica choice: cache_aware (prefix blocks held vs load, see picker.py) or "
                       "round_robin (ignores cache and load; the baseline of bench/routing.py)")
    decision_reuse_ms: int = option(
        1000, "direct routing: milliseconds a gateway may reuse a Route answer for the same model without asking "
              "again, given only when the answer cannot depend on the request (a named model with one healthy "
              "replica, no escalation); a replica that joins is used within this. 0 makes every request ask. "
              "On the H200 reuse took 2.0 ms off the first token at 16 req/s and cost no throughput "
              "(docs/routing.md)")
    escalation_tokens: int = option(
        8, "'auto' escalation: when 'auto' picked the small model, judge its confidence on its first this many "
           "tokens (held back from the client meanwhile); 0 turns escalation off")
    escalation_threshold: float = option(
        -2.5, "'auto' escalation: when the small model's mean token log-probability (nats) over those tokens "
              "is under this, its request is aborted and the large model answers from scratch")

    discovery_interval_s: float = option(
        5.0, "models with discovery: dns://HOST:PORT: seconds between lookups of HOST (new engines join once "
             "SERVING; engines gone from DNS take no new requests)")
    discovery_timeout_s: float = option(2.0, "deadline of one DNS lookup; a failed lookup keeps the replicas found before")
    discovery_nameserver: str | None = option(
        None, "ip:port of the DNS server discovery asks (unset: the system's, from /etc/resolv.conf)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.models_file), "models_file must name the models file (--models-file)")
        require(self.cache_weight >= 0, f"cache_weight must be >= 0, got {self.cache_weight}")
        require(self.load_weight >= 0, f"load_weight must be >= 0, got {self.load_weight}")
        require(0 <= self.decision_reuse_ms <= 60_000,
                f"decision_reuse_ms must be in [0, 60000], got {self.decision_reuse_ms}")
        for name in ("health_check_interval_s", "health_check_timeout_s", "load_poll_interval_s",
                     "index_timeout_s", "stream_stall_timeout_s", "discovery_interval_s", "discovery_timeout_s"):
            value = getattr(self, name)
            require(value > 0, f"{name} must be > 0, got {value}")
        if self.discovery_nameserver:
            ip, sep, port = self.discovery_nameserver.rpartition(":")
            require(bool(sep and ip) and port.isdigit() and 0 < int(port) <= 65535,
                    f"discovery_nameserver must be ip:port, got {self.discovery_nameserver!r}")
        require(self.health_check_misses >= 1, f"health_check_misses must be >= 1, got {self.health_check_misses}")
        require(self.startup_wait_s >= 0, f"startup_wait_s must be >= 0, got {self.startup_wait_s}")
        require(self.max_failovers >= 0, f"max_failovers must be >= 0, got {self.max_failovers}")
        require(self.policy in REPLICA_POLICIES,
                f"policy must be one of {', '.join(REPLICA_POLICIES)}, got {self.policy!r}")
        require(not math.isnan(self.escalation_threshold), "escalation_threshold must be a number, got nan")
        require(self.escalation_tokens >= 0, f"escalation_tokens must be >= 0, got {self.escalation_tokens}")
        require(self.auto_long_prompt_tokens >= 1,
                f"auto_long_prompt_tokens must be >= 1, got {self.auto_long_prompt_tokens}")

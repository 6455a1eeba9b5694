"""Configuration of the prefix-cache index service (flags and LLMESH_PREFIX_CACHE_* env)."""

from __future__ import annotations

import dataclasses

from llmesh.config import option, require
from llmesh.grpc_server import ServiceConfig


@dataclasses.dataclass
class PrefixCacheConfig(ServiceConfig):
    """The index keeps, in Redis, which engine replicas hold which KV blocks."""

    port: int = option(50053, "gRPC port (0 picks a free one)")
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis holding the index (redis://host:port/db)")
    heartbeat_ttl_s: float = option(
        10.0, "seconds a replica stays live without a heartbeat when its heartbeat names no ttl")
    key_prefix: str = option("llmesh:pc", "prefix of every Redis key (several meshes can share one Redis)")
    redis_timeout_s: float = option(2.0, "socket timeout of each Redis command; past it the call is UNAVAILABLE")
    sweep_interval_s: float = option(
        5.0, "how often replicas whose liveness expired are purged in the background (0 disables; "
             "Match also purges them lazily)")
    redis_check_interval_s: float = option(
        1.0, "how often Redis is pinged to set this service's health (NOT_SERVING while Redis is down)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.redis_url.startswith(("redis://", "rediss://", "unix://")),
                f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        require(self.heartbeat_ttl_s > 0, f"heartbeat_ttl_s must be > 0, got {self.heartbeat_ttl_s}")
        require(bool(self.key_prefix) and " " not in self.key_prefix,
                f"key_prefix must be non-empty without spaces, got {self.key_prefix!r}")
        require(self.redis_timeout_s > 0, f"redis_timeout_s must be > 0, got {self.redis_timeout_s}")
        require(self.sweep_interval_s >= 0, f"sweep_interval_s must be >= 0, got {self.sweep_interval_s}")
        require(self.redis_check_interval_s > 0,
                f"redis_check_interval_s must be > 0, got {self.redis_check_interval_s}")

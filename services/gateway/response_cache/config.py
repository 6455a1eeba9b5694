"""The response cache's options (an area of the gateway's config: flat flags
``--response-cache``, ``--response-cache-ttl-s``, ...)."""

from __future__ import annotations

import dataclasses

from llmesh.config import option, require


@dataclasses.dataclass
class ResponseCacheConfig:
    response_cache: bool = option(False, "answer repeated deterministic requests (greedy, or seeded) from "
                                         "Redis; API keys may turn it off or set their own TTL "
                                         "(docs/response-cache.md)")
    response_cache_embeddings: bool = option(True, "with --response-cache: also keep embeddings, input by "
                                                   "input, so a repeated input is never embedded twice "
                                                   "(false: only generation answers are cached)")
    response_cache_ttl_s: float = option(600.0, "how long a stored answer is served, in seconds, unless the "
                                                "API key sets its own ttl")
    response_cache_redis_url: str = option("", "Redis of the response cache; empty uses --redis-url. A "
                                               "dedicated Redis can bound its memory with LRU eviction "
                                               "(--response-cache-max-memory)")
    response_cache_prefix: str = option("llmesh:rc:", "prefix of the response cache's Redis keys (then the "
                                                      "tenant, then the request's digest)")
    response_cache_timeout_s: float = option(0.05, "longest wait for a cache lookup; a slower or unreachable "
                                                   "Redis sends the request to the engine")
    response_cache_max_entry_bytes: int = option(1 << 20, "answers larger than this (serialized) are not "
                                                          "stored")
    response_cache_max_memory: int = option(0, "bytes: when > 0 the gateway sets maxmemory and "
                                               "maxmemory-policy allkeys-lru on --response-cache-redis-url, "
                                               "which must then be a Redis of its own (not --redis-url)")
    response_cache_evictions_interval_s: float = option(10.0, "how often the cache Redis's INFO evicted_keys "
                                                              "is read into the evictions metric")

    def __post_init__(self) -> None:
        require(self.response_cache_ttl_s > 0,
                f"response_cache_ttl_s must be > 0, got {self.response_cache_ttl_s}")
        require(self.response_cache_timeout_s > 0,
                f"response_cache_timeout_s must be > 0, got {self.response_cache_timeout_s}")
        require(self.response_cache_max_entry_bytes >= 1024,
                f"response_cache_max_entry_bytes must be >= 1024, got {self.response_cache_max_entry_bytes}")
        require(self.response_cache_max_memory >= 0,
                f"response_cache_max_memory must be >= 0, got {self.response_cache_max_memory}")
        require(self.response_cache_evictions_interval_s > 0, "response_cache_evictions_interval_s must be > 0, "
                f"got {self.response_cache_evictions_interval_s}")
        require(bool(self.response_cache_prefix), "response_cache_prefix must not be empty")

    def check_redis(self, redis_url: str) -> None:
        """Cross-checks with the gateway's own Redis (called by GatewayConfig)."""
        if not self.response_cache:
            return
        require(bool(self.response_cache_redis_url or redis_url),
                "response_cache is on but there is no Redis to keep answers in: pass --redis-url or "
                "--response-cache-redis-url")
        require(not self.response_cache_max_memory
                or bool(self.response_cache_redis_url and self.response_cache_redis_url != redis_url),
                "response_cache_max_memory sets allkeys-lru eviction, which on the mesh's Redis would evict "
                "API keys and usage: give the cache a Redis of its own (--response-cache-redis-url)")


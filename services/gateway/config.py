"""The gateway's config: where the router is, which models file to read tokenizers from,
the request limits checked before any engine work, and admission (stream cap, tokenizer
workers); docs/operations.md "Admission control" explains how they work together."""

from __future__ import annotations

import dataclasses

from llmesh.config import group, option, require
from llmesh.gateway.response_cache.config import ResponseCacheConfig
from llmesh.grpc_server import ServiceConfig

ROUTING_MODES = ("direct", "proxy")
DEFAULT_PORT = 50051
"""The public port people type; tests and launchers pass --port 0 to get a free one."""


@dataclasses.dataclass
class GatewayConfig(ServiceConfig):
    """llmesh gateway: the public Inference API (validation, tokenization, usage)."""

    port: int = option(DEFAULT_PORT, "public gRPC port (0 picks a free one)")
    router: str = option("127.0.0.1:50052", "host:port of the router")
    models_file: str = option("", "models file (YAML) listing the models whose tokenizers the gateway loads")
    http_port: int = option(0, "OpenAI-compatible HTTP port (/v1/chat/completions, /v1/completions, "
                               "/v1/models, /health) on the same host; 0 turns the HTTP front off")
    max_request_bytes: int = option(1 << 20, "largest serialized request accepted, in bytes")
    max_prompt_bytes: int = option(1 << 20, "largest prompt accepted, in UTF-8 bytes (a chat: the messages' "
                                            "contents together), checked before tokenizing")
    max_stop_strings: int = option(16, "most stop strings one request may set (OpenAI allows 4)")
    max_stop_chars: int = option(256, "longest stop string accepted, in characters")
    max_streams: int = option(1024, "streams this gateway serves at once (gRPC and HTTP together); one more "
                                    "is refused at once with RESOURCE_EXHAUSTED (HTTP 429) and a retry-after "
                                    "hint. 0: no cap")
    workers: int = option(1, "gateway processes serving the same ports (SO_REUSEPORT: the kernel spreads "
                             "connections over them); each streamed message costs a gateway a few tenths of a "
                             "millisecond of CPU (bench/gateway_cpu.py), so more workers pass more tokens per "
                             "second. max_streams and tokenizer_workers are per worker (docs/operations.md "
                             "\"Gateway workers\")")
    tokenizer_workers: int = option(2, "processes that tokenize prompts over tokenize_inline_bytes, so a large "
                                       "prompt never stalls other streams; 0 tokenizes everything on the "
                                       "event loop")
    tokenize_inline_bytes: int = option(8192, "prompts up to this many UTF-8 bytes are tokenized on the event "
                                              "loop (about 10 ms of work), larger ones in a tokenizer worker")
    default_max_tokens: int = option(256, "max_tokens when a request leaves it unset (capped by the model window)")
    models_refresh_s: float = option(10.0, "seconds between refreshes of the router's model list (windows, replicas)")
    auth: bool = option(True, "require API keys ('authorization: Bearer <key>'); false serves everyone "
                              "as the anonymous caller")
    redis_url: str = option("", "Redis holding API keys, rate-limit buckets and usage (e.g. redis://host:6379/0)")
    keys_file: str = option("", "keys file (JSON/YAML of hashed records from `llmesh keys create --keys-file`)")
    key_pepper: str = option("", "secret mixed into key hashes; must match the one used by `llmesh keys create`")
    redis_failure_mode: str = option("closed", "when Redis is unreachable: 'closed' refuses calls "
                                               "(UNAVAILABLE), 'open' serves them without limits")
    redis_timeout_s: float = option(0.5, "timeout of each Redis call, in seconds")
    key_cache_s: float = option(0.5, "how long an API key's record read from Redis is reused before it is read "
                                     "again (a Redis round trip off each request's path); a revocation or a "
                                     "changed limit takes effect within this. 0: read on every call")
    redis_check_interval_s: float = option(
        1.0, "how often Redis is pinged; with auth on and keys only in Redis the gateway reports NOT_SERVING "
             "while Redis does not answer")
    engine_stall_timeout_s: float = option(
        2.0, "direct routing: a stream whose engine has answered no health check for this long (frozen) ends "
             "with UNAVAILABLE, or fails over before its first token, even without a client deadline")
    routing: str = option("direct", "'direct': ask the router for a route (Route) and stream from the engine "
                                    "here; 'proxy': stream through the router (Generate). See docs/routing.md")
    response_cache: ResponseCacheConfig = group(ResponseCacheConfig)
    """The response cache's options (docs/response-cache.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.router.strip()), "router must be a host:port address")
        require(bool(self.models_file.strip()),
                "models_file is required: the gateway tokenizes with each model's tokenizer "
                "(pass --models-file PATH or set LLMESH_GATEWAY_MODELS_FILE)")
        require(0 <= self.http_port <= 65535, f"http_port must be in [0, 65535], got {self.http_port}")
        ports = {name: getattr(self, name) for name in ("port", "http_port", "health_port", "metrics_port")}
        given = [port for port in ports.values() if port]
        require(len(given) == len(set(given)), f"the gateway's ports must differ, got {ports}")
        require(self.max_request_bytes >= 1024,
                f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        require(self.max_prompt_bytes >= 1, f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")
        require(self.max_stop_strings >= 0, f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        require(self.max_stop_chars >= 1, f"max_stop_chars must be >= 1, got {self.max_stop_chars}")
        require(self.max_streams >= 0, f"max_streams must be >= 0, got {self.max_streams}")
        require(1 <= self.workers <= 64, f"workers must be in [1, 64], got {self.workers}")
        require(self.tokenizer_workers >= 0, f"tokenizer_workers must be >= 0, got {self.tokenizer_workers}")
        require(self.tokenize_inline_bytes >= 0,
                f"tokenize_inline_bytes must be >= 0, got {self.tokenize_inline_bytes}")
        require(self.default_max_tokens >= 1,
                f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        require(self.redis_failure_mode in ("open", "closed"),
                f"redis_failure_mode must be 'open' or 'closed', got {self.redis_failure_mode!r}")
        require(not self.auth or bool(self.redis_url or self.keys_file),
                "auth is on but there is nowhere to find API keys: pass --redis-url URL and/or "
                "--keys-file PATH, or --auth false to serve without keys")
        require(self.redis_timeout_s > 0, f"redis_timeout_s must be > 0, got {self.redis_timeout_s}")
        require(0 <= self.key_cache_s <= 60, f"key_cache_s must be in [0, 60], got {self.key_cache_s}")
        require(self.redis_check_interval_s > 0,
                f"redis_check_interval_s must be > 0, got {self.redis_check_interval_s}")
        require(self.routing in ROUTING_MODES,
                f"routing must be one of {', '.join(ROUTING_MODES)}, got {self.routing!r}")
        require(self.models_refresh_s > 0, f"models_refresh_s must be > 0, got {self.models_refresh_s}")
        self.response_cache.check_redis(self.redis_url)

"""``python -m llmesh.gateway.main``: run the public Inference API.

    python -m llmesh.gateway.main --models-file models.yaml --router 127.0.0.1:50052
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys

import grpc
import redis.asyncio as aioredis

from llmesh.config import load_config
from llmesh.engine.errors import EngineError
from llmesh.gateway.auth import KeyAuthenticator
from llmesh.gateway.caller import NoAuth
from llmesh.gateway.catalog import ModelCatalog
from llmesh.gateway.config import GatewayConfig
from llmesh.gateway.direct import DirectStreamer, EngineChannels
from llmesh.gateway.generation_defaults import GenerationDefaults
from llmesh.gateway import metrics
from llmesh.gateway.http_front import HttpFront
from llmesh.gateway.keys import KeysFile
from llmesh.gateway.ratelimit import RateLimiter, RedisGuard
from llmesh.gateway.response_cache.cache import ResponseCache
from llmesh.gateway.response_cache.revision import ModelRevisions
from llmesh.gateway.response_cache.store import TenantStore, configure_lru, evictions_loop
from llmesh.gateway.servicer import InferenceServicer, add_to_server
from llmesh.gateway.tokenizers import ModelTokenizers, TokenizerPool
from llmesh.gateway.usage_store import UsageStore
from llmesh.gateway.workers import is_worker, supervise, supervisor_salt_key, worker_index
from llmesh.grpc_server import GrpcServer, run_async
from llmesh.logs import setup_logging
from llmesh.redis_health import pinger, redis_health_loop
from llmesh.mesh_secret import MeshSecretError, secret_of
from llmesh.models_file import ModelsFile, ModelsFileError, load_models_file
from llmesh.parent_death import arm_from_env
from llmesh.telemetry import client_interceptors
from llmesh.tls import aio_channel
from llmesh.v1 import router_pb2_grpc

log = logging.getLogger("llmesh.gateway")


async def serve(config: GatewayConfig, tokenizers: ModelTokenizers, defaults: GenerationDefaults,
                pool: TokenizerPool, models: ModelsFile) -> None:
    channel = aio_channel(
        config.router, config, interceptors=client_interceptors(),
        options=[("grpc.max_receive_message_length", 64 << 20)])
    router = router_pb2_grpc.RouterStub(channel)
    catalog = ModelCatalog(router, config.router, config.models_refresh_s)
    redis_client = aioredis.Redis.from_url(
        config.redis_url, socket_timeout=config.redis_timeout_s,
        socket_connect_timeout=config.redis_timeout_s) if config.redis_url else None
    guard = RedisGuard(config.redis_failure_mode)
    authenticator = KeyAuthenticator(redis_client, KeysFile(config.keys_file) if config.keys_file else None,
                                     guard, config.key_pepper, salt_key=_salt_key(config),
                                     cache_s=config.key_cache_s) if config.auth else NoAuth()
    limiter = RateLimiter(redis_client, guard) if redis_client is not None else None
    usage_store = UsageStore(redis_client, guard) if redis_client is not None else None
    engines = EngineChannels(config, config.engine_stall_timeout_s) if config.routing == "direct" else None
    cache_client, response_cache = await _response_cache(config, models)
    servicer = InferenceServicer(config, tokenizers, catalog, router, authenticator, limiter, usage_store,
                                 defaults, None if engines is None else DirectStreamer(router, engines), pool,
                                 response_cache)
    refresher: asyncio.Task | None = None
    redis_probe: asyncio.Task | None = None
    evictions: asyncio.Task | None = None
    http: HttpFront | None = None

    def register(server: grpc.aio.Server) -> list[str]:
        return [add_to_server(servicer, server)]

    async def on_shutdown() -> None:
        if http is not None:
            await http.stop(config.grace_period_s)
        for task in (refresher, redis_probe, evictions):
            if task is not None:
                task.cancel()
        await channel.close()
        if engines is not None:
            await engines.close()
        for client in (redis_client, cache_client):
            if client is not None:
                await client.aclose()
        pool.close()

    server = GrpcServer("gateway", config, register, on_shutdown, internal=False, reuse_port=is_worker())
    refresher = asyncio.create_task(catalog.run_refresh_loop())
    if cache_client is not None and worker_index() == 0:  # one count per Redis, not one per worker
        evictions = asyncio.create_task(evictions_loop(
            cache_client, config.response_cache.response_cache_evictions_interval_s,
            metrics.RESPONSE_CACHE_EVICTIONS.inc))
    if config.auth and redis_client is not None and not config.keys_file:
        # Keys only in Redis: without it nobody can be authenticated, so health says so.
        async def redis_verdict(up: bool) -> None:
            guard.observed(up)  # while Redis is known down no key record is reused: fail-closed holds
            await server.set_serving(up)

        redis_probe = asyncio.create_task(redis_health_loop(
            pinger(redis_client), config.redis_check_interval_s, redis_verdict, metrics.REDIS_UP,
            "API keys live there"))
    if config.http_port:
        http = HttpFront(servicer, tokenizers, config.max_request_bytes)
        await http.start(config.host, config.http_port, reuse_port=is_worker())
        log.info("HTTP front serving", extra={"address": f"http://{config.host}:{http.port}"})
    await server.run()


async def _response_cache(config: GatewayConfig, models: ModelsFile):
    """(its Redis client, the cache), or (None, None) when --response-cache is off. The cache
    has a client of its own: its short waits and cancelled calls never touch the connections
    that check keys and limits."""
    cfg = config.response_cache
    if not cfg.response_cache:
        return None, None
    client = aioredis.Redis.from_url(cfg.response_cache_redis_url or config.redis_url,
                                     socket_timeout=max(config.redis_timeout_s, cfg.response_cache_timeout_s),
                                     socket_connect_timeout=max(config.redis_timeout_s,
                                                                cfg.response_cache_timeout_s))
    if cfg.response_cache_max_memory:
        await configure_lru(client, cfg.response_cache_max_memory)
    # The digests are keyed by the mesh secret, else the key pepper: both are the same on
    # every gateway of a mesh, so gateways share entries (an empty key still hashes).
    secret = secret_of(config) or config.key_pepper.encode()
    store = TenantStore(client, cfg.response_cache_prefix, cfg.response_cache_timeout_s)
    return client, ResponseCache(store, ModelRevisions(models, config.models_refresh_s), secret, cfg)


def _salt_key(config: GatewayConfig) -> bytes:
    """The mesh secret, else the key a supervisor shares with its workers (``--workers``);
    without either, a key of this process only: tenants stay apart, but gateways do not
    agree on salts (each starts its tenants' caches anew)."""
    secret = secret_of(config) or supervisor_salt_key()
    if secret is None:
        log.warning("no internal_secret_file: tenants' cache salts are keyed by a random key of this "
                    "gateway process; give every gateway the mesh secret so they share cached prefixes")
        return secrets.token_bytes(32)
    return secret


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [x for a in argv for x in (("--auth", "false") if a == "--no-auth" else (a,))]  # the explicit spelling
    config = load_config(GatewayConfig, argv, service="gateway")
    setup_logging("gateway", config.log_level)
    if config.workers > 1:
        try:
            load_models_file(config.models_file)  # a bad file fails here, once, not in every worker
            secret_of(config)
        except (ModelsFileError, MeshSecretError) as e:
            sys.exit(f"llmesh-gateway: {e}")
        arm_from_env()
        try:
            sys.exit(supervise(config, argv))
        except OSError as e:
            sys.exit(str(e))
    try:
        models = load_models_file(config.models_file)
        tokenizers = ModelTokenizers.load(models)
        defaults = GenerationDefaults.load(models)
    except (ModelsFileError, EngineError) as e:
        sys.exit(f"llmesh-gateway: {e}")
    try:
        secret_of(config)
    except MeshSecretError as e:
        sys.exit(f"llmesh-gateway: {e}")
    pool = TokenizerPool(tokenizers, config.tokenizer_workers, config.tokenize_inline_bytes)
    pool.start()  # before serving: no request waits for a worker to start
    try:
        run_async(lambda: serve(config, tokenizers, defaults, pool, models))
    finally:
        pool.close()


if __name__ == "__main__":
    main()

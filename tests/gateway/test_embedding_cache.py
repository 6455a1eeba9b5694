"""The embedding cache against real processes: a tiny pooling engine, the router, the gateway
with --response-cache, its keys in one Redis and its cache in another (so the cache's Redis
can be frozen or stopped while keys still authenticate).

A repeated input must come from the cache (the engine's step counter stays put) with the
stored bytes; a batch mixing cached and new inputs must come back in input order and equal a
fresh computation (and Hugging Face's vectors); entries are per tenant and per
``dimensions``; bypass, refresh and a key's ``off`` policy work as for generation; cached
inputs spend no tokens-per-minute budget; a down or frozen cache Redis costs a call at most
the bounded wait."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import grpc
import numpy as np
import openai
import pytest
import redis
import yaml

from llmesh.v1 import engine_pb2, inference_pb2, router_pb2
from tests.gateway.test_auth import add_key, bearer, stub
from tests.gateway.test_embeddings import EMB, assert_close, reference
from tests.gateway.test_response_cache import BYPASS, PREFIX, REFRESH, USE, engine_steps, metric
from tests.mesh_helpers import RedisServer, ServiceProcess, free_ports, start_engine

A, B, C, D = [5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42], [100, 7, 3, 19, 20], [77, 78, 79, 80]


@pytest.fixture(scope="module")
def mesh(tiny_model_dirs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("embedding-cache")
    emb_path = tiny_model_dirs["qwen3"]
    with contextlib.ExitStack() as stack:
        keys_redis = stack.enter_context(RedisServer())
        cache_redis = stack.enter_context(RedisServer())
        engine = stack.enter_context(start_engine(
            emb_path, "--served-model-name", EMB, "--num-kv-blocks", "64", "--max-model-len", "256",
            "--block-size", "4", "--pooling", "last", "--normalize", "--matryoshka"))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": EMB, "models": [{
            "name": EMB, "path": emb_path, "addresses": [engine.address],
            "engine": {"pooling": "last", "normalize": True, "matryoshka": True}}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        metrics_port, http_port = free_ports(2)
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--redis-url", keys_redis.url,
            "--response-cache", "true", "--response-cache-redis-url", cache_redis.url,
            "--metrics-port", str(metrics_port), "--http-port", str(http_port)]))
        yield {"keys_redis": keys_redis, "cache_redis": cache_redis, "engine": engine, "gateway": gateway,
               "emb_path": emb_path, "metrics_port": metrics_port, "base_url": f"http://127.0.0.1:{http_port}/v1"}


_tenants = iter(range(10 ** 6))


def fresh_key(mesh, **kw) -> tuple[str, str]:
    """(key, tenant): a key of a tenant no other test uses, so entries never collide."""
    tenant = kw.pop("tenant", None) or f"ec-{os.getpid()}-{next(_tenants)}"
    key, _ = add_key(mesh["keys_redis"].url, tenant=tenant, **kw)
    return key, tenant


def embed(mesh, key: str, inputs: list[list[int]], cache: int = 0, dimensions: int | None = None,
          timeout: float = 30) -> engine_pb2.EmbedResponse:
    req = inference_pb2.EmbedRequest(model=EMB, cache=cache, inputs=[
        inference_pb2.EmbedInput(token_ids=router_pb2.TokenIds(ids=ids)) for ids in inputs])
    if dimensions is not None:
        req.dimensions = dimensions
    return stub(mesh["gateway"].address).Embed(req, metadata=bearer(key), timeout=timeout)


def entries(mesh, tenant: str) -> list[bytes]:
    return list(redis.Redis.from_url(mesh["cache_redis"].url).scan_iter(f"{PREFIX}{tenant}:*"))


def wait_entries(mesh, tenant: str, count: int, within_s: float = 5.0) -> None:
    """Vectors are stored after the answer, in the background: wait for them (bounded)."""
    deadline = time.monotonic() + within_s
    while len(entries(mesh, tenant)) < count:
        assert time.monotonic() < deadline, f"{len(entries(mesh, tenant))} entries of {tenant}, wanted {count}"
        time.sleep(0.02)


def wait_stored(client, name, vector, timeout=5.0):
    """Until the gateway's background store has written ``vector`` under ``name``."""
    deadline = time.monotonic() + timeout
    while client.get(name) != vector:
        assert time.monotonic() < deadline, "the embedding was not stored afresh"
        time.sleep(0.02)


def vectors(resp: engine_pb2.EmbedResponse) -> list[bytes]:
    return [d.vector for d in resp.data]


def sdk(mesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh["base_url"], api_key=key, max_retries=0, timeout=60)


# ---- hits -------------------------------------------------------------------------------------
def test_repeated_inputs_come_from_the_cache_without_the_engine(mesh):
    key, tenant = fresh_key(mesh)
    hits = metric(mesh, "llmesh_gateway_embedding_cache_hits_total", model=EMB)
    steps = engine_steps(mesh)
    first = embed(mesh, key, [A, B])
    assert engine_steps(mesh) > steps  # a miss runs on the engine (the counter below can move)
    assert first.cached_inputs == 0 and not any(d.cached for d in first.data)
    wait_entries(mesh, tenant, 2)
    steps = engine_steps(mesh)
    second = embed(mesh, key, [A, B])
    assert engine_steps(mesh) == steps  # the engine never saw it
    assert vectors(second) == vectors(first)  # byte for byte
    assert second.cached_inputs == 2 and all(d.cached for d in second.data)
    assert [d.index for d in second.data] == [0, 1] and second.dimensions == first.dimensions == 128
    assert second.usage.prompt_tokens == first.usage.prompt_tokens == len(A) + len(B)
    assert second.usage.cached_response and not first.usage.cached_response
    assert second.model == EMB
    assert metric(mesh, "llmesh_gateway_embedding_cache_hits_total", model=EMB) == hits + 2
    assert metric(mesh, "llmesh_gateway_embedding_cache_stored_bytes_total", model=EMB) >= 2 * 128 * 4
    value = redis.Redis.from_url(mesh["cache_redis"].url).get(entries(mesh, tenant)[0])
    assert len(value) == 128 * 4 and value in vectors(first)  # packed float32, nothing else
    assert 0 < redis.Redis.from_url(mesh["cache_redis"].url).pttl(entries(mesh, tenant)[0]) <= 600_000


def test_a_mixed_batch_comes_back_in_order_and_equal_to_a_fresh_computation(mesh):
    key, tenant = fresh_key(mesh)
    stored = embed(mesh, key, [A, C])
    wait_entries(mesh, tenant, 2)
    misses = metric(mesh, "llmesh_gateway_embedding_cache_misses_total", model=EMB)
    batch = [B, A, D, C, B]
    mixed = embed(mesh, key, batch)
    assert [d.index for d in mixed.data] == list(range(5))
    assert [d.cached for d in mixed.data] == [False, True, False, True, False] and mixed.cached_inputs == 2
    assert mixed.data[1].vector == stored.data[0].vector and mixed.data[3].vector == stored.data[1].vector
    assert mixed.usage.prompt_tokens == sum(map(len, batch)) and not mixed.usage.cached_response
    assert metric(mesh, "llmesh_gateway_embedding_cache_misses_total", model=EMB) == misses + 3
    fresh = embed(mesh, key, batch, cache=BYPASS)
    assert fresh.cached_inputs == 0
    for got, want, ids in zip(vectors(mixed), vectors(fresh), batch):
        np.testing.assert_allclose(np.frombuffer(got, "<f4"), np.frombuffer(want, "<f4"), atol=1e-5)
        assert_close(np.frombuffer(got, "<f4"), reference(mesh, ids))
    wait_entries(mesh, tenant, 4)  # B and D were stored (B once)
    assert len(entries(mesh, tenant)) == 4


# ---- what separates entries ---------------------------------------------------------------------
def test_tenants_never_share_entries(mesh):
    key_a, tenant_a = fresh_key(mesh)
    key_b, tenant_b = fresh_key(mesh)
    embed(mesh, key_a, [A])
    wait_entries(mesh, tenant_a, 1)
    assert embed(mesh, key_b, [A]).cached_inputs == 0
    wait_entries(mesh, tenant_b, 1)
    key_a2, _ = fresh_key(mesh, tenant=tenant_a)  # another key of the same tenant shares them
    assert embed(mesh, key_a2, [A]).cached_inputs == 1


def test_dimensions_separate_entries(mesh):
    key, tenant = fresh_key(mesh)
    first = embed(mesh, key, [A], dimensions=32)
    wait_entries(mesh, tenant, 1)
    assert embed(mesh, key, [A], dimensions=16).cached_inputs == 0
    assert embed(mesh, key, [A]).cached_inputs == 0
    again = embed(mesh, key, [A], dimensions=32)
    assert again.cached_inputs == 1 and again.dimensions == 32 and vectors(again) == vectors(first)
    assert_close(np.frombuffer(again.data[0].vector, "<f4"), reference(mesh, A, dimensions=32))


# ---- policy ------------------------------------------------------------------------------------
def test_bypass_and_refresh(mesh):
    key, tenant = fresh_key(mesh)
    embed(mesh, key, [C], cache=BYPASS)
    time.sleep(0.3)
    assert entries(mesh, tenant) == []  # bypass stores nothing
    embed(mesh, key, [C])
    wait_entries(mesh, tenant, 1)
    steps = engine_steps(mesh)
    assert embed(mesh, key, [C], cache=BYPASS).cached_inputs == 0
    assert engine_steps(mesh) > steps  # bypass skips the lookup
    client = redis.Redis.from_url(mesh["cache_redis"].url)
    client.pexpire(entries(mesh, tenant)[0], 60_000)
    assert embed(mesh, key, [C], cache=REFRESH).cached_inputs == 0
    deadline = time.monotonic() + 5
    while client.pttl(entries(mesh, tenant)[0]) <= 60_000:  # stored afresh, with the full TTL
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert embed(mesh, key, [C], cache=USE).cached_inputs == 1


def test_key_policy_off_wins_and_ttl_is_the_keys(mesh):
    off_key, off_tenant = fresh_key(mesh, response_cache="off")
    for _ in range(2):
        assert embed(mesh, off_key, [D], cache=USE).cached_inputs == 0
    time.sleep(0.3)
    assert entries(mesh, off_tenant) == []
    short_key, tenant = fresh_key(mesh, response_cache="ttl=1")
    embed(mesh, short_key, [D])
    wait_entries(mesh, tenant, 1)
    assert embed(mesh, short_key, [D]).cached_inputs == 1
    time.sleep(1.2)
    assert embed(mesh, short_key, [D]).cached_inputs == 0


def test_an_unknown_mode_is_invalid(mesh):
    key, _ = fresh_key(mesh)
    with pytest.raises(grpc.RpcError) as err:
        embed(mesh, key, [A], cache=9)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ResponseCacheMode" in err.value.details()
    with pytest.raises(openai.BadRequestError, match="x-llmesh-cache must be one of"):
        sdk(mesh, key).embeddings.create(model=EMB, input="x", extra_headers={"x-llmesh-cache": "sometimes"})


def test_cached_inputs_spend_no_tokens_per_minute(mesh):
    # Each call reserves its 9 input tokens; 20 of them would be 180, far over this key's 30
    # per minute: only the refund of cached inputs lets them all through.
    key, tenant = fresh_key(mesh, tpm=30)
    embed(mesh, key, [A])
    wait_entries(mesh, tenant, 1)
    for _ in range(20):
        assert embed(mesh, key, [A]).cached_inputs == 1
    with pytest.raises(grpc.RpcError) as err:  # while new inputs still spend theirs
        for i in range(5):
            embed(mesh, key, [[200 + i] * len(A)])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- the OpenAI front ---------------------------------------------------------------------------
def test_openai_sdk_with_the_cache_on(mesh):
    key, tenant = fresh_key(mesh)
    client = sdk(mesh, key)
    texts = ["cache me", "and me too"]
    first = client.embeddings.with_raw_response.create(model=EMB, input=texts)
    assert first.headers["x-llmesh-cache"] == "miss"
    wait_entries(mesh, tenant, 2)
    again = client.embeddings.with_raw_response.create(model=EMB, input=texts)
    assert again.headers["x-llmesh-cache"] == "hit"
    one, two = first.parse(), again.parse()
    assert [d.embedding for d in two.data] == [d.embedding for d in one.data]
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    partial = client.embeddings.with_raw_response.create(model=EMB, input=["something new", texts[1]])
    assert partial.headers["x-llmesh-cache"] == "partial"
    assert partial.parse().data[1].embedding == one.data[1].embedding
    bypassed = client.embeddings.with_raw_response.create(model=EMB, input=texts,
                                                          extra_headers={"x-llmesh-cache": "bypass"})
    assert bypassed.headers["x-llmesh-cache"] == "miss"


# ---- failures ----------------------------------------------------------------------------------
def test_damaged_entries_are_misses_and_are_stored_again(mesh):
    key, tenant = fresh_key(mesh)
    good = embed(mesh, key, [A])
    wait_entries(mesh, tenant, 1)
    client = redis.Redis.from_url(mesh["cache_redis"].url)
    (name,) = entries(mesh, tenant)
    errors = metric(mesh, "llmesh_gateway_embedding_cache_errors_total", model=EMB, op="decode")
    client.set(name, b"\x00" * 7)  # not packed float32
    out = embed(mesh, key, [A])
    assert out.cached_inputs == 0 and out.dimensions == 128
    assert_close(np.frombuffer(out.data[0].vector, "<f4"), reference(mesh, A))
    # The fresh vector is stored in the background: damage the entry again only once that
    # store has landed, or it would overwrite the damage (a race CI once lost).
    wait_stored(client, name, out.data[0].vector)
    # a well-formed vector of another width: caught beside an input the engine embeds
    client.set(name, good.data[0].vector[:64 * 4])
    out = embed(mesh, key, [A, B])
    assert out.cached_inputs == 0 and out.dimensions == 128
    assert_close(np.frombuffer(out.data[0].vector, "<f4"), reference(mesh, A))
    assert metric(mesh, "llmesh_gateway_embedding_cache_errors_total", model=EMB, op="decode") == errors + 2
    wait_stored(client, name, out.data[0].vector)
    assert embed(mesh, key, [A]).cached_inputs == 1


def wait_stored(client, name, vector, timeout=5.0):
    """Until the gateway's background store has written ``vector`` under ``name``."""
    deadline = time.monotonic() + timeout
    while client.get(name) != vector:
        assert time.monotonic() < deadline, "the embedding was not stored afresh"
        time.sleep(0.02)


def test_frozen_then_stopped_cache_redis_never_fails_calls(mesh):
    key, tenant = fresh_key(mesh)
    server = mesh["cache_redis"]
    embed(mesh, key, [B])
    wait_entries(mesh, tenant, 1)
    errors = metric(mesh, "llmesh_gateway_embedding_cache_errors_total", model=EMB, op="lookup")
    os.kill(server._proc.pid, signal.SIGSTOP)  # a hung Redis: lookups wait their bound, then go on
    try:
        for _ in range(2):
            started = time.monotonic()
            out = embed(mesh, key, [B, A], timeout=10)
            assert out.cached_inputs == 0 and len(out.data) == 2
            assert time.monotonic() - started < 5.0
    finally:
        os.kill(server._proc.pid, signal.SIGCONT)
    assert metric(mesh, "llmesh_gateway_embedding_cache_errors_total", model=EMB, op="lookup") > errors
    server.stop()
    try:
        for _ in range(3):
            started = time.monotonic()
            out = embed(mesh, key, [B, C], timeout=10)
            assert len(out.data) == 2 and out.cached_inputs == 0
            assert time.monotonic() - started < 5.0
    finally:
        server.start()
    # Back (empty: the test Redis keeps nothing across a restart): used again once the
    # store's pause after the failure is over.
    deadline = time.monotonic() + 10
    while not entries(mesh, tenant):
        assert time.monotonic() < deadline, "the cache was not used again after Redis came back"
        embed(mesh, key, [B])
        time.sleep(0.2)
    assert embed(mesh, key, [B]).cached_inputs == 1

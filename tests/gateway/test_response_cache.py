"""The gateway's response cache against real processes: a tiny engine, the router, the
gateway with --response-cache, its keys in one Redis and its cache in another (so the
cache's Redis can be stopped or frozen while keys still authenticate).

A hit must be the stored answer message for message (tokens, text, usage, chunking),
marked ``cached_response``, and must not reach the engine (its step counter stays put);
only deterministic requests are cached, per tenant, per sampling, per key policy and
request mode, for the TTL; a down or frozen cache Redis costs a request at most the
bounded wait; an aborted stream is never stored."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request

import grpc
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, inference_pb2
from tests.gateway.test_auth import add_key, bearer, stub
from tests.mesh_helpers import RedisServer, ServiceProcess, free_ports, start_engine

MODEL = "tiny"
WINDOW = 256
PREFIX = "llmesh:rc:"
USE, BYPASS, REFRESH = (inference_pb2.RESPONSE_CACHE_MODE_USE, inference_pb2.RESPONSE_CACHE_MODE_BYPASS,
                        inference_pb2.RESPONSE_CACHE_MODE_REFRESH)


@contextlib.contextmanager
def cache_mesh(tiny_llama, run_dir, *gateway_args: str):
    """Keys Redis, cache Redis, engine, router and a gateway with the response cache on."""
    with contextlib.ExitStack() as stack:
        keys_redis = stack.enter_context(RedisServer())
        cache_redis = stack.enter_context(RedisServer())
        engine = stack.enter_context(start_engine(
            tiny_llama, "--served-model-name", MODEL, "--num-kv-blocks", "128", "--max-model-len", str(WINDOW)))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": tiny_llama, "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        metrics_port, http_port = free_ports(2)
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--redis-url", keys_redis.url,
            "--response-cache", "true", "--response-cache-redis-url", cache_redis.url,
            "--response-cache-max-memory", str(64 << 20), "--metrics-port", str(metrics_port),
            "--http-port", str(http_port), *gateway_args]))
        yield {"keys_redis": keys_redis, "cache_redis": cache_redis, "engine": engine, "gateway": gateway,
               "metrics_port": metrics_port, "http": f"http://127.0.0.1:{http_port}"}


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    with cache_mesh(tiny_llama, tmp_path_factory.mktemp("response-cache")) as m:
        yield m


_tenants = iter(range(10 ** 6))


def fresh_key(mesh, **kw) -> tuple[str, str]:
    """(key, tenant): a key of a tenant no other test uses, so entries never collide."""
    tenant = kw.pop("tenant", None) or f"rc-{os.getpid()}-{next(_tenants)}"
    key, _ = add_key(mesh["keys_redis"].url, tenant=tenant, **kw)
    return key, tenant


def generate(mesh, key: str, cache: int = 0, text: str = "the cache test", timeout: float = 30,
             **sampling) -> list[common_pb2.GenerateResponse]:
    sampling.setdefault("max_tokens", 8)
    sampling.setdefault("ignore_eos", True)
    req = inference_pb2.GenerateRequest(model=MODEL, text=text, sampling=common_pb2.SamplingParams(**sampling),
                                        cache=cache)
    return list(stub(mesh["gateway"].address).Generate(req, metadata=bearer(key), timeout=timeout))


def entries(mesh, tenant: str) -> list[bytes]:
    return list(redis.Redis.from_url(mesh["cache_redis"].url).scan_iter(f"{PREFIX}{tenant}:*"))


def wait_entries(mesh, tenant: str, count: int, within_s: float = 5.0) -> None:
    """The store runs after the stream ends, in the background: wait for it (bounded)."""
    deadline = time.monotonic() + within_s
    while len(entries(mesh, tenant)) < count:
        assert time.monotonic() < deadline, f"{len(entries(mesh, tenant))} entries of {tenant}, wanted {count}"
        time.sleep(0.02)


def engine_steps(mesh) -> int:
    load = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh["engine"].address)).Load(
        engine_pb2.LoadRequest(), timeout=5)
    return load.steps


def metric(mesh, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh['metrics_port']}/metrics", timeout=5).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def shape(stream: list[common_pb2.GenerateResponse]) -> list[tuple]:
    """What a replay must reproduce: each message's tokens, text, end and usage."""
    return [(list(m.token_ids), m.text, m.index, m.finish_reason, m.stop_reason,
             (m.usage.prompt_tokens, m.usage.cached_tokens, m.usage.completion_tokens)) for m in stream]


# ---- hits -------------------------------------------------------------------------------------
def test_greedy_hit_replays_the_stored_answer_without_the_engine(mesh):
    key, tenant = fresh_key(mesh)
    hits = metric(mesh, "llmesh_gateway_response_cache_hits_total", model=MODEL)
    first = generate(mesh, key, temperature=0.0, max_tokens=12)
    assert not any(m.cached_response for m in first)
    assert first[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    wait_entries(mesh, tenant, 1)
    steps = engine_steps(mesh)
    second = generate(mesh, key, temperature=0.0, max_tokens=12)
    assert engine_steps(mesh) == steps  # the engine never saw it
    assert shape(second) == shape(first)  # same tokens, text, chunking and usage
    assert all(m.cached_response for m in second) and second[-1].usage.cached_response
    assert metric(mesh, "llmesh_gateway_response_cache_hits_total", model=MODEL) == hits + 1
    assert metric(mesh, "llmesh_gateway_response_cache_stored_bytes_total", model=MODEL) > 0
    redis_key = entries(mesh, tenant)[0]
    assert 0 < redis.Redis.from_url(mesh["cache_redis"].url).pttl(redis_key) <= 600_000  # the gateway's TTL


def test_unary_calls_hit_with_usage_marked(mesh):
    key, tenant = fresh_key(mesh)
    req = inference_pb2.ChatRequest(model=MODEL, messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                                    sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0.0,
                                                                       ignore_eos=True))
    gateway = stub(mesh["gateway"].address)
    first = gateway.ChatComplete(req, metadata=bearer(key), timeout=30)
    wait_entries(mesh, tenant, 1)
    streamed = list(gateway.Chat(req, metadata=bearer(key), timeout=30))  # the stream shares the entry
    again = gateway.ChatComplete(req, metadata=bearer(key), timeout=30)
    assert all(m.cached_response for m in streamed)
    assert "".join(m.text for m in streamed) == first.choices[0].text
    assert again.usage.cached_response and not first.usage.cached_response
    again.usage.cached_response = False
    assert again.usage == first.usage and list(again.choices) == list(first.choices)


def test_seeded_sampling_is_cached_unseeded_never(mesh):
    key, tenant = fresh_key(mesh)
    for _ in range(2):
        out = generate(mesh, key, temperature=1.0, top_k=50)
        assert not any(m.cached_response for m in out)
    time.sleep(0.3)
    assert entries(mesh, tenant) == []
    first = generate(mesh, key, temperature=1.0, seed=1234)
    wait_entries(mesh, tenant, 1)
    second = generate(mesh, key, temperature=1.0, seed=1234)
    assert all(m.cached_response for m in second) and shape(second) == shape(first)
    assert not any(m.cached_response for m in generate(mesh, key, temperature=1.0, seed=99))


def test_n_choices_are_replayed_whole(mesh):
    key, tenant = fresh_key(mesh)
    first = generate(mesh, key, temperature=0.8, seed=5, n=2, max_tokens=5)
    wait_entries(mesh, tenant, 1)
    second = generate(mesh, key, temperature=0.8, seed=5, n=2, max_tokens=5)
    assert all(m.cached_response for m in second) and shape(second) == shape(first)
    assert {m.index for m in second} == {0, 1}


# ---- what separates entries ---------------------------------------------------------------------
def test_tenants_never_share_entries(mesh):
    key_a, tenant_a = fresh_key(mesh)
    key_b, tenant_b = fresh_key(mesh)
    generate(mesh, key_a, temperature=0.0)
    wait_entries(mesh, tenant_a, 1)
    assert not any(m.cached_response for m in generate(mesh, key_b, temperature=0.0))
    wait_entries(mesh, tenant_b, 1)
    key_a2, _ = fresh_key(mesh, tenant=tenant_a)  # another key of the same tenant shares them
    assert all(m.cached_response for m in generate(mesh, key_a2, temperature=0.0))


@pytest.mark.parametrize("change", [
    {"max_tokens": 7}, {"stop": ["zz"]}, {"logit_bias": {5: 1.0}}, {"logprobs": 1}, {"ignore_eos": False},
    {"repetition_penalty": 1.1}, {"json_object": True}, {"text": "another prompt"},
])
def test_any_other_input_is_a_miss(mesh, change):
    key, tenant = fresh_key(mesh)
    generate(mesh, key, temperature=0.0)
    wait_entries(mesh, tenant, 1)
    out = generate(mesh, key, **{"temperature": 0.0, **change})
    assert not any(m.cached_response for m in out), change


# ---- policy ------------------------------------------------------------------------------------
def test_bypass_and_refresh(mesh):
    key, tenant = fresh_key(mesh)
    generate(mesh, key, cache=BYPASS, temperature=0.0)
    time.sleep(0.3)
    assert entries(mesh, tenant) == []  # bypass stores nothing
    generate(mesh, key, temperature=0.0)
    wait_entries(mesh, tenant, 1)
    steps = engine_steps(mesh)
    assert not any(m.cached_response for m in generate(mesh, key, cache=BYPASS, temperature=0.0))
    assert engine_steps(mesh) > steps  # bypass skips the lookup
    client = redis.Redis.from_url(mesh["cache_redis"].url)
    client.pexpire(entries(mesh, tenant)[0], 60_000)
    refreshed = generate(mesh, key, cache=REFRESH, temperature=0.0)
    assert not any(m.cached_response for m in refreshed)
    deadline = time.monotonic() + 5
    while client.pttl(entries(mesh, tenant)[0]) <= 60_000:  # stored afresh, with the full TTL
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert all(m.cached_response for m in generate(mesh, key, cache=USE, temperature=0.0))


def test_key_policy_off_and_ttl_expiry(mesh):
    off_key, off_tenant = fresh_key(mesh, response_cache="off")
    for _ in range(2):
        assert not any(m.cached_response for m in generate(mesh, off_key, cache=USE, temperature=0.0))
    time.sleep(0.3)
    assert entries(mesh, off_tenant) == []
    short_key, tenant = fresh_key(mesh, response_cache="ttl=1")
    generate(mesh, short_key, temperature=0.0)
    wait_entries(mesh, tenant, 1)
    assert all(m.cached_response for m in generate(mesh, short_key, temperature=0.0))
    time.sleep(1.2)
    assert not any(m.cached_response for m in generate(mesh, short_key, temperature=0.0))


def test_lru_bound_is_set_on_the_dedicated_redis(mesh):
    config = redis.Redis.from_url(mesh["cache_redis"].url, decode_responses=True).config_get("maxmemory*")
    assert config["maxmemory-policy"] == "allkeys-lru" and int(config["maxmemory"]) == 64 << 20


# ---- failures ----------------------------------------------------------------------------------
def test_aborted_stream_is_not_stored(mesh):
    key, tenant = fresh_key(mesh)
    req = inference_pb2.GenerateRequest(model=MODEL, text="abort me", sampling=common_pb2.SamplingParams(
        max_tokens=WINDOW - 16, temperature=0.0, ignore_eos=True))
    call = stub(mesh["gateway"].address).Generate(req, metadata=bearer(key), timeout=60)
    assert next(call).token_ids
    call.cancel()
    time.sleep(1.0)
    assert entries(mesh, tenant) == []
    assert metric(mesh, "llmesh_gateway_response_cache_stores_total", model=MODEL) > 0  # others were stored


def test_frozen_then_stopped_cache_redis_never_fails_requests(mesh):
    key, tenant = fresh_key(mesh)
    server = mesh["cache_redis"]
    errors = metric(mesh, "llmesh_gateway_response_cache_errors_total", model=MODEL, op="lookup")
    os.kill(server._proc.pid, signal.SIGSTOP)  # a hung Redis: lookups wait their bound, then go on
    try:
        for _ in range(2):
            started = time.monotonic()
            out = generate(mesh, key, temperature=0.0, timeout=10)
            assert out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert not any(m.cached_response for m in out)
            assert time.monotonic() - started < 5.0
    finally:
        os.kill(server._proc.pid, signal.SIGCONT)
    assert metric(mesh, "llmesh_gateway_response_cache_errors_total", model=MODEL, op="lookup") > errors
    server.stop()
    try:
        for _ in range(3):
            started = time.monotonic()
            out = generate(mesh, key, temperature=0.0, timeout=10)
            assert out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert time.monotonic() - started < 5.0
    finally:
        server.start()
    # Back: the gateway uses it again once its pause after the failure is over.
    deadline = time.monotonic() + 10
    while not entries(mesh, tenant):
        assert time.monotonic() < deadline, "the cache was not used again after Redis came back"
        generate(mesh, key, temperature=0.0)
        time.sleep(0.2)
    assert all(m.cached_response for m in generate(mesh, key, temperature=0.0))


def test_an_unknown_mode_is_invalid(mesh):
    key, _ = fresh_key(mesh)
    with pytest.raises(grpc.RpcError) as err:
        generate(mesh, key, cache=9, temperature=0.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ResponseCacheMode" in err.value.details()


def test_hits_spend_no_tokens_per_minute(mesh):
    # Each request reserves prompt + max_tokens (about 12 tokens); 20 of them would be 240, far
    # over this key's 60 per minute: only a hit's full refund lets them all through.
    key, tenant = fresh_key(mesh, tpm=60)
    generate(mesh, key, temperature=0.0, max_tokens=4)
    wait_entries(mesh, tenant, 1)
    for _ in range(20):
        assert all(m.cached_response for m in generate(mesh, key, temperature=0.0, max_tokens=4))
    with pytest.raises(grpc.RpcError) as err:  # while misses still spend theirs
        for i in range(20):
            generate(mesh, key, temperature=0.0, max_tokens=4, text=f"miss {i}")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

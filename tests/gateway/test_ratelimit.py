"""Rate limits shared through Redis by two real gateway processes: one request budget for
both, token reservations settled on cancel, concurrent streams, and Redis outages handled
by the configured mode and recovered from without restarting anything."""

from __future__ import annotations

import contextlib
import math
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmesh.v1 import common_pb2, inference_pb2
from tests.gateway.test_auth import MODEL, add_key, bearer, code_of, engine_and_router, generate, start_gateway, stub
from tests.mesh_helpers import RedisServer, free_port

STEP_DELAY_S = "0.02"
"""Engine fault injection: each step sleeps, so long streams stay open for the concurrency
and cancellation tests."""


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ratelimit-mesh")
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        router, models_file = stack.enter_context(
            engine_and_router(tiny_llama, run_dir, "--fault-step-delay-s", STEP_DELAY_S))
        metrics_port = free_port()
        gateways = [stack.enter_context(start_gateway(router, models_file, "--redis-url", redis_server.url,
                                                      "--redis-failure-mode", mode, "--metrics-port", str(port)))
                    for mode, port in (("closed", metrics_port), ("closed", 0), ("open", 0))]
        yield {"redis": redis_server, "gateways": [g.address for g in gateways], "metrics_port": metrics_port}


def test_two_gateways_share_one_request_bucket(mesh):
    key, _ = add_key(mesh["redis"].url, rpm=50)
    a, b = mesh["gateways"][:2]
    req = inference_pb2.GenerateRequest(model=MODEL, text="hi", sampling=common_pb2.SamplingParams(max_tokens=1))

    def attempt(i: int):
        call = stub(a if i % 2 else b).Generate(req, metadata=bearer(key), timeout=60)
        try:
            list(call)
            return "OK", None
        except grpc.RpcError as e:
            trailers = dict(e.trailing_metadata() or ())
            return e.code().name, (e.details(), trailers.get("retry-after"))

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(attempt, range(200)))
    elapsed = time.monotonic() - started
    admitted = sum(1 for code, _ in results if code == "OK")
    refused = [info for code, info in results if code == "RESOURCE_EXHAUSTED"]
    assert admitted + len(refused) == 200, {code for code, _ in results}
    assert 50 <= admitted <= 50 + math.ceil(elapsed * 50 / 60) + 1, (admitted, elapsed)
    details, retry_after = refused[0]
    assert "requests per minute" in details and int(retry_after) >= 1


def test_token_reservation_is_settled_when_a_stream_is_cancelled(mesh):
    gw = mesh["gateways"][0]
    key, _ = add_key(mesh["redis"].url, tpm=400)
    req = inference_pb2.GenerateRequest(model=MODEL, text="hi", sampling=common_pb2.SamplingParams(
        max_tokens=200, ignore_eos=True))
    call = stub(gw).Generate(req, metadata=bearer(key), timeout=60)
    next(iter(call))  # admitted: ~210 of 400 tokens reserved
    code, msg = code_of(lambda: generate(gw, bearer(key), max_tokens=200))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per minute" in msg
    call.cancel()
    deadline = time.monotonic() + 5
    while code_of(lambda: generate(gw, bearer(key), max_tokens=200))[0] != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the cancelled stream's reservation was never settled"
        time.sleep(0.1)
    code, msg = code_of(lambda: generate(gw, bearer(key), max_tokens=1000))
    assert code != grpc.StatusCode.OK


def test_a_request_larger_than_the_token_budget_names_the_limit(mesh):
    key, _ = add_key(mesh["redis"].url, tpm=50)
    code, msg = code_of(lambda: generate(mesh["gateways"][0], bearer(key), max_tokens=100))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per minute" in msg


def test_concurrent_streams_are_limited_per_key(mesh):
    a, b = mesh["gateways"][:2]
    key, _ = add_key(mesh["redis"].url, concurrency=1)
    req = inference_pb2.GenerateRequest(model=MODEL, text="hi", sampling=common_pb2.SamplingParams(
        max_tokens=100, ignore_eos=True))
    call = stub(a).Generate(req, metadata=bearer(key), timeout=60)
    next(iter(call))
    code, msg = code_of(lambda: generate(b, bearer(key)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent streams" in msg
    call.cancel()
    deadline = time.monotonic() + 5
    while code_of(lambda: generate(b, bearer(key)))[0] != grpc.StatusCode.OK:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_redis_outage_follows_the_mode_and_recovers_without_restarts(mesh):
    closed, _, open_ = mesh["gateways"]
    key, _ = add_key(mesh["redis"].url, rpm=3)
    assert generate(open_, bearer(key))  # the open gateway has now seen this key
    mesh["redis"].stop()
    try:
        code, msg = code_of(lambda: generate(closed, bearer(key)))
        assert code == grpc.StatusCode.UNAVAILABLE and "Redis" in msg
        for _ in range(5):  # fail-open: no limits while Redis is away (rpm is 3)
            assert generate(open_, bearer(key))
        code, _ = code_of(lambda: generate(open_, bearer("llm_0123456789ab_" + "y" * 40)))
        assert code != grpc.StatusCode.OK  # keys never seen before are not accepted blind
    finally:
        mesh["redis"].start()
    key, _ = add_key(mesh["redis"].url, rpm=2)  # the restarted Redis is empty
    for gw in (closed, open_):
        deadline = time.monotonic() + 10
        while code_of(lambda: generate(gw, bearer(key)))[0] != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the gateway did not recover after Redis came back"
            time.sleep(0.2)
    codes = [code_of(lambda: generate(closed, bearer(key)))[0] for _ in range(3)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh['metrics_port']}/metrics", timeout=5).read().decode()
    errors = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
              if s.name == "llmesh_gateway_redis_errors_total"]
    assert sum(errors) >= 1

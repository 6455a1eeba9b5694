"""Reused routes (RouteDecision.reuse_ms): with one replica of a named model, the direct gateway
asks the router once and routes the next requests itself until the grant runs out; a reused
route whose engine died asks the router again. A real mesh: one engine process of a tiny
model on a fixed port, one router, one direct gateway with its metrics port. The grant rules
themselves are tested on ``ReusableRoutes`` with a clock the test moves."""

from __future__ import annotations

import contextlib
import time
import urllib.request

import grpc
import pytest
import yaml

from llmesh.errors import ServiceError
from llmesh.gateway.route_reuse import ReusableRoutes
from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, inference_pb2, inference_pb2_grpc
from llmesh.v1 import router_pb2, router_pb2_grpc
from tests.fixtures.tiny_models import build_tiny_model
from tests.mesh_helpers import ServiceProcess, free_port, start_engine, wait_serving

MODEL = "tiny"
TIMEOUT = 30
REUSE_MS = 60_000  # longer than the module: the grant only ends when a test ends it


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("route-reuse")
    model_dir = build_tiny_model(str(root / "tiny-llama"), "llama")
    port = free_port()
    engine_args = ["--served-model-name", MODEL, "--num-kv-blocks", "64", "--max-model-len", "256",
                   "--port", str(port)]
    with contextlib.ExitStack() as stack:
        state = {"engine": start_engine(model_dir, *engine_args)}
        stack.callback(lambda: state["engine"].stop())
        models_file = root / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [
            {"name": MODEL, "path": model_dir, "size_class": "small", "replicas": 1,
             "addresses": [state["engine"].address]}]}))
        router_metrics_port = free_port()
        router = stack.enter_context(ServiceProcess("llmesh.router.main", [
            "--models-file", str(models_file), "--startup-wait-s", "3", "--health-check-interval-s", "0.2",
            "--decision-reuse-ms", str(REUSE_MS), "--metrics-port", str(router_metrics_port)]))
        wait_serving(router.address, timeout=10)
        metrics_port = free_port()
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--auth", "false",
            "--routing", "direct", "--metrics-port", str(metrics_port)]))
        yield {"state": state, "router": router, "gateway": gateway, "metrics_port": metrics_port,
               "router_metrics_port": router_metrics_port,
               "model_dir": model_dir, "engine_args": engine_args}


def greedy(n: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def routes(mesh, source: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh['metrics_port']}/metrics", timeout=5).read().decode()
    prefix = f'llmesh_gateway_route_decisions_total{{model="{MODEL}",source="{source}"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def route_calls(mesh) -> float:
    """Route calls the router answered or refused (all models and codes)."""
    url = f"http://127.0.0.1:{mesh['router_metrics_port']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llmesh_router_routes_total{"))


def generate(mesh, ids: list[int], n: int = 4) -> list[common_pb2.GenerateResponse]:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh["gateway"].address))
    return list(stub.Generate(inference_pb2.GenerateRequest(
        model=MODEL, token_ids=router_pb2.TokenIds(ids=ids), sampling=greedy(n)), timeout=TIMEOUT))


def test_the_router_grants_reuse_for_one_replica_of_a_named_model(mesh):
    router = router_pb2_grpc.RouterStub(grpc.insecure_channel(mesh["router"].address))
    for model in (MODEL, ""):  # named, and the default model by an empty name
        decision = router.Route(router_pb2.RouteRequest(model=model, prompt_token_ids=[5, 6, 7], sampling=greedy(2)),
                                timeout=TIMEOUT)
        assert decision.reuse_ms == REUSE_MS and decision.target.pick_reason == "only_replica"
        assert len(decision.target.candidates) == 1


def test_later_requests_reuse_the_route_and_match_the_engine(mesh):
    before_router, before_reused = routes(mesh, "router"), routes(mesh, "reused")
    prompt = [11, 12, 13, 14, 15]
    outputs = [generate(mesh, prompt) for _ in range(3)]
    assert routes(mesh, "reused") - before_reused >= 2
    assert routes(mesh, "router") - before_router <= 1  # at most the first asked (an earlier test may have)
    engine = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh["state"]["engine"].address))
    direct = list(engine.Generate(engine_pb2.EngineGenerateRequest(prompt_token_ids=prompt, sampling=greedy(4)),
                                  timeout=TIMEOUT))
    want = [t for m in direct for t in m.token_ids]
    for msgs in outputs:
        assert [t for m in msgs for t in m.token_ids] == want
        assert msgs[-1].model == MODEL and msgs[-1].replica


def test_a_reused_route_whose_engine_died_asks_the_router_again(mesh):
    generate(mesh, [7, 8, 9])  # the grant is in place
    state = mesh["state"]
    state["engine"].kill()
    reused, asked = routes(mesh, "reused"), route_calls(mesh)
    with pytest.raises(grpc.RpcError) as e:
        generate(mesh, [7, 8, 9])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert routes(mesh, "reused") == reused + 1  # the failure came through the grant
    assert route_calls(mesh) == asked + 1  # and the router was asked once more
    # The engine back on its port: the router's health checks bring it back, and the gateway,
    # holding no grant, asks until it gets one.
    state["engine"] = start_engine(mesh["model_dir"], *mesh["engine_args"])
    deadline = time.monotonic() + 15
    while True:
        try:
            msgs = generate(mesh, [7, 8, 9])
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert time.monotonic() < deadline, "the restarted engine never served through the gateway"
            time.sleep(0.2)
    assert len([t for m in msgs for t in m.token_ids]) == 4
    reused = routes(mesh, "reused")
    generate(mesh, [7, 8, 9])
    assert routes(mesh, "reused") == reused + 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def decision(reuse_ms: int, escalation: bool = False) -> router_pb2.RouteDecision:
    d = router_pb2.RouteDecision(max_failovers=2, reuse_ms=reuse_ms)
    d.target.model, d.target.reason, d.target.pick_reason = MODEL, "explicit", "only_replica"
    d.target.candidates.add(address="127.0.0.1:1", replica="tiny@127.0.0.1:1")
    d.target.request.request_id = "first"
    if escalation:
        d.escalation.tokens = 4
    return d


def test_grants_last_reuse_ms_and_build_each_request():
    clock = Clock()
    reusable = ReusableRoutes(clock)
    first = router_pb2.RouteRequest(model=MODEL, prompt_token_ids=[1, 2], request_id="first")
    reusable.remember(first, decision(500))
    later = router_pb2.RouteRequest(model=MODEL, prompt_token_ids=[3, 4, 5], request_id="later", sampling=greedy(9),
                                    cache_salt="t1", priority=common_pb2.PRIORITY_BATCH)
    got = reusable.decision(later)
    assert got is not None and got.max_failovers == 2 and not got.reuse_ms
    assert [c.address for c in got.target.candidates] == ["127.0.0.1:1"]
    req = got.target.request
    assert (list(req.prompt_token_ids), req.request_id, req.cache_salt) == ([3, 4, 5], "later", "t1")
    assert req.sampling == greedy(9) and req.priority == common_pb2.PRIORITY_BATCH
    assert reusable.decision(router_pb2.RouteRequest(model="other", prompt_token_ids=[1])) is None
    clock.now += 0.499
    assert reusable.decision(later) is not None
    clock.now += 0.002
    assert reusable.decision(later) is None  # expired, and dropped
    clock.now -= 0.1
    assert reusable.decision(later) is None


def test_no_grant_without_reuse_ms_for_auto_or_with_escalation():
    reusable = ReusableRoutes(Clock())
    route = router_pb2.RouteRequest(model=MODEL, prompt_token_ids=[1, 2])
    reusable.remember(route, decision(500))
    reusable.remember(route, decision(0))  # the router's latest answer withdraws the grant
    assert reusable.decision(route) is None
    auto = router_pb2.RouteRequest(model="auto", prompt_token_ids=[1, 2])
    reusable.remember(auto, decision(500))
    assert reusable.decision(auto) is None
    reusable.remember(route, decision(500, escalation=True))
    assert reusable.decision(route) is None
    reusable.remember(route, decision(500))
    reusable.forget(MODEL)
    assert reusable.decision(route) is None
    reusable.remember(route, decision(500))
    with pytest.raises(ServiceError, match="empty"):  # the router's own validation of the prompt
        reusable.decision(router_pb2.RouteRequest(model=MODEL))

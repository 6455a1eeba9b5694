"""Failures contained at the router and the gateway, in a real mesh: two engine processes
of a tiny model, the router (round robin, so that both replicas get requests), and a
gateway per routing mode (direct: it streams from the engine itself; proxy: through the
router's stream).

Engine 0 is restarted between tests with the fault each one needs, so the tests run in
file order; the last ones kill the engines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
import yaml

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc
from tests.fixtures.tiny_models import build_tiny_model
from tests.mesh_helpers import ServiceProcess, free_port, start_engine, wait_serving

MODEL = "tiny"
TIMEOUT = 60
STALL_S = 2.0
"""The router's --stream-stall-timeout-s and the gateway's --engine-stall-timeout-s."""
FROZEN_STREAM_ENDS_WITHIN_S = STALL_S + 0.5 + 1.0 + 3.0
"""Stall timeout + one health interval + one check timeout, and slack for a loaded machine."""


@dataclasses.dataclass
class Mesh:
    engines: list[ServiceProcess]
    router: ServiceProcess
    gateways: dict[str, ServiceProcess]
    model_dir: str
    engine_args: list[str]
    metrics_port: int

    def router_stub(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(grpc.insecure_channel(self.router.address))

    def gateway(self, mode: str) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(self.gateways[mode].address))

    def name(self, i: int) -> str:
        return f"{MODEL}@{self.engines[i].address}"

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def restart_engine(self, i: int, *faults: str) -> None:
        """Engine i again on its port, with these fault flags, back in the router's pool."""
        port = self.engines[i].address.rsplit(":", 1)[1]
        self.engines[i].kill()
        self.engines[i] = start_engine(self.model_dir, *self.engine_args, "--port", port, *faults)
        wait_healthy(self.router_stub(), 2, within_s=10)


def healthy(stub: router_pb2_grpc.RouterStub) -> int:
    cards = stub.ListModels(router_pb2.RouterListModelsRequest(), timeout=5).models
    return next(c.healthy_replicas for c in cards if c.name == MODEL)


def wait_healthy(stub, n: int, within_s: float) -> float:
    t0 = time.monotonic()
    while healthy(stub) != n:
        assert time.monotonic() - t0 < within_s, f"the pool did not reach {n} healthy replicas in {within_s}s"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("failover")
    model_dir = build_tiny_model(str(root / "tiny-llama"), "llama")
    with contextlib.ExitStack() as stack:
        engine_args = ["--served-model-name", MODEL, "--num-kv-blocks", "64", "--max-model-len", "512",
                       "--fault-step-delay-s", "0.02"]
        engines = [start_engine(model_dir, *engine_args, "--fault-fail-admission", "true", wait=False),
                   start_engine(model_dir, *engine_args, wait=False)]
        stack.callback(lambda: [e.kill() for e in engines])
        for e in engines:
            e.wait_ready()
        models_file = root / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [
            {"name": MODEL, "path": model_dir, "size_class": "small", "replicas": 2,
             "addresses": [e.address for e in engines]}]}))
        metrics_port = free_port()
        router = stack.enter_context(ServiceProcess("llmesh.router.main", [
            "--models-file", str(models_file), "--policy", "round_robin", "--startup-wait-s", "5",
            "--stream-stall-timeout-s", str(STALL_S), "--metrics-port", str(metrics_port)]))
        wait_serving(router.address, timeout=10)
        gateways = {mode: stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--auth", "false",
            "--routing", mode, "--engine-stall-timeout-s", str(STALL_S)])) for mode in ("direct", "proxy")}
        yield Mesh(engines, router, gateways, model_dir, engine_args, metrics_port)


def route(stub, max_tokens: int = 3, timeout: float | None = TIMEOUT):
    req = router_pb2.RouteRequest(model=MODEL, prompt_token_ids=[5, 6, 7, 8], sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return stub.Generate(req, timeout=timeout)


def gateway_request(max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model=MODEL, token_ids=router_pb2.TokenIds(ids=[5, 6, 7, 8]),
                                         sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_internal_error_before_the_first_token_fails_over_to_the_other_replica(mesh):
    """Engine 0 fails every request with INTERNAL (its admission fails): each request that
    round robin sends there completes on engine 1 instead."""
    failovers = mesh.metric("llmesh_router_failovers_total")
    for _ in range(4):
        msgs = list(route(mesh.router_stub()))
        assert msgs[-1].replica == mesh.name(1) and sum(len(m.token_ids) for m in msgs) == 3
        time.sleep(0.6)  # a health check (SERVING) brings engine 0 back between requests
    assert mesh.metric("llmesh_router_failovers_total") >= failovers + 1


def test_unavailable_before_the_first_token_fails_over_and_the_replica_is_skipped_until_healthy(mesh):
    """Engine 0's core fails on its first step: the request fails over, engine 0 is
    NOT_SERVING while a fresh core starts, and the router sends nothing there meanwhile."""
    mesh.restart_engine(0, "--fault-fail-step-at", "1")
    stub = mesh.router_stub()
    failovers = mesh.metric("llmesh_router_failovers_total")
    for _ in range(2):  # round robin: one of two goes to engine 0 first
        assert list(route(stub))[-1].replica == mesh.name(1)
    assert mesh.metric("llmesh_router_failovers_total") == failovers + 1
    assert healthy(stub) == 1
    for _ in range(3):  # skipped: no new failover while its fresh core loads
        assert list(route(stub))[-1].replica == mesh.name(1)
    assert mesh.metric("llmesh_router_failovers_total") == failovers + 1
    wait_healthy(stub, 2, within_s=60)  # the fresh core serves: back in the pool


def stream_in_background(call) -> tuple[threading.Thread, list]:
    """Drain a started stream on a thread; the outcome lands in the list with its time."""
    outcome: list = []

    def drain() -> None:
        try:
            for _ in call:
                pass
            outcome.append(("ok", time.monotonic()))
        except grpc.RpcError as e:
            outcome.append((e, time.monotonic()))

    t = threading.Thread(target=drain)
    t.start()
    return t, outcome


@contextlib.contextmanager
def frozen(engines: list[ServiceProcess]):
    """SIGSTOP the engines' whole process groups (front end and core); SIGCONT on exit."""
    for e in engines:
        os.killpg(e.pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        for e in engines:
            os.killpg(e.pid, signal.SIGCONT)


@pytest.mark.parametrize("path", ["router", "direct"])
def test_stream_from_a_frozen_engine_ends_unavailable_without_a_client_deadline(mesh, path):
    if path == "router":
        mesh.restart_engine(0)  # both engines healthy, without faults
    call = (route(mesh.router_stub(), max_tokens=400, timeout=None) if path == "router" else
            mesh.gateway("direct").Generate(gateway_request(400)))  # no deadline
    assert next(call).token_ids
    thread, outcome = stream_in_background(call)
    with frozen(mesh.engines) as t0:  # the stream's engine, whichever it is
        thread.join(FROZEN_STREAM_ENDS_WITHIN_S + 2)
        assert outcome, f"the stream still hangs {time.monotonic() - t0:.1f}s into the freeze"
    err, t = outcome[0]
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "stopped answering" in err.details() and "after the first token" in err.details(), err.details()
    assert any(mesh.engines[i].address in err.details() for i in range(2)), err.details()
    assert t - t0 < FROZEN_STREAM_ENDS_WITHIN_S
    wait_healthy(mesh.router_stub(), 2, within_s=10)  # thawed: both back


def test_list_models_shows_a_killed_replica_unhealthy_within_a_second(mesh):
    mesh.engines[0].kill()
    t0 = time.monotonic()
    stub = mesh.gateway("proxy")
    while True:
        card = next(m for m in stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
                    if m.name == MODEL)
        if card.healthy_replicas == 1:
            break
        assert time.monotonic() - t0 < 1.5, "ListModels still counts the killed replica healthy"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["proxy", "direct"])
def test_a_dead_engine_is_named_in_the_error_not_the_router(mesh, mode):
    if mesh.engines[1].alive():
        mesh.engines[1].kill()
    with pytest.raises(grpc.RpcError) as e:
        list(mesh.gateway(mode).Generate(gateway_request(3), timeout=TIMEOUT))
    details = e.value.details()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "router" not in details and mesh.name(1) in details and f"engine {mesh.name(1)}" in details, details

"""A gateway of several worker processes (``--workers``) in front of a real router and engine:
connections spread over the workers, every worker answers gRPC and HTTP alike, metrics are
summed over workers, a killed worker is started again, and the workers never outlive the
supervisor (SIGTERM stops them, a SIGKILLed supervisor takes them along)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import grpc
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, inference_pb2, inference_pb2_grpc, router_pb2
from tests.faults._launcher_helpers import alive
from tests.mesh_helpers import ServiceProcess, free_ports, start_engine

MODEL = "tiny"
WORKERS = 2
CONNECTIONS = 24
"""Connections opened at once: the chance that the kernel puts them all on one of two
workers is 2 * 2**-24."""
PROMPT = [5, 17, 23, 99, 4, 61]


@pytest.fixture(scope="module")
def models_file(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gateway-workers")
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(tiny_llama, "--served-model-name", MODEL,
                                                  "--num-kv-blocks", "64", "--max-model-len", "256"))
        path = run_dir / "models.yaml"
        path.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": tiny_llama, "size_class": "small", "replicas": 1,
            "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(path)]))
        yield {"path": str(path), "router": router.address, "engine": engine.address}


def start_gateway(models_file, *extra: str) -> ServiceProcess:
    return ServiceProcess("llmesh.gateway.main", ["--router", models_file["router"], "--models-file",
                                                  models_file["path"], "--auth", "false", "--workers", str(WORKERS),
                                                  *extra], ready_timeout=120)


@pytest.fixture(scope="module")
def gateway(models_file):
    metrics_port, http_port = free_ports(2)
    with start_gateway(models_file, "--metrics-port", str(metrics_port), "--http-port", str(http_port)) as gw:
        gw.metrics_port, gw.http_port = metrics_port, http_port
        yield gw


def workers_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def wait_workers(pid: int, count: int, within_s: float = 60.0) -> list[int]:
    """The supervisor's worker pids once ``count`` run (bounded)."""
    deadline = time.monotonic() + within_s
    while len(kids := workers_of(pid)) != count:
        assert time.monotonic() < deadline, f"{len(kids)} gateway workers, wanted {count}"
        time.sleep(0.1)
    return kids


def served_connections(worker: int, port: int) -> int:
    """Established connections on ``port`` whose socket the process ``worker`` holds."""
    inodes = set()
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as f:
            for line in list(f)[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # ESTABLISHED, server side
                    inodes.add(fields[9])
    held = 0
    for fd in os.listdir(f"/proc/{worker}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{worker}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                held += 1
    return held


def own_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (channels to one address share one by default)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def generate(channel: grpc.Channel, max_tokens: int = 3) -> list[int]:
    req = inference_pb2.GenerateRequest(model=MODEL, token_ids=router_pb2.TokenIds(ids=PROMPT),
                                        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                           ignore_eos=True))
    return [t for m in inference_pb2_grpc.InferenceStub(channel).Generate(req, timeout=60) for t in m.token_ids]


def engine_output(models_file, max_tokens: int = 3) -> tuple[list[int], str]:
    req = engine_pb2.EngineGenerateRequest(request_id=f"ref-{time.monotonic_ns()}", prompt_token_ids=PROMPT,
                                           sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                              ignore_eos=True))
    with grpc.insecure_channel(models_file["engine"]) as ch:
        msgs = list(engine_pb2_grpc.EngineStub(ch).Generate(req, timeout=60))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)


def requests_total(gw) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "llmesh_gateway_requests"
               for s in fam.samples if s.name == "llmesh_gateway_requests_total" and s.labels.get("rpc") == "Generate")


def restarts_total(gw) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "llmesh_gateway_worker_restarts_total")


def test_connections_spread_over_workers_and_every_worker_answers(gateway, models_file):
    workers = wait_workers(gateway.pid, WORKERS)
    port = int(gateway.address.rsplit(":", 1)[1])
    want, _ = engine_output(models_file)
    before = requests_total(gateway)
    channels = [own_channel(gateway.address) for _ in range(CONNECTIONS)]
    try:
        for ch in channels:
            assert generate(ch) == want
        served = {w: served_connections(w, port) for w in workers}
        assert sum(served.values()) == CONNECTIONS, served
        assert all(n > 0 for n in served.values()), f"one worker got every connection: {served}"
    finally:
        for ch in channels:
            ch.close()
    # Counters of every worker, summed by the supervisor's /metrics.
    assert requests_total(gateway) == before + CONNECTIONS


def test_http_front_is_served_by_the_workers(gateway, models_file):
    _, want = engine_output(models_file, 4)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key="none", max_retries=0,
                           timeout=60)
    for _ in range(4):
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
        assert out.choices[0].text == want


def test_a_killed_worker_is_started_again(gateway, models_file):
    workers = wait_workers(gateway.pid, WORKERS)
    restarts = restarts_total(gateway)
    want, _ = engine_output(models_file)
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    # Until the supervisor has reaped it, so that every thread has exited and its listening
    # sockets are closed: a connection the kernel queues on them meanwhile is reset (a zombie
    # main thread alone does not prove that).
    while workers[0] in workers_of(gateway.pid):
        assert time.monotonic() < deadline, "the killed worker was not reaped"
        time.sleep(0.02)
    # The survivor takes every new connection while the other is down.
    for _ in range(4):
        with own_channel(gateway.address) as ch:
            assert generate(ch) == want
    deadline = time.monotonic() + 60
    while True:
        kids = workers_of(gateway.pid)
        if len(kids) == WORKERS and workers[0] not in kids and restarts_total(gateway) == restarts + 1:
            break
        assert time.monotonic() < deadline, f"worker not started again: {kids}\n{gateway.log_tail()}"
        time.sleep(0.1)
    assert gateway.alive()


def test_sigterm_stops_every_worker(models_file):
    # Several rounds: the supervisor once hung in its own SIGTERM handler (an Event set
    # while its main thread held that Event's lock), so one round proves little.
    for _ in range(3):
        with start_gateway(models_file) as gw:
            workers = wait_workers(gw.pid, WORKERS)
            os.kill(gw.pid, signal.SIGTERM)  # the supervisor alone, as an orchestrator does
            try:
                code = gw._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the supervisor did not exit within 30 s of SIGTERM\n{gw.log_tail()}")
            assert code == 0, gw.log_tail()
            assert not any(alive(w) for w in workers)


def test_workers_die_with_a_killed_supervisor(models_file):
    with start_gateway(models_file) as gw:
        workers = wait_workers(gw.pid, WORKERS)
        os.kill(gw.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(alive(w) for w in workers):
            assert time.monotonic() < deadline, "gateway workers outlived their supervisor"
            time.sleep(0.1)


def test_a_taken_port_is_refused(models_file):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            start_gateway(models_file, "--port", str(port))


def test_llmesh_up_passes_gateway_workers_when_asked_and_several_on_a_gpu(tmp_path, monkeypatch):
    from llmesh.launcher import DEMO_MODELS, UpConfig, gpu_gateway_workers, plan_mesh
    from llmesh.models_file import parse_models

    def gateway_env(cfg: UpConfig) -> dict[str, str]:
        return {p.name: p for p in plan_mesh(cfg, models, tmp_path)[0]}["gateway"].env

    monkeypatch.delenv("LLMESH_GATEWAY_WORKERS", raising=False)
    models = parse_models(DEMO_MODELS, "demo")
    assert gateway_env(UpConfig(gateway_workers=4))["LLMESH_GATEWAY_WORKERS"] == "4"
    assert gateway_env(UpConfig(gateway_workers=1, device="cuda"))["LLMESH_GATEWAY_WORKERS"] == "1"
    # Left out on the CPU: the gateway's own default (one process) holds.
    assert "LLMESH_GATEWAY_WORKERS" not in gateway_env(UpConfig())
    assert "LLMESH_GATEWAY_WORKERS" not in gateway_env(UpConfig(device="cpu"))
    # On a GPU one process cannot keep up with the engine: several, a quarter of the cores at most.
    assert gateway_env(UpConfig(device="cuda"))["LLMESH_GATEWAY_WORKERS"] == str(gpu_gateway_workers())
    assert [gpu_gateway_workers(n) for n in (2, 4, 8, 12, 16, 64)] == [1, 1, 2, 3, 4, 4]
    # The operator's environment is the gateway's to read, on a GPU too.
    monkeypatch.setenv("LLMESH_GATEWAY_WORKERS", "2")
    assert "LLMESH_GATEWAY_WORKERS" not in gateway_env(UpConfig(device="cuda"))


def test_worker_index_names_the_worker_that_runs_once_per_gateway_work(monkeypatch):
    from llmesh.gateway.workers import WORKER_ENV, is_worker, worker_index

    monkeypatch.delenv(WORKER_ENV, raising=False)
    assert not is_worker() and worker_index() == 0
    monkeypatch.setenv(WORKER_ENV, "3/4")
    assert is_worker() and worker_index() == 3


def test_the_supervisor_holds_every_port_and_picks_a_grpc_port_apart_from_the_given_ones(tmp_path):
    from llmesh.gateway.config import GatewayConfig
    from llmesh.gateway.workers import Supervisor

    http_port, health_port = free_ports(2)
    config = GatewayConfig(host="127.0.0.1", port=0, http_port=http_port, health_port=health_port,
                           models_file=str(tmp_path / "models.yaml"), auth=False, workers=2)
    supervisor = Supervisor(config, [])
    try:
        supervisor._reserve()
        ports = (supervisor.port, supervisor.http_port, supervisor.health_port)
        assert ports[1:] == (http_port, health_port) and supervisor.port not in ports[1:]
        assert sorted(s.getsockname()[1] for s in supervisor._sockets) == sorted(ports)
        for port in ports:  # held: no other program can take one between two starts of a worker
            with socket.socket() as other, pytest.raises(OSError):
                other.bind(("127.0.0.1", port))
    finally:
        for s in supervisor._sockets:
            s.close()
        shutil.rmtree(supervisor._dir)


@pytest.mark.parametrize("ports", [{"port": 7000, "http_port": 7000}, {"http_port": 7001, "health_port": 7001},
                                   {"port": 7002, "metrics_port": 7002}])
def test_one_port_given_twice_is_refused_by_name(tmp_path, ports):
    from llmesh.gateway.config import GatewayConfig

    with pytest.raises(ValueError, match="the gateway's ports must differ"):
        GatewayConfig(models_file=str(tmp_path / "models.yaml"), auth=False, **ports)

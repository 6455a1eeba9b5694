"""Shared by the robustness tests (fuzzing, cancel storms): a whole mesh as real processes
(Redis, prefix-cache index, one engine, router, gateway with its HTTP front) and the
engine-side checks every robustness test ends with (no KV block held, nothing running).

Every wait here is bounded; a helper that gives up says what it was waiting for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.mesh_helpers import RedisServer, ServiceProcess, free_port, start_engine, start_prefix_index

MODEL = "tiny"
WINDOW = 256
PROBE_PROMPT = [5, 17, 99, 23, 42, 7, 300, 12, 64, 128, 256, 33, 91, 18, 44, 71, 3, 250]
"""A fixed prompt whose greedy continuation is compared before and after each storm."""


@dataclasses.dataclass
class RobustMesh:
    redis: RedisServer
    index: ServiceProcess
    engine: ServiceProcess
    router: ServiceProcess
    gateway: ServiceProcess
    http_port: int

    def grpc_services(self) -> dict[str, ServiceProcess]:
        """Full service name → the process serving it."""
        return {"llmesh.v1.Inference": self.gateway, "llmesh.v1.Router": self.router,
                "llmesh.v1.Engine": self.engine, "llmesh.v1.PrefixIndex": self.index}

    def processes(self) -> dict[str, ServiceProcess]:
        return {"gateway": self.gateway, "router": self.router, "engine": self.engine, "index": self.index}


@contextlib.contextmanager
def robust_mesh(model_dir: str, tmp_dir, *engine_args: str) -> Iterator[RobustMesh]:
    """Every llmesh service as its own process, wired together, auth off; stops them all."""
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        engine = stack.enter_context(start_engine(
            model_dir, "--served-model-name", MODEL, "--num-kv-blocks", "64", "--max-model-len", str(WINDOW),
            *engine_args, wait=False))
        index = stack.enter_context(start_prefix_index(redis_server.url))
        engine.wait_ready()
        models_file = tmp_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": model_dir, "size_class": "small", "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", [
            "--models-file", str(models_file), "--prefix-index", index.address], wait=False))
        http_port = free_port()
        router.wait_ready()
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--auth", "false",
            "--redis-url", redis_server.url, "--http-port", str(http_port)]))
        yield RobustMesh(redis_server, index, engine, router, gateway, http_port)


def engine_stub(address: str) -> engine_pb2_grpc.EngineStub:
    return engine_pb2_grpc.EngineStub(grpc.insecure_channel(address))


def wait_engine_idle(address: str, timeout: float = 20.0) -> engine_pb2.LoadResponse:
    """Poll Load until no request waits or runs and no KV block is held; raise with the last
    Load if that does not happen within ``timeout`` (a leak or a stuck request)."""
    stub = engine_stub(address)
    deadline = time.monotonic() + timeout
    while True:
        load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
        if load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"engine {address} not idle {timeout}s after the traffic stopped: "
                                 f"{load.num_waiting} waiting, {load.num_running} running, "
                                 f"{load.kv_blocks_used}/{load.kv_blocks_total} KV blocks held")
        time.sleep(0.05)


def greedy_probe(address: str, max_tokens: int = 12) -> list[int]:
    """The engine's greedy tokens for PROBE_PROMPT (compared before and after a storm)."""
    req = engine_pb2.EngineGenerateRequest(
        prompt_token_ids=PROBE_PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [t for msg in engine_stub(address).Generate(req, timeout=60) for t in msg.token_ids]


def assert_serving(address: str, what: str) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING, f"{what} at {address} reports {status}"

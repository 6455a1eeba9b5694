"""A whole mesh with service credentials on, as real processes: Redis, the prefix-cache
index, one tiny engine, the router and gateways, each given the same mesh secret file;
API keys for two tenants (and a second key of the first) in a keys file."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import grpc
import yaml

from llmesh.gateway.keys import new_key, save_keys_file
from llmesh.mesh_secret import METADATA_KEY, read_secret, write_secret
from llmesh.v1 import router_pb2, router_pb2_grpc
from tests.mesh_helpers import RedisServer, ServiceProcess, free_ports, start_engine

MODEL = "tiny"
WINDOW = 256
BLOCK_SIZE = 16


@dataclasses.dataclass
class SecureMesh:
    secret_file: Path
    redis: RedisServer
    index: ServiceProcess
    engine: ServiceProcess
    router: ServiceProcess
    gateways: dict[str, ServiceProcess]
    """By routing mode: 'direct' and 'proxy'."""
    keys: dict[str, str]
    """API keys by name: 'a' (tenant team-a), 'a2' (team-a, a second key), 'b' (team-b)."""
    key_ids: dict[str, str]

    @property
    def secret(self) -> str:
        return read_secret(self.secret_file).decode()

    def credential(self) -> list[tuple[str, str]]:
        return [(METADATA_KEY, self.secret)]

    def usage_lines(self, mode: str) -> list[dict]:
        lines = []
        for raw in self.gateways[mode].log_tail(400_000).splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(raw)
                if doc.get("msg") == "usage":
                    lines.append(doc)
        return lines

    def usage_of(self, mode: str, key_id: str, request_id: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = [u for u in self.usage_lines(mode) if u["key_id"] == key_id and u["request_id"] == request_id]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, f"no usage line for {key_id}/{request_id}"
            time.sleep(0.05)


def secret_env(service: str, secret_file: Path) -> dict[str, str]:
    return {f"LLMESH_{service.upper().replace('-', '_')}_INTERNAL_SECRET_FILE": str(secret_file)}


@contextlib.contextmanager
def secure_mesh(tiny_llama: str, run_dir: Path, *, step_delay_s: float = 0.0,
                modes: tuple[str, ...] = ("direct",)):
    secret_file = write_secret(run_dir / "mesh.secret")
    records, keys = {}, {}
    for name, tenant in (("a", "team-a"), ("a2", "team-a"), ("b", "team-b")):
        keys[name], record = new_key(tenant)
        records[name] = record
    keys_file = run_dir / "keys.json"
    save_keys_file(keys_file, {r.key_id: r for r in records.values()})
    ports = dict(zip(("index", "engine", "router"), free_ports(3)))
    index_at, engine_at, router_at = (f"127.0.0.1:{ports[n]}" for n in ("index", "engine", "router"))
    models_file = run_dir / "models.yaml"
    models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
        "name": MODEL, "path": tiny_llama, "size_class": "small", "replicas": 1, "addresses": [engine_at]}]}))
    engine_args = ["--port", str(ports["engine"]), "--served-model-name", MODEL, "--num-kv-blocks", "128",
                   "--max-model-len", str(WINDOW), "--prefix-index", index_at, "--instance-id", "tiny-0"]
    if step_delay_s:
        engine_args += ["--fault-step-delay-s", str(step_delay_s)]
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        # Every address is known up front, so all services start at once (each retries its peers).
        index = stack.enter_context(ServiceProcess(
            "llmesh.prefix_cache.main", ["--port", str(ports["index"]), "--redis-url", redis.url],
            env=secret_env("prefix-cache", secret_file), wait=False))
        engine = stack.enter_context(start_engine(tiny_llama, *engine_args, env=secret_env("engine", secret_file),
                                                  wait=False))
        router = stack.enter_context(ServiceProcess(
            "llmesh.router.main", ["--port", str(ports["router"]), "--models-file", str(models_file),
                                   "--prefix-index", index_at], env=secret_env("router", secret_file), wait=False))
        gateways = {mode: stack.enter_context(ServiceProcess(
            "llmesh.gateway.main", ["--router", router_at, "--models-file", str(models_file),
                                    "--keys-file", str(keys_file), "--routing", mode],
            env=secret_env("gateway", secret_file), wait=False)) for mode in modes}
        for proc in (index, engine, router, *gateways.values()):
            proc.wait_ready()
        mesh = SecureMesh(secret_file, redis, index, engine, router, gateways, keys,
                          {n: r.key_id for n, r in records.items()})
        _wait_routable(mesh)
        yield mesh


def _wait_routable(mesh: SecureMesh, timeout: float = 60) -> None:
    """Until the router counts the engine healthy (it may have started first)."""
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(mesh.router.address))
    deadline = time.monotonic() + timeout
    while True:
        cards = stub.ListModels(router_pb2.RouterListModelsRequest(), metadata=mesh.credential(), timeout=5)
        if any(c.name == MODEL and c.healthy_replicas for c in cards.models):
            return
        assert time.monotonic() < deadline, f"the router never saw the engine healthy: {cards}"
        time.sleep(0.1)

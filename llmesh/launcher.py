"""``llmesh up``: the whole mesh as local processes, started by one command.

Redis (a real ``redis-server``), the prefix-cache index, one engine process per model
replica, the router and the gateway, in that order; each is waited for (ready line,
then grpc.health.v1 SERVING) before the next starts. Services are configured through
the same ``LLMESH_<SERVICE>_<FIELD>`` variables that compose.yaml sets, so both start
the same topology with the same settings (a test compares them). Ctrl-C (or SIGTERM)
stops everything in reverse order; the services also arm PR_SET_PDEATHSIG themselves,
so they get SIGTERM if the launcher dies, and no process is left behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from llmesh.config import env_prefix
from llmesh.mesh_secret import MESH_SECRET_FILE, write_secret
from llmesh.models_file import ModelsFile, ModelSpec, load_models_file, parse_models

READY_PREFIX = "LLMESH_READY "
DEMO_MODELS = {"default_model": "smollm2-135m",
               "models": [{"name": "smollm2-135m", "path": "demo", "size_class": "small", "replicas": 1,
                           "engine": {"dtype": "float32", "max_num_seqs": 32},
                           # The model card's suggested sampling; its GGUF carries no generation_config.
                           "generation": {"temperature": 0.2, "top_p": 0.9}}]}


@dataclasses.dataclass
class UpConfig:
    models_file: str | None = None
    """YAML models file; None serves the demo model (SmolLM2-135M-Instruct) as ``smollm2-135m``."""
    host: str = "127.0.0.1"
    gateway_port: int = 50051
    http_port: int = 8000
    """The gateway's OpenAI-compatible HTTP front (0 turns it off)."""
    router_port: int = 50052
    prefix_cache_port: int = 50053
    engine_base_port: int = 50061
    redis_port: int = 6379
    metrics_base_port: int = 9400
    """gateway +0, router +1, prefix-cache +2, engines +10 onwards (0 disables metrics)."""
    device: str = "auto"
    run_dir: str | None = None
    """Logs and the resolved models file; a temporary folder by default."""
    auth: bool = True
    """API keys on; the local admin key (``llmesh.keys_cli.ensure_local_key``) is registered in Redis."""
    redis_server: str = dataclasses.field(default_factory=lambda: os.environ.get("LLMESH_REDIS_SERVER")
                                          or "redis-server")
    """The redis-server program: a name on PATH or a path (``$LLMESH_REDIS_SERVER``; machines
    without a system Redis run one unpacked elsewhere, see bench/README.md)."""


@dataclasses.dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    """The LLMESH_* settings of this service (also what compose.yaml sets)."""
    address: str = ""
    grpc: bool = True


def engine_env(spec: ModelSpec, replica: int, address: str, cfg: UpConfig, metrics_port: int) -> dict[str, str]:
    host, port = address.rsplit(":", 1)
    env = {
        "LLMESH_ENGINE_MODEL": spec.path,
        "LLMESH_ENGINE_SERVED_MODEL_NAME": spec.name,
        "LLMESH_ENGINE_HOST": host,
        "LLMESH_ENGINE_PORT": port,
        "LLMESH_ENGINE_DEVICE": cfg.device,
        "LLMESH_ENGINE_PREFIX_INDEX": f"{cfg.host}:{cfg.prefix_cache_port}",
        "LLMESH_ENGINE_INSTANCE_ID": f"{spec.name}-{replica}",
        "LLMESH_ENGINE_ADVERTISE_ADDRESS": address,
        "LLMESH_ENGINE_METRICS_PORT": str(metrics_port),
    }
    for key, value in spec.engine.items():
        env[f"LLMESH_ENGINE_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def plan_mesh(cfg: UpConfig, models: ModelsFile, run_dir: Path) -> tuple[list[ProcessSpec], ModelsFile]:
    """Every process of the mesh with its settings, in start order; and the models file
    with each replica's address filled in (what router and gateway read)."""
    mp = cfg.metrics_base_port
    metrics = (lambda off: str(mp + off)) if mp else (lambda off: "0")
    redis_url = f"redis://{cfg.host}:{cfg.redis_port}/0"
    procs = [ProcessSpec("redis", [cfg.redis_server, "--bind", cfg.host, "--port", str(cfg.redis_port),
                                   "--save", "", "--appendonly", "no", "--dir", str(run_dir)],
                         env={}, address=f"{cfg.host}:{cfg.redis_port}", grpc=False),
             ProcessSpec("prefix-cache", [sys.executable, "-m", "llmesh.prefix_cache.main"], env={
                 "LLMESH_PREFIX_CACHE_HOST": cfg.host, "LLMESH_PREFIX_CACHE_PORT": str(cfg.prefix_cache_port),
                 "LLMESH_PREFIX_CACHE_REDIS_URL": redis_url, "LLMESH_PREFIX_CACHE_METRICS_PORT": metrics(2)},
                 address=f"{cfg.host}:{cfg.prefix_cache_port}")]
    resolved = []
    port, n = cfg.engine_base_port, 0
    for spec in models.models:
        addresses = []
        for replica in range(spec.replicas):
            address = f"{cfg.host}:{port}"
            addresses.append(address)
            procs.append(ProcessSpec(f"engine-{spec.name}-{replica}",
                                     [sys.executable, "-m", "llmesh.engine.service.main"],
                                     env=engine_env(spec, replica, address, cfg, int(metrics(10 + n))),
                                     address=address))
            port, n = port + 1, n + 1
        resolved.append(dataclasses.replace(spec, addresses=addresses))
    resolved_models = ModelsFile(resolved, models.default_model)
    models_path = str(run_dir / "models.yaml")
    procs.append(ProcessSpec("router", [sys.executable, "-m", "llmesh.router.main"], env={
        "LLMESH_ROUTER_HOST": cfg.host, "LLMESH_ROUTER_PORT": str(cfg.router_port),
        "LLMESH_ROUTER_MODELS_FILE": models_path,
        "LLMESH_ROUTER_PREFIX_INDEX": f"{cfg.host}:{cfg.prefix_cache_port}",
        "LLMESH_ROUTER_METRICS_PORT": metrics(1)}, address=f"{cfg.host}:{cfg.router_port}"))
    procs.append(ProcessSpec("gateway", [sys.executable, "-m", "llmesh.gateway.main"], env={
        "LLMESH_GATEWAY_HOST": cfg.host, "LLMESH_GATEWAY_PORT": str(cfg.gateway_port),
        "LLMESH_GATEWAY_HTTP_PORT": str(cfg.http_port),
        "LLMESH_GATEWAY_AUTH": "true" if cfg.auth else "false", "LLMESH_GATEWAY_REDIS_URL": redis_url,
        "LLMESH_GATEWAY_ROUTER": f"{cfg.host}:{cfg.router_port}",
        "LLMESH_GATEWAY_MODELS_FILE": models_path,
        "LLMESH_GATEWAY_METRICS_PORT": metrics(0)}, address=f"{cfg.host}:{cfg.gateway_port}"))
    # Every service reads the mesh secret (written by Mesh at each start) from this file:
    # the path travels, the secret never appears on a command line.
    for p in procs:
        if p.grpc:
            service = "engine" if p.name.startswith("engine-") else p.name
            p.env[env_prefix(service) + "INTERNAL_SECRET_FILE"] = str(run_dir / MESH_SECRET_FILE)
    return procs, resolved_models


class Mesh:
    """The running processes; a context manager that always stops them."""

    def __init__(self, cfg: UpConfig, *, quiet: bool = False) -> None:
        self.cfg, self.quiet = cfg, quiet
        self.run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix="llmesh-up-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        models = load_models_file(cfg.models_file) if cfg.models_file else parse_models(DEMO_MODELS, "demo")
        write_secret(self.run_dir / MESH_SECRET_FILE)
        self.plan, self.models = plan_mesh(cfg, models, self.run_dir)
        self.models.dump(self.run_dir / "models.yaml")
        self.procs: dict[str, subprocess.Popen] = {}
        self.api_key: str | None = None
        self._ready: dict[str, threading.Event] = {}

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def start(self, timeout: float = 300) -> None:
        if shutil.which(self.cfg.redis_server) is None:
            raise RuntimeError(f"redis: {self.cfg.redis_server!r} is not an executable on PATH; install "
                               "redis-server (Debian/Ubuntu: sudo apt-get install -y redis-server) or "
                               "point --redis-server / LLMESH_REDIS_SERVER at one")
        engines = [p for p in self.plan if p.name.startswith("engine-")]
        for spec in self.plan:
            if spec in engines[1:]:
                continue  # engines start together, with the first one
            group = engines if spec is engines[0] else [spec]
            for s in group:
                self._spawn(s)
            for s in group:
                self._wait_ready(s, timeout)

    def _spawn(self, spec: ProcessSpec) -> None:
        self._say(f"starting {spec.name} on {spec.address}")
        log = open(self.run_dir / f"{spec.name}.log", "wb")
        # No preexec_fn: forking with live gRPC channels in this process and running Python
        # in the child before exec crashes the child (gRPC's poller, grpc/grpc#43055). The
        # services arm their own parent-death signal instead (LLMESH_DIE_WITH_PARENT).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMESH_DIE_WITH_PARENT": "1", **spec.env}
        proc = subprocess.Popen(spec.argv, env=env, stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL)
        self.procs[spec.name] = proc
        self._ready[spec.name] = threading.Event()
        threading.Thread(target=_watch_stdout, args=(proc, self._ready[spec.name]), daemon=True).start()

    def _wait_ready(self, spec: ProcessSpec, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not spec.grpc:
            import redis

            client = redis.Redis.from_url(f"redis://{spec.address}/0", socket_timeout=0.5)
            while True:
                try:
                    if client.ping():
                        if self.cfg.auth:
                            self._register_admin_key(client)
                        return
                except redis.RedisError:
                    pass  # not accepting connections yet: poll again until the deadline
                self._check_alive(spec, deadline)
                time.sleep(0.05)
        while not self._ready[spec.name].wait(0.05):
            self._check_alive(spec, deadline)
        from llmesh.health import wait_serving

        wait_serving(spec.address, timeout=max(1.0, deadline - time.monotonic()))
        self._say(f"  {spec.name} is serving")

    def _register_admin_key(self, client) -> None:
        """Create (first run) and register the local admin key; the CLI finds it in its file."""
        from llmesh.gateway.keys import redis_put
        from llmesh.keys_cli import ensure_local_key

        key, record = ensure_local_key()
        redis_put(client, record)
        self.api_key = key
        self._say(f"API key (admin): {record.key_id} in {os.environ.get('XDG_CONFIG_HOME') or '~/.config'}"
                  "/llmesh/api_key")

    def _check_alive(self, spec: ProcessSpec, deadline: float) -> None:
        proc = self.procs[spec.name]
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (self.run_dir / f"{spec.name}.log").read_bytes()[-3000:].decode("utf-8", "replace")
            why = f"exited with {proc.returncode}" if proc.poll() is not None else "was not ready in time"
            raise RuntimeError(f"{spec.name} {why}; the end of its log ({self.run_dir}/{spec.name}.log):\n{tail}")

    def failed(self) -> str | None:
        """The name of a process that exited on its own, if any."""
        return next((n for n, p in self.procs.items() if p.poll() is not None), None)

    def stop(self, timeout: float = 15) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def endpoints(self) -> list[tuple[str, str]]:
        return [(p.name, p.address) for p in self.plan]


def _watch_stdout(proc: subprocess.Popen, ready: threading.Event) -> None:
    """Set ``ready`` at the child's ready line; keep reading so it never blocks on a full pipe."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        if not ready.is_set() and raw.startswith(READY_PREFIX.encode()):
            ready.set()


def up(cfg: UpConfig, prompt: str | None = None) -> int:
    """Run the mesh in the foreground until Ctrl-C; returns the exit code. With ``prompt``,
    stream an answer to it through the gateway once everything is serving."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Mesh(cfg) as mesh:
        try:
            mesh.start()
        except (RuntimeError, TimeoutError) as e:
            print(f"llmesh up failed: {e}", file=sys.stderr)
            return 1
        print("\nllmesh is up:")
        for name, address in mesh.endpoints():
            print(f"  {name:<28} {address}")
        if cfg.http_port:
            print(f"  {'OpenAI-compatible HTTP':<28} http://{cfg.host}:{cfg.http_port}/v1")
        print(f"\n  models: {', '.join(mesh.models.names)} (default {mesh.models.default_model})")
        print(f"  logs:   {mesh.run_dir}")
        print('\n  try:    llmesh generate "What is the capital of France?"   (Ctrl-C stops the mesh)\n',
              flush=True)
        if prompt:
            from llmesh.cli_client import stream_chat_once

            if mesh.api_key:
                os.environ["LLMESH_API_KEY"] = mesh.api_key
            stream_chat_once(f"{cfg.host}:{cfg.gateway_port}", prompt)
        while not stop.wait(0.5):
            dead = mesh.failed()
            if dead:
                print(f"{dead} exited unexpectedly; stopping the mesh (see {mesh.run_dir}/{dead}.log)",
                      file=sys.stderr)
                return 1
        print("stopping ...", file=sys.stderr)
    return 0

"""``llmesh up``: the whole mesh as local processes, started by one command, kept running.

Redis (a real ``redis-server``), the prefix-cache index, one engine process per model
replica, the router and the gateway, in that order; each is waited for (ready line,
then grpc.health.v1 SERVING) before the next starts. Services are configured through
the same ``LLMESH_<SERVICE>_<FIELD>`` variables that compose.yaml sets, so both start
the same topology with the same settings (a test compares them).

Before anything starts, every port the mesh needs is checked (a taken one is an error
naming the port and its service), and a Redis left behind by a SIGKILLed launcher is
stopped (``llmesh.local_redis``). Redis persists to an append-only file in the data
folder and has a password. While the mesh runs, a child that exits is restarted with
exponential backoff (``llmesh.supervisor``); one that keeps failing right after starting
makes the launcher give up and stop the mesh. Ctrl-C (or SIGTERM) stops everything in
reverse order; every child gets SIGTERM if the launcher dies (``llmesh.parent_death``).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmesh.local_redis import LocalRedis, default_data_dir
from llmesh.config import env_prefix
from llmesh.mesh_secret import MESH_SECRET_FILE, METADATA_KEY, read_secret, write_secret
from llmesh.models_file import ModelsFile, ModelSpec, load_models_file, parse_models
from llmesh.parent_death import ENV as DIE_WITH_PARENT_ENV
from llmesh.redis_url import with_password
from llmesh.stop_signal import StopFlag
from llmesh.supervisor import Child, RestartPolicy, describe_exit

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
    gateway_workers: int | None = None
    """Gateway processes on its ports (docs/operations.md "Gateway workers"). None: the
    gateway's own default (``$LLMESH_GATEWAY_WORKERS``, else 1), except on a GPU, where
    ``gpu_gateway_workers()`` processes keep up with the engine."""
    router_port: int = 50052
    prefix_cache_port: int = 50053
    engine_base_port: int = 50061
    redis_port: int = 6379
    metrics_base_port: int = 9400
    """gateway +0, router +1, prefix-cache +2, engines +10 onwards (0 disables metrics)."""
    device: str = "auto"
    run_dir: str | None = None
    """Logs and the resolved models file; a temporary folder by default."""
    data_dir: str | None = None
    """What must outlive the mesh: Redis's append-only file and password (``llmesh.local_redis``);
    None is ``$LLMESH_DATA_DIR``, else ``$XDG_DATA_HOME/llmesh`` or ``~/.local/share/llmesh``."""
    auth: bool = True
    """API keys on; the local admin key (``llmesh.keys_cli.ensure_local_key``) is registered in Redis."""
    redis_server: str = dataclasses.field(default_factory=lambda: os.environ.get("LLMESH_REDIS_SERVER")
                                          or "redis-server")
    """The redis-server program: a name on PATH or a path (``$LLMESH_REDIS_SERVER``; machines
    without a system Redis run one unpacked elsewhere, see bench/README.md)."""
    restart: RestartPolicy = dataclasses.field(default_factory=RestartPolicy)
    """How crashed children are restarted (backoff, when to give up)."""


@dataclasses.dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    """The LLMESH_* settings of this service (also what compose.yaml sets)."""
    address: str = ""
    grpc: bool = True
    """An llmesh service: prints a ready line, answers grpc.health.v1 and arms its own
    parent-death signal. Redis is the one that does none of these."""
    metrics_port: int = 0
    extra_ports: dict[str, int] = dataclasses.field(default_factory=dict)
    """Other ports it listens on, by what they are (the gateway's HTTP front)."""

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


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


METRICS_OFFSETS = {"gateway": 0, "router": 1, "prefix-cache": 2}
"""Each service's metrics port, as an offset from ``metrics_base_port``."""
ENGINE_METRICS_OFFSET = 10
"""The n-th engine process (in plan order) serves metrics at base + ENGINE_METRICS_OFFSET + n."""


GPU_GATEWAY_WORKERS = 4
"""On the H200 (16 cores; bench/README.md "serve_gpu.py", the run at a0ee582) one gateway
process was the limit at 256 streams (0.979 of the engine's own throughput, 0.85-1.27 cores
busy) and added 247 ms to the first token at 64 req/s; four reached 0.996 and 8.6 ms."""


def gpu_gateway_workers(cpus: int | None = None) -> int:
    """Gateway workers of a GPU mesh left to its default: GPU_GATEWAY_WORKERS, fewer on a host
    with under 4 cores a worker (the engine's own processes need two or more)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(GPU_GATEWAY_WORKERS, cpus // 4))


def gateway_workers(cfg: UpConfig) -> int | None:
    """The workers ``llmesh up`` asks of its gateway; None leaves the gateway's own default."""
    if cfg.gateway_workers is not None:
        return cfg.gateway_workers
    if cfg.device.startswith("cuda") and not os.environ.get("LLMESH_GATEWAY_WORKERS"):
        return gpu_gateway_workers()
    return None


def plan_mesh(cfg: UpConfig, models: ModelsFile, run_dir: Path,
              redis_password: str = "") -> tuple[list[ProcessSpec], ModelsFile]:
    """Every process of the mesh with its settings, in start order; and the models file
    with each replica's address filled in (what router and gateway read). Writes nothing."""
    mp = cfg.metrics_base_port
    metrics = (lambda off: mp + off) if mp else (lambda off: 0)
    gateway_metrics, router_metrics, cache_metrics = (metrics(METRICS_OFFSETS[name])
                                                      for name in ("gateway", "router", "prefix-cache"))
    redis_url = with_password(cfg.host, cfg.redis_port, redis_password)
    store = LocalRedis(cfg.data_dir or default_data_dir())
    procs = [ProcessSpec("redis", store.argv(cfg.redis_server, cfg.host, cfg.redis_port),
                         env={}, address=f"{cfg.host}:{cfg.redis_port}", grpc=False),
             ProcessSpec("prefix-cache", [sys.executable, "-m", "llmesh.prefix_cache.main"], env={
                 "LLMESH_PREFIX_CACHE_HOST": cfg.host, "LLMESH_PREFIX_CACHE_PORT": str(cfg.prefix_cache_port),
                 "LLMESH_PREFIX_CACHE_REDIS_URL": redis_url, "LLMESH_PREFIX_CACHE_METRICS_PORT": str(cache_metrics)},
                 address=f"{cfg.host}:{cfg.prefix_cache_port}", metrics_port=cache_metrics)]
    resolved = []
    port, n = cfg.engine_base_port, 0
    for spec in models.models:
        addresses = []
        for replica in range(spec.replicas):
            address = f"{cfg.host}:{port}"
            addresses.append(address)
            procs.append(ProcessSpec(f"engine-{spec.name}-{replica}",
                                     [sys.executable, "-m", "llmesh.engine.service.main"],
                                     env=engine_env(spec, replica, address, cfg, metrics(ENGINE_METRICS_OFFSET + n)),
                                     address=address, metrics_port=metrics(ENGINE_METRICS_OFFSET + n)))
            port, n = port + 1, n + 1
        # `llmesh up` starts the engines itself: its router knows their addresses, not DNS names.
        resolved.append(dataclasses.replace(spec, addresses=addresses, discovery=""))
    resolved_models = ModelsFile(resolved, models.default_model)
    models_path = str(run_dir / "models.yaml")
    procs.append(ProcessSpec("router", [sys.executable, "-m", "llmesh.router.main"], env={
        "LLMESH_ROUTER_HOST": cfg.host, "LLMESH_ROUTER_PORT": str(cfg.router_port),
        "LLMESH_ROUTER_MODELS_FILE": models_path,
        "LLMESH_ROUTER_PREFIX_INDEX": f"{cfg.host}:{cfg.prefix_cache_port}",
        "LLMESH_ROUTER_METRICS_PORT": str(router_metrics)}, address=f"{cfg.host}:{cfg.router_port}",
        metrics_port=router_metrics))
    procs.append(ProcessSpec("gateway", [sys.executable, "-m", "llmesh.gateway.main"], env={
        "LLMESH_GATEWAY_HOST": cfg.host, "LLMESH_GATEWAY_PORT": str(cfg.gateway_port),
        "LLMESH_GATEWAY_HTTP_PORT": str(cfg.http_port),
        "LLMESH_GATEWAY_AUTH": "true" if cfg.auth else "false", "LLMESH_GATEWAY_REDIS_URL": redis_url,
        "LLMESH_GATEWAY_ROUTER": f"{cfg.host}:{cfg.router_port}",
        "LLMESH_GATEWAY_MODELS_FILE": models_path,
        "LLMESH_GATEWAY_METRICS_PORT": str(gateway_metrics)}, address=f"{cfg.host}:{cfg.gateway_port}",
        metrics_port=gateway_metrics, extra_ports={"HTTP": cfg.http_port} if cfg.http_port else {}))
    workers = gateway_workers(cfg)
    if workers is not None:
        procs[-1].env["LLMESH_GATEWAY_WORKERS"] = str(workers)
    # Every service reads the mesh secret (written by Mesh at each start) from this file:
    # the path travels, the secret never appears on a command line.
    for p in procs:
        if p.grpc:
            service = "engine" if p.name.startswith("engine-") else p.name
            p.env[env_prefix(service) + "INTERNAL_SECRET_FILE"] = str(run_dir / MESH_SECRET_FILE)
    return procs, resolved_models


def planned_ports(plan: list[ProcessSpec]) -> list[tuple[int, str]]:
    """(port, what listens there) for every port the mesh will listen on."""
    out = []
    for spec in plan:
        out.append((spec.port, spec.name))
        if spec.metrics_port:
            out.append((spec.metrics_port, f"{spec.name} metrics"))
        out += [(port, f"{spec.name} {what}") for what, port in spec.extra_ports.items()]
    return out


def check_ports(host: str, ports: list[tuple[int, str]]) -> None:
    """RuntimeError naming the first port that is planned twice or already taken on ``host``."""
    seen: dict[int, str] = {}
    for port, owner in ports:
        if port in seen:
            raise RuntimeError(f"port {port} is planned for both {seen[port]} and {owner}; "
                               "choose other ports (llmesh up --help)")
        seen[port] = owner
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the servers do: a port whose old connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
                raise RuntimeError(f"port {port} on {host} (for {owner}) {why}; stop what holds it or pick "
                                   "another port (llmesh up --help lists the --*-port flags)") from None


class Mesh:
    """The running processes, supervised; a context manager that always stops them."""

    def __init__(self, cfg: UpConfig, *, quiet: bool = False) -> None:
        self.cfg, self.quiet = cfg, quiet
        self.run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix="llmesh-up-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = LocalRedis(cfg.data_dir or default_data_dir())
        self.redis_password = self.store.password()
        models = load_models_file(cfg.models_file) if cfg.models_file else parse_models(DEMO_MODELS, "demo")
        write_secret(self.run_dir / MESH_SECRET_FILE)
        self.plan, self.models = plan_mesh(cfg, models, self.run_dir, self.redis_password)
        self.models.dump(self.run_dir / "models.yaml")
        self.specs = {p.name: p for p in self.plan}
        self.children: dict[str, Child] = {}
        self.api_key: str | None = None
        self.interrupted = StopFlag()
        """Set (by Ctrl-C) to abandon a start in progress."""

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def mesh_env(self) -> dict[str, str]:
        """Settings every child of this mesh gets (the one place for mesh-wide values)."""
        return {"PYTHONUNBUFFERED": "1", DIE_WITH_PARENT_ENV: "1"}

    def start(self, timeout: float = 300) -> None:
        if shutil.which(self.cfg.redis_server) is None:
            raise RuntimeError(f"redis: {self.cfg.redis_server!r} is not an executable on PATH; install "
                               "redis-server (Debian/Ubuntu: sudo apt-get install -y redis-server) or "
                               "point --redis-server / LLMESH_REDIS_SERVER at one")
        cleaned = self.store.acquire()
        if cleaned:
            self._say(cleaned)
        check_ports(self.cfg.host, planned_ports(self.plan))
        self.store.write_conf(self.redis_password)
        engines = [p for p in self.plan if p.name.startswith("engine-")]
        for spec in self.plan:
            if spec in engines[1:]:
                continue  # engines start together, with the first one
            group = engines if spec is engines[0] else [spec]
            for s in group:
                self._say(f"starting {s.name} on {s.address}")
                self._spawn(s)
            for s in group:
                self._wait_ready(s, timeout)

    def start_extra(self, spec: ProcessSpec, timeout: float = 300) -> None:
        """Start one more process beside the planned ones (a benchmark's second gateway) and
        wait until it serves; ``stop`` stops it with the rest. Its ports are checked first."""
        if spec.name in self.specs:
            raise RuntimeError(f"a process named {spec.name!r} is already part of this mesh")
        check_ports(self.cfg.host, planned_ports([spec]))
        self.plan.append(spec)
        self.specs[spec.name] = spec
        self._spawn(spec)
        self._wait_ready(spec, timeout)

    def _spawn(self, spec: ProcessSpec) -> None:
        child = self.children.get(spec.name)
        if child is None:
            child = self.children[spec.name] = Child(spec.name, self.run_dir / f"{spec.name}.log", self.cfg.restart)
        # No preexec_fn: forking with live gRPC channels in this process and running Python
        # in the child before exec crashes the child (gRPC's poller, grpc/grpc#43055). The
        # services arm their own parent-death signal; Redis gets it from a small exec wrapper.
        argv = spec.argv if spec.grpc else [sys.executable, "-m", "llmesh.parent_death", *spec.argv]
        child.spawn(argv, {**os.environ, **self.mesh_env(), **spec.env}, stdout_has_ready_line=spec.grpc)

    def _redis_client(self, timeout: float = 0.5):
        import redis

        host, port = self.specs["redis"].address.rsplit(":", 1)
        return redis.Redis(host=host, port=int(port), password=self.redis_password or None,
                           socket_timeout=timeout, socket_connect_timeout=timeout)

    def _redis_answers(self) -> bool:
        """PING succeeds; on the way, (re-)register the admin key (idempotent)."""
        import redis

        client = self._redis_client()
        try:
            client.ping()
            if self.cfg.auth:
                self._register_admin_key(client)
            return True
        except redis.RedisError:
            return False  # not accepting connections (yet)
        finally:
            client.close()

    def _wait_ready(self, spec: ProcessSpec, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        child = self.children[spec.name]
        if not spec.grpc:
            while not self._redis_answers():
                self._check_alive(child, deadline)
                time.sleep(0.05)
            self._say(f"  {spec.name} is serving (data in {self.store.redis_dir})")
            return
        while not child.ready.wait(0.05):
            self._check_alive(child, deadline)
        from llmesh.health import wait_serving

        wait_serving(spec.address, timeout=max(1.0, deadline - time.monotonic()))
        self._say(f"  {spec.name} is serving")

    def _register_admin_key(self, client) -> None:
        """Create (first run) and register the local admin key; the CLI finds it in its file."""
        from llmesh.gateway.keys import redis_put
        from llmesh.keys_cli import ensure_local_key

        key, record = ensure_local_key()
        redis_put(client, record)
        if self.api_key is None:
            self._say(f"API key (admin): {record.key_id} in {os.environ.get('XDG_CONFIG_HOME') or '~/.config'}"
                      "/llmesh/api_key")
        self.api_key = key

    def _check_alive(self, child: Child, deadline: float) -> None:
        if self.interrupted.is_set():
            raise RuntimeError(f"interrupted while waiting for {child.name}")
        code = child.exited()
        if code is not None or time.monotonic() > deadline:
            why = describe_exit(code) if code is not None else "was not ready in time"
            raise RuntimeError(f"{child.name} {why}; the end of its log ({child.log_path}):\n{child.log_tail()}")

    def supervise(self) -> str | None:
        """One pass over the children: schedule restarts of those that exited, start those
        whose backoff is over, report those ready again. Returns why it gives up, or None."""
        now = time.monotonic()
        for name, child in self.children.items():
            spec = self.specs[name]
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    child.announce_ready = True
                    self._say(f"restarting {name} (restart {child.tracker.restarts})")
                    self._spawn(spec)
                continue
            code = child.exited()
            if code is not None:
                delay = child.tracker.on_exit(now - child.started_at)
                if delay is None:
                    policy = self.cfg.restart
                    return (f"{name} {describe_exit(code)}; it failed {child.tracker.quick_failures} times in a "
                            f"row within {policy.quick_s:g} s of starting, giving up (see {child.log_path}):\n"
                            f"{child.log_tail()}")
                self._say(f"{name} {describe_exit(code)}; restarting it in {delay:g} s "
                          f"(see {child.log_path})")
                child.restart_at = now + delay
            elif child.announce_ready and (child.ready.is_set() if spec.grpc else self._redis_answers()):
                child.announce_ready = False
                self._say(f"{name} is back (restarted {child.tracker.restarts} time"
                          f"{'s' if child.tracker.restarts != 1 else ''})")
        return None

    def stop(self, timeout: float = 15) -> None:
        running = [c for c in reversed(list(self.children.values())) if c.exited() is None]
        for child in running:
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in running:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        self.children.clear()
        self.store.release()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def failed(self) -> str | None:
        """The name of a process that has exited and is not (yet) restarted, if any."""
        return next((name for name, c in self.children.items() if c.exited() is not None), None)

    def endpoints(self) -> list[tuple[str, str]]:
        return [(p.name, p.address) for p in self.plan]

    def credential(self) -> list[tuple[str, str]]:
        """gRPC metadata that lets a tool of the operator's call this mesh's internal
        services (engine Load, Info, Abort...) like a service does."""
        return [(METADATA_KEY, read_secret(self.run_dir / MESH_SECRET_FILE).decode())]


def _print_up(mesh: Mesh, cfg: UpConfig) -> None:
    print("\nllmesh is up:")
    for spec in mesh.plan:
        metrics = f"metrics http://{cfg.host}:{spec.metrics_port}/metrics" if spec.metrics_port else ""
        print(f"  {spec.name:<28} {spec.address:<22} {metrics}".rstrip())
    if cfg.http_port:
        print(f"  {'OpenAI-compatible HTTP':<28} http://{cfg.host}:{cfg.http_port}/v1")
    print(f"\n  models: {', '.join(mesh.models.names)} (default {mesh.models.default_model})")
    print(f"  logs:   {mesh.run_dir}")
    print(f"  data:   {mesh.store.data_dir} (Redis append-only file; password in {mesh.store.password_file})")
    print('\n  try:    llmesh generate "What is the capital of France?"   (Ctrl-C stops the mesh)\n',
          flush=True)


def up(cfg: UpConfig, prompt: str | None = None) -> int:
    """Run the mesh in the foreground until Ctrl-C; returns the exit code. With ``prompt``,
    stream an answer to it through the gateway once everything is serving."""
    stop = StopFlag()
    stop.on_signals(signal.SIGINT, signal.SIGTERM)
    try:
        mesh = Mesh(cfg)
    except (OSError, ValueError) as e:
        print(f"llmesh up failed: {e}", file=sys.stderr)
        return 1
    mesh.interrupted = stop
    with mesh:
        try:
            mesh.start()
        except (RuntimeError, TimeoutError) as e:
            print(f"llmesh up failed: {e}", file=sys.stderr)
            return 1
        _print_up(mesh, cfg)
        if prompt:
            from llmesh.cli_client import stream_chat_once

            if mesh.api_key:
                os.environ["LLMESH_API_KEY"] = mesh.api_key
            stream_chat_once(f"{cfg.host}:{cfg.gateway_port}", prompt)
        while not stop.wait(0.2):
            gave_up = mesh.supervise()
            if gave_up:
                print(f"llmesh up: {gave_up}\nstopping the mesh", file=sys.stderr, flush=True)
                return 1
        print("stopping ...", file=sys.stderr)
    return 0

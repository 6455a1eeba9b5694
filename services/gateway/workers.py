"""Several gateway processes on one set of ports (``--workers N``).

A gateway relays every streamed message through Python: about 0.22 ms of CPU each on a
2-core host at a light message rate, where a bare grpc.aio relay pays 0.17 ms
(``bench/gateway_cpu.py``), most of it inside grpc and the event loop. So one process, one
core, bounds the tokens per second a gateway passes, and near that bound its busy loop
delays other requests' first tokens. With ``workers`` > 1 the process started becomes the
supervisor of N worker processes, each a whole gateway:

* it reserves the gateway's ports (gRPC, and HTTP and health when on; a gRPC port given as
  0 gets a free one): it checks that nothing listens there yet, then holds a bound socket
  with SO_REUSEPORT that never listens, for its whole life, so that no other program takes
  a port between two starts of a worker. Each worker listens on every port with
  SO_REUSEPORT and the kernel spreads new *connections* over the workers (a client with one
  channel stays on one worker: give a load generator several);
* it serves the workers' metrics together on ``metrics_port`` (prometheus_client's
  multiprocess mode: counters and histograms summed over workers, gauges as their
  ``multiprocess_mode`` says), with ``llmesh_gateway_worker_restarts_total``;
* it prints the ready line once every worker is ready. A worker that exits is started
  again after RESTART_PAUSE_S; more than MAX_RESTARTS exits within RESTART_WINDOW_S stop
  the gateway with an error, for the launcher or the orchestrator to act on. SIGTERM or
  SIGINT stops every worker gracefully (each has ``grace_period_s``), then the supervisor.

Workers get the parent-death signal, so they never outlive the supervisor. What stays per
worker: ``max_streams``, ``tokenizer_workers``, the live request ids (a key's duplicate id
is caught within one worker, as with several gateways behind a load balancer) and reused
routes. Without a mesh secret the supervisor makes the one random key that every worker
salts tenants' cache keys with, so workers share cached prefixes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from llmesh.gateway.config import GatewayConfig
from llmesh.mesh_secret import secret_of
from llmesh.stop_signal import StopFlag

log = logging.getLogger("llmesh.gateway.workers")

WORKER_ENV = "_LLMESH_GATEWAY_WORKER"
"""In a worker's environment ("index/count"): listen on shared ports."""
SALT_KEY_ENV = "_LLMESH_GATEWAY_SALT_KEY_FILE"
"""In a worker's environment when there is no mesh secret: the supervisor's salt key."""
READY_PREFIX = "LLMESH_READY"
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
RESTART_PAUSE_S = 1.0
STOP_MARGIN_S = 10.0
"""A stopping worker gets its grace period and this long before it is killed."""


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def worker_index() -> int:
    """This worker's index (0 in a gateway without workers): work that must happen once per
    gateway, not once per worker, runs in worker 0."""
    return int(os.environ.get(WORKER_ENV, "0/1").split("/")[0])


def supervisor_salt_key() -> bytes | None:
    """The salt key the supervisor shares with its workers (None: not a worker, or a mesh secret)."""
    path = os.environ.get(SALT_KEY_ENV)
    return Path(path).read_bytes() if path else None


def reserve_port(host: str, port: int, what: str) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket on ``port`` (0: a free one), after checking
    that nothing listens there. OSError names the port when something does."""
    family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    if port:
        # SO_REUSEADDR alone: connections left in TIME_WAIT do not count, a listener does.
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
        except OSError as e:
            raise OSError(f"llmesh-gateway: cannot listen on {host}:{port} ({what}): {e.strerror}") from None
        finally:
            probe.close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen | None = None
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    restart_at: float | None = None
    """When an exited worker is started again (None: running, or its exit not yet seen)."""


class Supervisor:
    """Runs ``config.workers`` gateways on shared ports until SIGTERM or SIGINT."""

    def __init__(self, config: GatewayConfig, argv: list[str]) -> None:
        """``argv``: the gateway's own flags; each worker gets them with its ports appended."""
        self.config, self._argv = config, argv
        self._stop = StopFlag()
        self._sockets: list[socket.socket] = []
        self._workers = [_Worker(i) for i in range(config.workers)]
        self._exits: list[float] = []
        self._dir = Path(tempfile.mkdtemp(prefix="llmesh-gateway-"))
        self._metrics_dir = self._dir / "metrics"
        self._metrics_dir.mkdir()
        self.port = self.http_port = self.health_port = 0
        self._restarts = None

    def run(self) -> int:
        """Serve until stopped; the exit code (1: a worker could not start or kept failing)."""
        self._stop.on_signals(signal.SIGTERM, signal.SIGINT)
        try:
            self._reserve()
            self._serve_metrics()
            env = self._worker_env()
            for w in self._workers:
                self._spawn(w, env)
            if not self._wait_ready():
                return 1 if not self._stop.is_set() else 0
            print(f"{READY_PREFIX} gateway {self.config.host}:{self.port}", flush=True)
            log.info("serving", extra={"service": "gateway", "workers": len(self._workers),
                                       "address": f"{self.config.host}:{self.port}",
                                       "metrics_port": self.config.metrics_port})
            return self._supervise(env)
        finally:
            self._stop_workers()
            for s in self._sockets:
                s.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    # ---- start -------------------------------------------------------------------------------
    def _reserve(self) -> None:
        """The given ports first, then a free gRPC port when ``port`` is 0. In the other order a
        port given for HTTP but not held yet could be handed out for gRPC's 0, and the HTTP
        reservation would then share it (two reuse sockets, neither listening, pass the probe):
        gRPC and HTTP on one port split connections between two servers (HTTP 400 to gRPC
        clients). The pick is checked against the held ports too."""
        cfg = self.config
        for what in ("port", "http_port", "health_port"):
            if getattr(cfg, what):  # 0 is off for http_port and health_port; for port, picked below
                self._sockets.append(reserve_port(cfg.host, getattr(cfg, what), what))
        self.port, self.http_port, self.health_port = cfg.port, cfg.http_port, cfg.health_port
        if not cfg.port:
            held, refused = {s.getsockname()[1] for s in self._sockets}, []
            try:
                while (sock := reserve_port(cfg.host, 0, "port")).getsockname()[1] in held:
                    refused.append(sock)  # stays bound until a port is found, so it is not handed back
                self._sockets.append(sock)
                self.port = sock.getsockname()[1]
            finally:
                for s in refused:
                    s.close()

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._metrics_dir))
        self._restarts = Counter("llmesh_gateway_worker_restarts", "Gateway workers started again after they "
                                 "exited.", registry=registry)
        if self.config.metrics_port:
            start_http_server(self.config.metrics_port, addr=self.config.host, registry=registry)

    def _worker_env(self) -> dict[str, str]:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir), "LLMESH_DIE_WITH_PARENT": "1",
               "PYTHONUNBUFFERED": "1"}
        if secret_of(self.config) is None:
            key = self._dir / "salt_key"
            key.write_bytes(secrets.token_bytes(32))
            key.chmod(0o600)
            env[SALT_KEY_ENV] = str(key)
        return env

    def _spawn(self, w: _Worker, env: dict[str, str]) -> None:
        argv = [sys.executable, "-m", "llmesh.gateway.main", *self._argv, "--workers", "1",
                "--port", str(self.port), "--http-port", str(self.http_port),
                "--health-port", str(self.health_port), "--metrics-port", "0"]
        w.ready.clear()
        w.restart_at = None
        # stderr (the log lines) is the supervisor's; stdout carries the ready line.
        w.proc = subprocess.Popen(argv, env={**env, WORKER_ENV: f"{w.index}/{len(self._workers)}"},
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._pump, args=(w, w.proc), daemon=True,
                         name=f"gateway-worker-{w.index}-stdout").start()

    @staticmethod
    def _pump(w: _Worker, proc: subprocess.Popen) -> None:
        """The worker's stdout: its ready line sets ``ready``, anything else is passed on."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(READY_PREFIX):
                w.ready.set()
            else:
                print(line, flush=True)

    def _wait_ready(self) -> bool:
        while not all(w.ready.is_set() for w in self._workers):
            for w in self._workers:
                code = w.proc.poll()
                if code is not None and not w.ready.is_set():
                    log.error("gateway worker exited before it was ready", extra={
                        "worker": w.index, "pid": w.proc.pid, "exit_code": code})
                    print(f"llmesh-gateway: worker {w.index} exited with code {code} before it was ready "
                          "(its log lines are above)", file=sys.stderr, flush=True)
                    return False
            if self._stop.wait(0.05):
                return False
        return True

    # ---- run -------------------------------------------------------------------------------
    def _supervise(self, env: dict[str, str]) -> int:
        from prometheus_client.multiprocess import mark_process_dead

        while not self._stop.wait(0.2):
            now = time.monotonic()
            for w in self._workers:
                code = w.proc.poll()
                if code is None:
                    continue
                if w.restart_at is None:  # an exit just seen
                    mark_process_dead(w.proc.pid, str(self._metrics_dir))
                    self._exits = [t for t in self._exits if now - t < RESTART_WINDOW_S] + [now]
                    if len(self._exits) > MAX_RESTARTS:
                        log.error("gateway workers keep exiting: stopping the gateway", extra={
                            "worker": w.index, "exit_code": code, "exits": len(self._exits),
                            "window_s": RESTART_WINDOW_S})
                        return 1
                    log.error("gateway worker exited: starting it again", extra={
                        "worker": w.index, "pid": w.proc.pid, "exit_code": code, "pause_s": RESTART_PAUSE_S})
                    w.restart_at = now + RESTART_PAUSE_S
                elif now >= w.restart_at:
                    self._spawn(w, env)
                    self._restarts.inc()
        return 0

    def _stop_workers(self) -> None:
        live = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_period_s + STOP_MARGIN_S
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("gateway worker did not stop in time: killing it", extra={"pid": p.pid})
                p.kill()
                p.wait()


def supervise(config: GatewayConfig, argv: list[str]) -> int:
    return Supervisor(config, argv).run()

"""Start real mesh processes in tests: Redis, llmesh services, engines.

Every process runs in its own process group (``start_new_session=True``) so that
``stop()`` / ``kill()`` reach its children too, and every helper is a context manager
whose exit stops what it started. A service announces readiness with the line
``LLMESH_READY <name> <host:port>`` on stdout (printed by ``GrpcServer.run``); its
stderr (JSON logs) goes to a file whose tail is quoted in every startup error, so a
failing test shows why the process died.

API (stable; other test packages import it):

* ``free_port() -> int``, ``free_ports(n)``, ``free_port_base(offsets, avoid=())``
* ``RedisServer(port=None)``: ``.url``, ``.port``, ``.start()``, ``.stop()``, ``.ping()``
* ``ServiceProcess(module, args, env=None, ready_timeout=120, wait=True)``:
  ``.address``, ``.name``, ``.pid``, ``.wait_ready()``, ``.stop(sig, timeout)``,
  ``.kill()``, ``.alive()``, ``.log_tail()``
* ``wait_serving(address, timeout=30, service="")``
* ``start_engine(model_dir, *extra_args, env=None, wait=True) -> ServiceProcess``
* ``start_prefix_index(redis_url, *extra_args) -> ServiceProcess`` (waits until SERVING)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from llmesh.health import wait_serving  # noqa: F401  (re-exported for the tests)
from llmesh.ports import free_port, free_port_base, free_ports  # noqa: F401  (re-exported for the tests)

READY_PREFIX = "LLMESH_READY "


def _kill_group(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Send ``sig`` to the process group, wait up to ``timeout``, then SIGKILL it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while children of its group still run: always sweep.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: str, n_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 (no persistence, temp working dir).

    ``stop()`` and ``start()`` may be called repeatedly; the port stays the same, so
    clients configured with ``url`` reconnect after a restart.
    """

    def __init__(self, port: int | None = None, start: bool = True) -> None:
        self.binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if self.binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server); "
                        "this test needs a real Redis")
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="llmesh-redis-")
        self._proc: subprocess.Popen | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        """True when the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        log_path = os.path.join(self._dir, "redis.log")
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir,
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}:\n{_tail(log_path)}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s:\n{_tail(log_path)}")

    def stop(self) -> None:
        if self._proc is not None:
            _kill_group(self._proc, signal.SIGTERM, timeout=5)
            self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ServiceProcess:
    """``python -m <module> --port 0 <args>`` as a child process group.

    With ``wait=True`` (default) the constructor returns once the service printed its
    ready line; with ``wait=False`` call ``wait_ready()`` later (lets several slow
    services, e.g. engines, start in parallel).
    """

    def __init__(self, module: str, args: list[str], env: dict[str, str] | None = None,
                 ready_timeout: float = 120, wait: bool = True) -> None:
        self.module = module
        self.ready_timeout = ready_timeout
        self.name = ""
        self.address = ""
        self._dir = tempfile.mkdtemp(prefix="llmesh-svc-")
        self.log_path = os.path.join(self._dir, "stderr.log")
        self._ready = threading.Event()
        self._stdout_lines: list[str] = []
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        cmd = [sys.executable, "-m", module, "--port", "0", *[str(a) for a in args]]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                          env=full_env, start_new_session=True)
        self._started = time.monotonic()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()

    def _read_stdout(self) -> None:
        """Find the ready line, then keep draining stdout so the child never blocks on it."""
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if len(self._stdout_lines) < 1000:
                self._stdout_lines.append(line)
            if not self._ready.is_set() and line.startswith(READY_PREFIX):
                parts = line.split()
                if len(parts) >= 3:
                    self.name, self.address = parts[1], parts[2]
                    self._ready.set()
        self._proc.stdout.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The last bytes of the process's stderr (its JSON log lines)."""
        return _tail(self.log_path, n_bytes)

    def _describe(self) -> str:
        stdout = "\n".join(self._stdout_lines[-20:])
        return (f"{self.module} (pid {self.pid})\n--- stdout tail ---\n{stdout}\n"
                f"--- stderr tail ({self.log_path}) ---\n{self.log_tail()}")

    def wait_ready(self, timeout: float | None = None) -> str:
        """Block until the ready line; returns the address. Raises with the log tail."""
        deadline = self._started + (self.ready_timeout if timeout is None else timeout)
        while not self._ready.is_set():
            if self._proc.poll() is not None:
                self._reader.join(timeout=1)
                if self._ready.is_set():
                    break
                self.stop()
                raise RuntimeError(f"service exited with {self._proc.returncode} before it was ready: "
                                   f"{self._describe()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"service not ready within {self.ready_timeout}s: {self._describe()}")
            self._ready.wait(0.05)
        return self.address

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Signal the process group, wait ``timeout`` s, then SIGKILL; returns the exit code."""
        _kill_group(self._proc, sig, timeout)
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once (crash tests)."""
        _kill_group(self._proc, signal.SIGKILL, timeout=5)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


ENGINE_MODULE = "llmesh.engine.service.main"


def start_engine(model_dir: str, *extra_args: str, env: dict[str, str] | None = None,
                 wait: bool = True, ready_timeout: float = 120) -> ServiceProcess:
    """An engine process serving ``model_dir`` on the CPU in float32."""
    return ServiceProcess(ENGINE_MODULE, ["--model", model_dir, "--device", "cpu", "--dtype", "float32",
                                          *extra_args], env=env, ready_timeout=ready_timeout, wait=wait)


PREFIX_INDEX_MODULE = "llmesh.prefix_cache.main"


def start_prefix_index(redis_url: str, *extra_args: str, env: dict[str, str] | None = None) -> ServiceProcess:
    """A prefix-cache index process over ``redis_url`` that probes Redis every 0.2 s
    (so a Redis restart is seen quickly); returns once it is SERVING."""
    proc = ServiceProcess(PREFIX_INDEX_MODULE, ["--redis-url", redis_url, "--redis-check-interval-s", "0.2",
                                                "--redis-timeout-s", "1", *extra_args], env=env, ready_timeout=60)
    try:
        wait_serving(proc.address, timeout=10)
    except TimeoutError:
        proc.stop()
        raise
    return proc

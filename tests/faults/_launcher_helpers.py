"""A real ``llmesh up`` in a test: free ports, private folders, its output collected.

Every wait is bounded; ``close()`` stops the launcher (SIGINT, then SIGKILL) and SIGKILLs
any child it left behind, so a failing test leaves no process running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.launcher import ENGINE_METRICS_OFFSET, METRICS_OFFSETS
from tests.mesh_helpers import free_port_base, free_ports

LLMESH = [sys.executable, "-m", "llmesh.cli"]


def process_tree(pid: int) -> dict[int, str]:
    """Every descendant of ``pid`` → its command line (from /proc)."""
    parents, cmds = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmds[int(entry.name)] = cmd
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return {p: cmds[p] for p in found}


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def health(address: str, timeout: float = 1.0) -> str:
    """grpc.health.v1 status name of ``address`` ('' service), or the error code's name."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class LlmeshUp:
    """``llmesh up`` as a child process with its own ports and folders under ``root``."""

    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        names = ("gateway", "router", "prefix-cache", "engine-base", "redis")
        self.ports = dict(zip(names, free_ports(len(names))))
        engines = range(self.ports["engine-base"], self.ports["engine-base"] + 8)
        offsets = (*METRICS_OFFSETS.values(), *range(ENGINE_METRICS_OFFSET, ENGINE_METRICS_OFFSET + 8))
        self.metrics_base = free_port_base(offsets, avoid=[*self.ports.values(), *engines])
        self.data_dir, self.run_dir = root / "data", root / "run"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(root / "config"),
                    "XDG_DATA_HOME": str(root / "xdg-data"), **(env or {})}
        self.env.pop("LLMESH_API_KEY", None)
        self.argv = [*LLMESH, "up", "--device", "cpu", "--http-port", "0", "--run-dir", str(self.run_dir),
                     "--data-dir", str(self.data_dir), "--metrics-base-port", str(self.metrics_base),
                     *[x for k, v in self.ports.items() for x in (f"--{k}-port", str(v))], *extra]
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> LlmeshUp:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        return self

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float, after: int = 0) -> None:
        """Until ``text`` appears in the output (past character ``after``); fails if the launcher exits."""
        deadline = time.monotonic() + timeout
        while text not in self.output[after:]:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader thread take the last lines
                if text in self.output[after:]:
                    return
                raise AssertionError(f"llmesh up exited ({self.proc.returncode}) before {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output}")
            time.sleep(0.05)

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def child_pid(self, marker: str) -> int:
        """The pid of the launcher's child whose command line contains ``marker``."""
        pids = [p for p, cmd in process_tree(self.proc.pid).items()
                if marker in cmd and alive(p) and _parent(p) == self.proc.pid]
        assert len(pids) == 1, f"children running {marker!r}: {pids}"
        return pids[0]

    def api_key(self) -> str:
        return (self.root / "config" / "llmesh" / "api_key").read_text().strip()

    def redis_password(self) -> str:
        return (self.data_dir / "redis.password").read_text().strip()

    def redis_url(self) -> str:
        return f"redis://:{self.redis_password()}@127.0.0.1:{self.ports['redis']}/0"

    def close(self) -> None:
        if self.proc is None:
            return
        tree = process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in tree:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

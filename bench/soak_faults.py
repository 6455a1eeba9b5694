"""The fault schedule of bench/soak.py and the faults themselves: SIGSTOP/SIGCONT of an
engine, kill -9 of an engine (restarted by the launcher when it restarts crashed children,
else here), kill -9 of Redis (restarted here, with the soak's API keys registered again)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from llmesh.launcher import Mesh

FAULTS_UNTIL = 0.8
"""Fraction of the duration after which no fault is injected (the tail shows recovery)."""


class Faults:
    """Injects the schedule's faults into the mesh's processes and brings them back."""

    def __init__(self, mesh: Mesh, register_keys, log) -> None:
        self.mesh, self.register_keys, self.log = mesh, register_keys, log
        self.counts: dict[str, int] = {}
        """Faults injected and how engines came back, by name."""
        self.restart_s: list[float] = []
        """Seconds from each engine kill until it served again."""
        self.engines = [s for s in mesh.plan if s.name.startswith("engine-")]
        self.redis = next(s for s in mesh.plan if s.name == "redis")

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _respawn(self, spec) -> subprocess.Popen:
        # No parent-death signal: it fires when the spawning *thread* exits (faults run in a
        # worker thread), not the process. Mesh.stop() still stops what is in mesh.procs.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMESH_DIE_WITH_PARENT": "0", **spec.env}
        with open(self.mesh.run_dir / f"{spec.name}.log", "ab") as log:
            proc = subprocess.Popen(spec.argv, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                    stdin=subprocess.DEVNULL)
        self.mesh.procs[spec.name] = proc
        return proc

    def sigstop_engine(self, seconds: float) -> None:
        spec = self.engines[0]
        proc = self.mesh.procs[spec.name]
        self.log(f"fault: SIGSTOP {spec.name} for {seconds:.0f}s")
        proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            proc.send_signal(signal.SIGCONT)
        self._count("engine_sigstop")

    def kill_engine(self, launcher_wait_s: float, ready_timeout_s: float = 300.0) -> None:
        from llmesh.health import wait_serving

        spec = self.engines[0]
        victim = self.mesh.procs[spec.name]
        self.log(f"fault: kill -9 {spec.name} (pid {victim.pid})")
        t0 = time.monotonic()
        victim.kill()
        victim.wait(timeout=30)
        self._count("engine_kill9")
        # A launcher that restarts crashed children puts a new process in mesh.procs.
        deadline = t0 + launcher_wait_s
        while time.monotonic() < deadline and self.mesh.procs.get(spec.name) is victim:
            time.sleep(0.2)
        if self.mesh.procs.get(spec.name) is victim:
            self._respawn(spec)
            self._count("engine_restarted_by_soak")
            self.log(f"  {spec.name}: the launcher did not restart it; restarted by the soak script")
        else:
            self._count("engine_restarted_by_launcher")
        wait_serving(spec.address, timeout=ready_timeout_s)
        self.restart_s.append(time.monotonic() - t0)
        self.log(f"  {spec.name} serving again after {time.monotonic() - t0:.1f}s")

    def kill_redis(self, down_s: float = 2.0) -> None:
        import redis

        proc = self.mesh.procs["redis"]
        self.log(f"fault: kill -9 redis (pid {proc.pid}) for {down_s:.0f}s")
        proc.kill()
        proc.wait(timeout=30)
        self._count("redis_kill9")
        time.sleep(down_s)
        self._respawn(self.redis)
        client = redis.Redis.from_url(f"redis://{self.redis.address}/0", socket_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        self.register_keys(client)
        self.log("  redis back, tenant keys registered again")

    def schedule(self, duration_s: float, smoke: bool) -> list[tuple[float, str]]:
        """(seconds from start, fault) pairs, all before FAULTS_UNTIL of the duration."""
        if smoke:
            cycle = [("sigstop", 0.2), ("kill_engine", 0.3), ("kill_redis", 0.45)]
        else:
            cycle = [("sigstop", 0.15), ("kill_engine", 0.3), ("kill_redis", 0.45),
                     ("sigstop", 0.6), ("kill_engine", 0.66), ("kill_redis", 0.75)]
        return [(frac * duration_s, name) for name, frac in cycle if frac < FAULTS_UNTIL]

    def run(self, name: str, smoke: bool) -> None:
        if name == "sigstop":
            self.sigstop_engine(3.0 if smoke else 10.0)
        elif name == "kill_engine":
            self.kill_engine(launcher_wait_s=5.0 if smoke else 20.0)
        else:
            self.kill_redis()

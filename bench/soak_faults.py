"""The fault schedule of bench/soak.py and the faults themselves: SIGSTOP/SIGCONT of an
engine, kill -9 of an engine, kill -9 of Redis. Every restart is the launcher's own
(``Mesh.supervise``, which the soak calls from its main thread): a fault here only kills,
then measures how long the mesh takes to serve again. After a Redis kill the tenants'
keys are not registered again: Redis persists them, and the check that they still work
counts any that do not. Also the checks of recovery that need the mesh's internals: the
launcher's supervision loop and the drain (engine Load, carrying the mesh secret)."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc

from llmesh.launcher import Mesh

FAULTS_UNTIL = 0.8
"""Fraction of the duration after which no fault is injected (the tail shows recovery)."""


class Faults:
    """Injects the schedule's faults into the mesh's processes and waits for the launcher
    to bring them back. Runs in a worker thread: it never starts a process (the children's
    parent-death signal fires when the thread that started them exits)."""

    def __init__(self, mesh: Mesh, gateway: str, keys: dict[str, str], model: str, log) -> None:
        self.mesh, self.gateway, self.keys, self.model, self.log = mesh, gateway, keys, model, log
        self.counts: dict[str, int] = {}
        """Faults injected, by name."""
        self.serving_again_s: dict[str, list[float]] = {}
        """Seconds from each kill until the killed child served again, by child."""
        self.keys_lost = 0
        """Tenant keys refused (UNAUTHENTICATED) once Redis was back after a kill -9."""
        self.redis_restarted = False
        """Set once Redis has come back from a kill: auth failures after that are lost keys."""
        self.engines = [s for s in mesh.plan if s.name.startswith("engine-")]

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _kill(self, name: str):
        """SIGKILL the child ``name``; returns its process object and when it was killed."""
        victim = self.mesh.children[name].proc
        self.log(f"fault: kill -9 {name} (pid {victim.pid})")
        t0 = time.monotonic()
        victim.kill()
        victim.wait(timeout=30)
        return victim, t0

    def _wait_restarted(self, name: str, victim, timeout_s: float) -> None:
        """Until the launcher has started a new process for ``name``."""
        deadline = time.monotonic() + timeout_s
        while self.mesh.children[name].proc is victim:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the launcher did not restart {name} within {timeout_s:.0f}s of its kill -9")
            time.sleep(0.1)

    def sigstop_engine(self, seconds: float) -> None:
        name = self.engines[0].name
        proc = self.mesh.children[name].proc
        self.log(f"fault: SIGSTOP {name} for {seconds:.0f}s")
        proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            proc.send_signal(signal.SIGCONT)
        self._count("engine_sigstop")

    def kill_engine(self, timeout_s: float = 300.0) -> None:
        from llmesh.health import wait_serving

        spec = self.engines[0]
        victim, t0 = self._kill(spec.name)
        self._count("engine_kill9")
        self._wait_restarted(spec.name, victim, timeout_s)
        wait_serving(spec.address, timeout=max(1.0, t0 + timeout_s - time.monotonic()))
        self._served_again(spec.name, t0)

    def kill_redis(self, timeout_s: float = 120.0) -> None:
        victim, t0 = self._kill("redis")
        self._count("redis_kill9")
        self._wait_restarted("redis", victim, timeout_s)
        self._check_keys(t0 + timeout_s)
        self.redis_restarted = True
        self._served_again("redis", t0)

    def _served_again(self, name: str, t0: float) -> None:
        took = time.monotonic() - t0
        self.serving_again_s.setdefault(name, []).append(took)
        self.log(f"  {name} restarted by the launcher, serving again after {took:.1f}s")

    def _check_keys(self, deadline: float) -> None:
        """Each tenant's key, unchanged, through the gateway: UNAVAILABLE while the gateway
        waits for Redis is retried; UNAUTHENTICATED means Redis lost the key."""
        from llmesh.v1 import inference_pb2, inference_pb2_grpc

        with grpc.insecure_channel(self.gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for tenant, key in self.keys.items():
                while True:
                    try:
                        stub.Tokenize(inference_pb2.TokenizeRequest(model=self.model, text="hello"),
                                      metadata=(("authorization", f"Bearer {key}"),), timeout=10)
                        break
                    except grpc.RpcError as e:
                        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                            self.keys_lost += 1
                            self.log(f"  tenant {tenant}'s key was lost with the Redis restart: {e.details()}")
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"the gateway did not take tenant {tenant}'s key again after "
                                               f"the Redis restart: {e.code().name} {e.details()}") from None
                        time.sleep(0.2)

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
            self.kill_engine()
        else:
            self.kill_redis()


async def supervise(mesh: Mesh, log) -> str:
    """The launcher's supervision, one pass every 0.2 s on the main thread (as `llmesh up`
    does); returns only when the launcher gives up on a child."""
    while True:
        gave_up = mesh.supervise()
        if gave_up:
            log(f"the launcher gave up: {gave_up}")
            return gave_up
        await asyncio.sleep(0.2)


def _load_all(mesh: Mesh, credential: tuple[tuple[str, str], ...]):
    from llmesh.v1 import engine_pb2, engine_pb2_grpc

    loads = {}
    for spec in mesh.plan:
        if spec.name.startswith("engine-"):
            with grpc.insecure_channel(spec.address) as ch:
                loads[spec.name] = engine_pb2_grpc.EngineStub(ch).Load(engine_pb2.LoadRequest(), metadata=credential,
                                                                       timeout=5)
    return loads


def drain(mesh: Mesh, timeout_s: float = 120.0) -> int:
    """Wait until no engine runs or queues a request; the KV blocks still held (0 unless
    leaked). An engine that does not answer Load by the deadline raises. Load is an
    internal call: it carries the mesh secret the launcher wrote, as the services' own
    channels do."""
    from llmesh.mesh_secret import MESH_SECRET_FILE, METADATA_KEY, read_secret

    credential = ((METADATA_KEY, read_secret(mesh.run_dir / MESH_SECRET_FILE).decode()),)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            loads = _load_all(mesh, credential)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        held = sum(lo.kv_blocks_used for lo in loads.values())
        busy = sum(lo.num_running + lo.num_waiting for lo in loads.values())
        if (held == 0 and busy == 0) or time.monotonic() > deadline:
            return held
        time.sleep(0.2)

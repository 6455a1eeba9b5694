"""The engine replicas the router can send requests to, kept healthy and measured.

One ``ReplicaPool`` per model, one ``Replica`` per configured address. A monitor task
per replica polls ``grpc.health.v1`` Check every ``health_check_interval_s``: a replica
that dies or reports NOT_SERVING leaves its pool at the next check (within about one
interval; a failed Generate call takes it out at once); one whose checks pass their
deadline leaves after ``health_check_misses`` of them in a row, since one slow answer
from a busy machine is not a dead engine. When it answers
SERVING again its ``Info`` is fetched anew — a restarted engine has a new instance id
and maybe a new block size — before it rejoins. A second task polls ``Load``. The same
checks feed the replica's ``Liveness``: streams from an engine that has answered no check
for ``stream_stall_timeout_s`` (frozen) end instead of hanging (liveness.py).

A model with ``discovery: dns://HOST:PORT`` starts with no replicas: its ``DnsDiscovery``
re-resolves HOST every ``discovery_interval_s`` and ``Fleet.sync`` admits each new address
only after its first check answers SERVING (and Info is read), and retires an address gone
from DNS: it leaves the pool at once, and its channels close when its last stream ends
(discovery.py). Discovered replicas are dialed by IP, so their TLS server name is HOST
(the name their certificate carries).

Each replica has two channels: one for Generate calls, with the tracing interceptors so
the engine's spans join the request's trace, and one for health/Info/Load without
them, so that polling does not flood the traces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.models_file import ModelsFile, ModelSpec
from llmesh.router import metrics
from llmesh.router.channels import CHANNEL_OPTIONS
from llmesh.router.discovery import DnsDiscovery, DnsResolver
from llmesh.router.liveness import Liveness
from llmesh.telemetry import client_interceptors
from llmesh.tls import TLSConfig, aio_channel
from llmesh.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the router needs of an engine's Info: how to hash prompts for it, its window."""

    model: str
    instance_id: str
    block_size: int
    max_model_len: int
    kv_blocks_total: int
    epoch: int


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    """The last Load answer of a replica."""

    waiting: int = 0
    running: int = 0
    kv_used: int = 0
    kv_total: int = 0
    steps: int = 0
    at: float = 0.0


class Replica:
    """One engine process serving one model at one address."""

    def __init__(self, model: str, address: str, tls: TLSConfig | None = None,
                 stall_timeout_s: float = 2.0, server_name: str | None = None) -> None:
        self.model = model
        self.address = address
        options = CHANNEL_OPTIONS if not server_name else [
            *CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name)]
        self.channel = aio_channel(address, tls, options=options, interceptors=client_interceptors())
        self.engine = engine_pb2_grpc.EngineStub(self.channel)
        self._control = aio_channel(address, tls, options=options)
        self._health = health_pb2_grpc.HealthStub(self._control)
        self.control = engine_pb2_grpc.EngineStub(self._control)
        self.healthy = False
        self.misses = 0
        """Health checks in a row that passed their deadline."""
        self.info: EngineInfo | None = None
        self.load = EngineLoad()
        self.inflight = 0
        """Requests this router is streaming from the replica now (Load lags behind)."""
        self.retired = False
        """Gone from discovery: out of the pool, draining its streams, never picked again."""
        self.last_error = ""
        self.liveness = Liveness(stall_timeout_s)
        """When the engine last answered a health check; streams end once it is frozen."""

    @property
    def name(self) -> str:
        """The instance id when known (it names the replica in the index and in traces)."""
        return self.info.instance_id if self.info and self.info.instance_id else self.address

    def load_value(self) -> float:
        """Queue depth plus KV use fraction: the load term of the picker's score."""
        queue = max(self.load.waiting + self.load.running, self.inflight)
        kv = self.load.kv_used / self.load.kv_total if self.load.kv_total else 0.0
        return queue + kv

    def mark_unhealthy(self, reason: str) -> None:
        """Take the replica out of its pool until a health check brings it back."""
        self.last_error = reason
        if self.healthy:
            self.healthy = False
            log.warning("replica unhealthy", extra={"model": self.model, "replica": self.name,
                                                    "address": self.address, "reason": reason})

    async def check(self, timeout: float, misses_allowed: int = 1) -> bool | None:
        """True: SERVING. False: not usable. None: a slow answer, not yet ``misses_allowed``
        in a row (the replica keeps its state)."""
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            self.last_error = f"health check: {e.code().name}: {e.details()}"
            self.liveness.missed(self.last_error)
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.misses += 1
                if self.misses < misses_allowed:
                    return None
            return False
        self.misses = 0
        self.liveness.answered()
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            self.last_error = f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
            return False
        return True

    async def fetch_info(self, timeout: float) -> EngineInfo | None:
        try:
            r = await self.control.Info(engine_pb2.InfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            self.last_error = f"Info: {e.code().name}: {e.details()}"
            return None
        if r.model != self.model:
            self.last_error = (f"engine at {self.address} serves model {r.model!r}, but the models file lists it "
                               f"under {self.model!r}; start it with --served-model-name {self.model}")
            return None
        if r.block_size <= 0:
            self.last_error = f"engine at {self.address} reports block_size {r.block_size}"
            return None
        return EngineInfo(model=r.model, instance_id=r.instance_id, block_size=r.block_size,
                          max_model_len=r.max_model_len, kv_blocks_total=r.kv_blocks_total, epoch=r.epoch)

    async def poll_load(self, timeout: float) -> None:
        try:
            r = await self.control.Load(engine_pb2.LoadRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            self.last_error = f"Load: {e.code().name}: {e.details()}"
            return
        self.load = EngineLoad(r.num_waiting, r.num_running, r.kv_blocks_used, r.kv_blocks_total, r.steps,
                               time.monotonic())

    async def close(self) -> None:
        await self.channel.close()
        await self._control.close()


@dataclasses.dataclass
class ReplicaPool:
    """The replicas of one model."""

    spec: ModelSpec
    replicas: list[Replica]

    @property
    def model(self) -> str:
        return self.spec.name

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy and r.info is not None]

    def max_model_len(self) -> int:
        """The window of the model as its engines report it (0 while none has answered)."""
        return max((r.info.max_model_len for r in self.replicas if r.info), default=0)


class Fleet:
    """Every model's pool and the tasks that keep them current."""

    def __init__(self, models: ModelsFile, *, health_check_interval_s: float, health_check_timeout_s: float,
                 load_poll_interval_s: float, stream_stall_timeout_s: float = 2.0,
                 health_check_misses: int = 1, tls: TLSConfig | None = None,
                 discovery_interval_s: float = 5.0, discovery_timeout_s: float = 2.0,
                 discovery_nameserver: str | None = None) -> None:
        self.models = models
        self.pools = {m.name: ReplicaPool(m, [Replica(m.name, a, tls, stream_stall_timeout_s) for a in m.addresses])
                      for m in models.models}
        self.tls = tls
        self.stall_timeout_s = stream_stall_timeout_s
        self.interval = health_check_interval_s
        self.timeout = health_check_timeout_s
        self.misses_allowed = health_check_misses
        self.load_interval = load_poll_interval_s
        self._tasks: list[asyncio.Task] = []
        self._replica_tasks: dict[Replica, list[asyncio.Task]] = {}
        self._draining: set[asyncio.Task] = set()
        discovered = [m for m in models.models if m.discovery]
        resolver = DnsResolver(discovery_nameserver, discovery_timeout_s) if discovered else None
        self.discoveries = {m.name: DnsDiscovery(m.name, m.discovery, resolver, discovery_interval_s)
                            for m in discovered}

    def pool(self, model: str) -> ReplicaPool | None:
        return self.pools.get(model)

    def all_replicas(self) -> list[Replica]:
        return [r for p in self.pools.values() for r in p.replicas]

    async def start(self, wait_s: float) -> None:
        """Start monitoring; wait up to ``wait_s`` for the first check of every replica (and
        the first lookup of every discovered model), so that replicas already up are in their
        pools when the router starts serving."""
        replicas = self.all_replicas()
        if (replicas or self.discoveries) and wait_s > 0:
            first = [*(self._refresh(r) for r in replicas), *(self.discover(name) for name in self.discoveries)]
            try:
                await asyncio.wait_for(asyncio.gather(*first), timeout=wait_s)
            except asyncio.TimeoutError:
                log.warning("some replicas did not answer their first health check in time",
                            extra={"wait_s": wait_s})
        for r in replicas:
            self._watch(r)
        for name in self.discoveries:
            self._tasks.append(asyncio.ensure_future(self._discover_forever(name)))
        self._update_gauges()

    def _watch(self, r: Replica) -> None:
        self._replica_tasks[r] = [asyncio.ensure_future(self._monitor(r)), asyncio.ensure_future(self._poll_load(r))]

    async def discover(self, model: str) -> None:
        """One lookup of ``model``'s DNS name and the pool brought in line with it."""
        found = await self.discoveries[model].resolve()
        if found is not None:
            await self.sync(model, found)

    async def _discover_forever(self, model: str) -> None:
        discovery = self.discoveries[model]
        while True:
            await asyncio.sleep(discovery.interval_s)
            try:
                await self.discover(model)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one bad round
                log.exception("discovery error", extra={"model": model})

    async def sync(self, model: str, addresses: set[str]) -> None:
        """Make ``model``'s pool the replicas at ``addresses``: a new address joins once its
        first check answers SERVING (else it is tried again at the next call); a missing one
        is retired."""
        pool = self.pools[model]
        current = {r.address: r for r in pool.replicas}
        for address in current.keys() - addresses:
            self._retire(pool, current[address])
        server_name = self.discoveries[model].host if model in self.discoveries else None
        candidates = [Replica(model, a, self.tls, self.stall_timeout_s, server_name=server_name)
                      for a in sorted(addresses - current.keys())]
        admitted: set[Replica] = set()
        try:
            await asyncio.gather(*(self._refresh(c) for c in candidates))
            for c in candidates:
                if c.healthy:
                    pool.replicas.append(c)
                    self._watch(c)
                    admitted.add(c)
                else:
                    log.info("discovered replica not admitted yet", extra={"model": model, "address": c.address,
                                                                           "reason": c.last_error})
        finally:  # also when cancelled (a start-up deadline): no channel of a candidate outlives it
            await asyncio.gather(*(c.close() for c in candidates if c not in admitted), return_exceptions=True)
        self._update_gauges()

    def _retire(self, pool: ReplicaPool, r: Replica) -> None:
        """Out of the pool now; its channels close once the streams on it have ended."""
        pool.replicas.remove(r)
        r.retired = True
        for t in self._replica_tasks.pop(r, ()):
            t.cancel()
        log.info("replica left discovery", extra={"model": r.model, "replica": r.name, "address": r.address,
                                                  "inflight": r.inflight})
        task = asyncio.ensure_future(self._drain(r))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, r: Replica) -> None:
        # Checks go on while streams remain, so that a frozen engine still ends them (liveness).
        try:
            while r.inflight > 0:
                await asyncio.sleep(self.interval)
                await r.check(self.timeout, self.misses_allowed)
        finally:
            await r.close()

    async def _refresh(self, r: Replica) -> None:
        """One health check; on a transition to healthy, fetch Info first."""
        ok = await r.check(self.timeout, self.misses_allowed)
        if ok is None:
            return
        if ok and not r.healthy:
            before = r.last_error
            info = await r.fetch_info(self.timeout)
            if info is None:
                if r.last_error != before:  # once per new reason, not every interval
                    log.warning("replica not usable", extra={"model": r.model, "address": r.address,
                                                             "reason": r.last_error})
                return
            r.info = info
            await r.poll_load(self.timeout)
            r.healthy = True
            log.info("replica healthy", extra={"model": r.model, "replica": r.name, "address": r.address,
                                               "block_size": info.block_size, "epoch": info.epoch})
            self._update_gauges()
        elif not ok and r.healthy:
            r.mark_unhealthy(r.last_error)
            self._update_gauges()

    async def _monitor(self, r: Replica) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._refresh(r)
            except asyncio.CancelledError:
                raise
            except Exception:  # a monitor must survive anything a replica does
                log.exception("health monitor error", extra={"address": r.address})

    async def _poll_load(self, r: Replica) -> None:
        """Poll Load; a step count that went down means the engine restarted between two
        health checks, so its Info (instance id, block size) is fetched again."""
        while True:
            await asyncio.sleep(self.load_interval)
            if not r.healthy:
                continue
            steps = r.load.steps
            await r.poll_load(self.timeout)
            if r.load.steps < steps:
                info = await r.fetch_info(self.timeout)
                if info is None:
                    self.mark_unhealthy(r, r.last_error)
                else:
                    r.info = info
                    log.info("replica restarted", extra={"model": r.model, "replica": r.name, "epoch": info.epoch})

    def mark_unhealthy(self, r: Replica, reason: str) -> None:
        r.mark_unhealthy(reason)
        self._update_gauges()

    def _update_gauges(self) -> None:
        for name, pool in self.pools.items():
            metrics.HEALTHY_REPLICAS.labels(name).set(len(pool.healthy()))

    async def close(self) -> None:
        tasks = [*self._tasks, *(t for ts in self._replica_tasks.values() for t in ts), *self._draining]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in self.all_replicas()), return_exceptions=True)

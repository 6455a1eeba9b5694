"""The router's DNS discovery against a real UDP DNS server and real engine processes.

Three tiny engines listen on the same port of 127.0.0.1, .2 and .3 (like pods behind a
headless Service); the DNS stub answers the model's name with some of those addresses.
Records added between lookups join the pool once their engine answers SERVING, records
removed leave it, a failed lookup keeps the pool, and a stream on a replica that left
DNS still finishes.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest
import yaml

from llmesh.config import load_config
from llmesh.models_file import ModelsFile, ModelSpec, ModelsFileError, parse_models
from llmesh.router.config import RouterConfig
from llmesh.router.discovery import DnsResolver
from llmesh.router.replicas import Fleet
from llmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.mesh_helpers import ServiceProcess, start_engine, wait_serving
from tests.router.dns_stub import DnsStub

MODEL = "tiny"
NAME = "llmesh-engine-tiny.llmesh.svc.cluster.local"
IPS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
TIMEOUT = 60


def _port_free_on_all(port: int) -> bool:
    for ip in IPS:
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


def _common_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if _port_free_on_all(port):
            return port
    raise RuntimeError("no port free on 127.0.0.1-3")


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """One engine per loopback address, all on one port; yields (port, processes)."""
    port = _common_port()
    args = ["--served-model-name", MODEL, "--num-kv-blocks", "64", "--max-model-len", "256",
            "--fault-step-delay-s", "0.02"]
    procs = [start_engine(tiny_llama, *args, "--host", ip, "--port", str(port), wait=False) for ip in IPS]
    try:
        for p in procs:
            p.wait_ready()
        yield port, procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def dns():
    with DnsStub() as stub:
        yield stub


def _fleet(port: int, dns: DnsStub, interval_s: float = 30.0) -> Fleet:
    models = ModelsFile([ModelSpec(MODEL, "x", discovery=f"dns://{NAME}:{port}")], MODEL)
    return Fleet(models, health_check_interval_s=0.2, health_check_timeout_s=1.0, load_poll_interval_s=0.5,
                 health_check_misses=2, discovery_interval_s=interval_s, discovery_timeout_s=1.0,
                 discovery_nameserver=dns.address)


def _pool(fleet: Fleet) -> set[str]:
    return {r.address for r in fleet.pools[MODEL].healthy()}


def _run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def test_records_added_and_removed_between_lookups_are_reflected_in_the_pool(engines, dns):
    port, _ = engines
    at = [f"{ip}:{port}" for ip in IPS]

    async def scenario() -> None:
        dns.set(NAME, IPS[:2])
        fleet = _fleet(port, dns)
        try:
            await fleet.start(wait_s=10)
            assert _pool(fleet) == set(at[:2])
            first = fleet.pools[MODEL].replicas[0]
            assert first.info is not None and first.info.model == MODEL

            dns.set(NAME, IPS[1:])  # .1 scaled away, .3 scaled up
            await fleet.discover(MODEL)
            assert _pool(fleet) == set(at[1:])
            assert all(r.address != at[0] for r in fleet.pools[MODEL].replicas)

            # A record whose address serves nothing does not join; the others stay.
            dns.set(NAME, ["127.0.0.4", *IPS[1:]])
            await fleet.discover(MODEL)
            assert {r.address for r in fleet.pools[MODEL].replicas} == set(at[1:])

            dns.failing.add(NAME)  # SERVFAIL: a DNS outage is not a fleet outage
            await fleet.discover(MODEL)
            assert _pool(fleet) == set(at[1:])
            assert NAME in fleet.discoveries[MODEL].last_error, fleet.discoveries[MODEL].last_error
            dns.failing.clear()

            dns.records.pop(NAME)  # NXDOMAIN: every replica is gone
            await fleet.discover(MODEL)
            assert fleet.pools[MODEL].replicas == []
        finally:
            await fleet.close()

    _run(scenario())


def test_the_discovery_loop_follows_dns_within_its_interval(engines, dns):
    port, _ = engines

    async def wait_pool(fleet: Fleet, want: set[str]) -> None:
        deadline = time.monotonic() + 10
        while _pool(fleet) != want:
            assert time.monotonic() < deadline, f"pool {_pool(fleet)} never became {want}"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        dns.set(NAME, IPS[:1])
        fleet = _fleet(port, dns, interval_s=0.2)
        try:
            await fleet.start(wait_s=10)
            assert _pool(fleet) == {f"{IPS[0]}:{port}"}
            dns.set(NAME, IPS)
            await wait_pool(fleet, {f"{ip}:{port}" for ip in IPS})
            dns.set(NAME, IPS[2:])
            await wait_pool(fleet, {f"{IPS[2]}:{port}"})
        finally:
            await fleet.close()

    _run(scenario())


def test_a_replica_that_is_not_serving_yet_joins_once_it_is(tiny_llama, dns):
    """The address is in DNS before its engine listens (a pod published early): it joins at
    the first lookup after the engine is up, not before."""
    port = _common_port()

    async def scenario() -> None:
        dns.set(NAME, ["127.0.0.2"])
        fleet = _fleet(port, dns)
        try:
            await fleet.start(wait_s=5)
            assert fleet.pools[MODEL].replicas == []
            proc = await asyncio.to_thread(start_engine, tiny_llama, "--served-model-name", MODEL,
                                           "--num-kv-blocks", "32", "--host", "127.0.0.2", "--port", str(port))
            try:
                await fleet.discover(MODEL)
                assert _pool(fleet) == {f"127.0.0.2:{port}"}
            finally:
                await asyncio.to_thread(proc.stop)
        finally:
            await fleet.close()

    _run(scenario())


def test_a_stream_on_a_replica_that_left_dns_finishes_and_new_routes_avoid_it(engines, dns, tmp_path):
    """The real router process: a long stream runs on one engine while that engine's record
    disappears; the stream still delivers every token, and new requests go elsewhere."""
    port, _ = engines
    dns.set(NAME, IPS[:2])
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [
        {"name": MODEL, "path": "unused", "discovery": f"dns://{NAME}:{port}"}]}))
    with ServiceProcess("llmesh.router.main", ["--models-file", str(models_file), "--discovery-nameserver",
                                               dns.address, "--discovery-interval-s", "0.2",
                                               "--startup-wait-s", "10", "--policy", "round_robin"]) as router:
        wait_serving(router.address, timeout=10)
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            cards = stub.ListModels(router_pb2.RouterListModelsRequest(), timeout=10).models
            assert [(c.name, c.healthy_replicas) for c in cards] == [(MODEL, 2)]

            request = router_pb2.RouteRequest(model=MODEL, prompt_token_ids=[5, 6, 7, 8], sampling=common_pb2.SamplingParams(
                max_tokens=120, temperature=0.0, ignore_eos=True))
            target = stub.Route(request, timeout=10).target.candidates[0].address
            stream = stub.Generate(request, timeout=TIMEOUT)
            first = next(stream)
            got = list(first.token_ids)
            # The stream runs on the first candidate the round robin names after Route's; remove
            # both engines the two calls used from DNS, keeping only the third.
            dns.set(NAME, IPS[2:])
            done = threading.Event()
            tokens: list[int] = []

            def drain() -> None:
                for msg in stream:
                    tokens.extend(msg.token_ids)
                done.set()

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            deadline = time.monotonic() + 20
            while True:
                cards = stub.ListModels(router_pb2.RouterListModelsRequest(), timeout=10).models
                if cards[0].healthy_replicas == 1 and cards[0].replicas == 1:
                    break
                assert time.monotonic() < deadline, f"the pool never followed DNS: {cards}"
                time.sleep(0.1)
            assert not done.is_set(), "the stream ended before the replica left DNS; make it longer"
            new = stub.Route(request, timeout=10).target.candidates
            assert [c.address for c in new] == [f"{IPS[2]}:{port}"]
            reader.join(TIMEOUT)
            assert done.is_set()
            assert len(got) + len(tokens) == 120, "the stream on the retired replica was cut short"
            assert target in {f"{ip}:{port}" for ip in IPS[:2]}


def test_discovery_in_the_models_file_is_checked():
    good = {"models": [{"name": "m", "path": "p", "discovery": "dns://svc.ns.svc.cluster.local:50061"}]}
    assert parse_models(good).models[0].discovery.endswith(":50061")
    for bad in ("svc:50061", "dns://svc", "dns://svc:0", "dns://svc:x", "dns://a/b:1"):
        with pytest.raises(ModelsFileError, match="dns://HOST:PORT"):
            parse_models({"models": [{"name": "m", "path": "p", "discovery": bad}]})
    with pytest.raises(ModelsFileError, match="exclude each other"):
        parse_models({"models": [{"name": "m", "path": "p", "discovery": "dns://s:1", "addresses": ["a:1"]}]})


def test_discovery_options_are_checked():
    cfg = load_config(RouterConfig, ["--discovery-nameserver", "10.0.0.10:53", "--discovery-interval-s", "2"],
                      service="router")
    assert cfg.discovery_nameserver == "10.0.0.10:53" and cfg.discovery_interval_s == 2
    for argv in (["--discovery-nameserver", "10.0.0.10"], ["--discovery-interval-s", "0"],
                 ["--discovery-timeout-s", "-1"]):
        with pytest.raises((SystemExit, ValueError)):
            load_config(RouterConfig, argv, service="router")


def test_an_unreachable_nameserver_is_a_bounded_failure():
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
            silent.bind(("127.0.0.1", 0))
            resolver = DnsResolver(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.3)
            t0 = time.monotonic()
            with pytest.raises(Exception, match="lookup of x.test failed"):
                await resolver.addresses("x.test", 1)
            assert time.monotonic() - t0 < 2

    _run(scenario())


def test_one_address_family_failing_keeps_the_other_families_answer(dns):
    """A resolver that drops AAAA queries must not freeze the pool: the A records stand; a
    failure with nothing found by the other family is a failed lookup (the pool is kept)."""
    from llmesh.router.discovery import DiscoveryError, DnsResolver

    resolver = DnsResolver(dns.address, timeout_s=2.0)
    dns.set(NAME, IPS[:2])
    dns.failing_aaaa.add(NAME)

    async def scenario():
        assert await resolver.addresses(NAME, 50061) == {f"{ip}:50061" for ip in IPS[:2]}
        dns.set(NAME, [])
        with pytest.raises(DiscoveryError, match="AAAA lookup"):
            await resolver.addresses(NAME, 50061)

    _run(scenario())

"""The router in a real mesh: redis-server, the prefix-cache index, two engine processes
serving a tiny model, and the router process, all over loopback.

The engines sleep 10 ms per step (--fault-step-delay-s) so that a long generation is
still running when a test cancels it or kills its engine. The failure tests kill the
engines, so they run last.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import random
import time
import urllib.request

import grpc
import pytest
import yaml

from llmesh.prefix_hash import hash_prefix_blocks
from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, prefix_index_pb2, prefix_index_pb2_grpc
from llmesh.v1 import router_pb2, router_pb2_grpc
from tests.fixtures.tiny_models import build_tiny_model
from tests.mesh_helpers import (RedisServer, ServiceProcess, free_port, start_engine, start_prefix_index,
                                wait_serving)

MODEL = "tiny"
ROUTER_MODULE = "llmesh.router.main"
TIMEOUT = 30


@dataclasses.dataclass
class Mesh:
    router: ServiceProcess
    engines: list[ServiceProcess]
    index_address: str
    metrics_port: int
    model_dir: str
    engine_args: list[str]

    def stub(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(grpc.insecure_channel(self.router.address))

    def engine_name(self, i: int) -> str:
        return f"{MODEL}@{self.engines[i].address}"

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("router-mesh")
    model_dir = build_tiny_model(str(root / "tiny-llama"), "llama")
    with RedisServer() as redis_server, start_prefix_index(redis_server.url) as index:
        engine_args = ["--served-model-name", MODEL, "--num-kv-blocks", "128", "--max-model-len", "512",
                       "--prefix-index", index.address, "--heartbeat-interval-s", "0.5",
                       "--heartbeat-ttl-s", "5", "--fault-step-delay-s", "0.01"]
        engines = [start_engine(model_dir, *engine_args, wait=False) for _ in range(2)]
        try:
            for e in engines:
                e.wait_ready()
            models_file = root / "models.yaml"
            models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [
                {"name": MODEL, "path": model_dir, "size_class": "small", "replicas": 2,
                 "addresses": [e.address for e in engines]},
                # Misconfigured: its address is an engine serving "tiny", so never healthy.
                {"name": "big", "path": model_dir, "size_class": "large", "replicas": 1,
                 "addresses": [engines[0].address]},
            ]}))
            metrics_port = free_port()
            with ServiceProcess(ROUTER_MODULE, ["--models-file", str(models_file), "--prefix-index", index.address,
                                                "--metrics-port", str(metrics_port),
                                                "--startup-wait-s", "3"]) as router:
                wait_serving(router.address, timeout=10)
                yield Mesh(router, engines, index.address, metrics_port, model_dir, engine_args)
        finally:
            for e in engines:
                e.stop()


def route(stub, prompt: list[int], max_tokens: int = 8, model: str = MODEL, **kw) -> list[common_pb2.GenerateResponse]:
    req = router_pb2.RouteRequest(model=model, prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True), **kw)
    return list(stub.Generate(req, timeout=TIMEOUT))


def tokens(msgs) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


def random_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def wait_indexed(index_address: str, prompt: list[int], instance_id: str, blocks: int, timeout: float = 5) -> None:
    """Wait until the index says ``instance_id`` holds the prompt's first ``blocks`` blocks."""
    hashes = hash_prefix_blocks(prompt, 16, MODEL)[:blocks]
    with grpc.insecure_channel(index_address) as ch:
        stub = prefix_index_pb2_grpc.PrefixIndexStub(ch)
        deadline = time.monotonic() + timeout
        while True:
            resp = stub.Match(prefix_index_pb2.MatchRequest(namespace=MODEL, block_hashes=hashes), timeout=5)
            if any(r.instance_id == instance_id and r.matched_blocks == blocks for r in resp.replicas):
                return
            assert time.monotonic() < deadline, f"{instance_id} never published {blocks} blocks: {resp}"
            time.sleep(0.05)


def wait_idle(mesh: Mesh, timeout: float) -> float:
    """Seconds until no engine runs or queues a request."""
    t0 = time.monotonic()
    stubs = [engine_pb2_grpc.EngineStub(grpc.insecure_channel(e.address)) for e in mesh.engines if e.alive()]
    while True:
        loads = [s.Load(engine_pb2.LoadRequest(), timeout=5) for s in stubs]
        if all(ld.num_running == 0 and ld.num_waiting == 0 for ld in loads):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"engines still busy: {loads}"
        time.sleep(0.02)


def test_router_streams_what_the_engine_streams(mesh):
    prompt = random_prompt(1, 21)
    greedy = common_pb2.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    direct = list(engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engines[0].address)).Generate(
        engine_pb2.EngineGenerateRequest(request_id="direct", prompt_token_ids=prompt, sampling=greedy),
        timeout=TIMEOUT))
    routed = route(mesh.stub(), prompt, request_id="routed")
    assert tokens(routed) == tokens(direct) and len(tokens(routed)) == 8
    assert "".join(m.text for m in routed) == "".join(m.text for m in direct)
    last = routed[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.request_id == "routed"
    assert last.replica in (mesh.engine_name(0), mesh.engine_name(1))
    assert last.usage.completion_tokens == 8 and last.model == MODEL
    # No model named: the models file's default.
    assert tokens(route(mesh.stub(), prompt, model="")) == tokens(direct)


def test_unknown_model_is_not_found_with_the_list(mesh):
    with pytest.raises(grpc.RpcError) as e:
        route(mesh.stub(), [5, 6, 7], model="no-such-model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert all(name in e.value.details() for name in ("no-such-model", MODEL, "big", "auto"))


def test_model_without_healthy_replicas_is_unavailable(mesh):
    with pytest.raises(grpc.RpcError) as e:
        route(mesh.stub(), [5, 6, 7], model="big")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy replica of model 'big'" in e.value.details()
    assert "serves model 'tiny'" in e.value.details() and "--served-model-name big" in e.value.details()


def test_auto_falls_back_to_the_healthy_class(mesh):
    # The code hint asks for the large model, which has no healthy replica.
    msgs = route(mesh.stub(), [5, 6, 7], model="auto", prompt_text="def f(x): return x")
    assert msgs[-1].model == MODEL
    assert mesh.metric('llmesh_router_model_decisions_total{model="tiny",reason="auto_hint_code_fallback"}') >= 1


def test_list_models(mesh):
    models = {m.name: m for m in mesh.stub().ListModels(router_pb2.RouterListModelsRequest(), timeout=5).models}
    assert set(models) == {MODEL, "big"}
    tiny, big = models[MODEL], models["big"]
    assert (tiny.size_class, tiny.replicas, tiny.healthy_replicas, tiny.max_model_len) == ("small", 2, 2, 512)
    assert (big.size_class, big.replicas, big.healthy_replicas) == ("large", 1, 0)


def test_shared_prefix_goes_to_the_replica_that_holds_it(mesh):
    stub = mesh.stub()
    holders = []
    for seed in (10, 11, 12):
        prefix = random_prompt(seed, 16 * 10)
        first = route(stub, prefix + [7, 8, 9], max_tokens=2)
        holder = first[-1].replica
        holders.append(holder)
        wait_indexed(mesh.index_address, prefix, holder, 10)
        again = route(stub, prefix + [400, 401, 402, 403], max_tokens=2)
        assert again[-1].replica == holder
        assert again[-1].usage.cached_tokens >= 16 * 10
    assert mesh.metric("llmesh_router_replica_picks_total{model=\"tiny\",reason=\"prefix_cache\"}") >= 3


def test_acceptance_requests_go_to_the_replica_holding_their_prefix(mesh):
    """Issue 6 acceptance: two replicas under equal load, 20 requests over 4 cached
    prefixes (5 each, sent in waves of 4 at once, one per prefix): >= 90% of them go to
    the replica that holds their prefix and reuse it."""
    stub = mesh.stub()
    prefixes = [random_prompt(100 + i, 16 * 10) for i in range(4)]
    holders = []
    for i, prefix in enumerate(prefixes):
        holder = route(stub, prefix + [5, 6, 7], max_tokens=1)[-1].replica
        wait_indexed(mesh.index_address, prefix, holder, 10)
        holders.append(holder)
    hits = 0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for wave in range(5):
            futures = [pool.submit(route, stub, prefix + [300 + wave, 301 + i, 302], max_tokens=2)
                       for i, prefix in enumerate(prefixes)]
            for holder, fut in zip(holders, futures):
                last = fut.result()[-1]
                hits += last.replica == holder and last.usage.cached_tokens >= 16 * 10
    assert hits >= 18, f"only {hits}/20 requests went to the replica holding their prefix ({holders})"


def long_request(seed: int) -> router_pb2.RouteRequest:
    """A request that needs >= 4.5 s on these engines (450 steps of >= 10 ms)."""
    return router_pb2.RouteRequest(model=MODEL, prompt_token_ids=random_prompt(seed, 20),
                                   sampling=common_pb2.SamplingParams(max_tokens=450, temperature=0.0,
                                                                      ignore_eos=True))


def test_cancelling_the_caller_aborts_the_engine_request(mesh):
    wait_idle(mesh, timeout=5)
    call = mesh.stub().Generate(long_request(20), timeout=TIMEOUT)
    assert next(call).token_ids
    call.cancel()
    assert wait_idle(mesh, timeout=2) < 2


def test_the_callers_deadline_reaches_the_engine(mesh):
    wait_idle(mesh, timeout=5)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(mesh.stub().Generate(long_request(21), timeout=0.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(mesh, timeout=2) + (time.monotonic() - t0) < 2.5


def healthy_replicas(stub) -> int:
    models = {m.name: m for m in stub.ListModels(router_pb2.RouterListModelsRequest(), timeout=5).models}
    return models[MODEL].healthy_replicas


def wait_healthy_replicas(stub, n: int, since: float, within: float) -> None:
    while healthy_replicas(stub) != n:
        assert time.monotonic() - since < within, f"the pool did not reach {n} healthy replicas in {within}s"
        time.sleep(0.05)


def index_holders(index_address: str, prompt: list[int]) -> set[str]:
    hashes = hash_prefix_blocks(prompt, 16, MODEL)
    with grpc.insecure_channel(index_address) as ch:
        resp = prefix_index_pb2_grpc.PrefixIndexStub(ch).Match(
            prefix_index_pb2.MatchRequest(namespace=MODEL, block_hashes=hashes), timeout=5)
    return {r.instance_id for r in resp.replicas}


def test_acceptance_replica_killed_under_load(mesh):
    """Issue 6 acceptance: a replica killed under load is routed around, every request
    completes or ends with a clear error, the index forgets the replica, and after it
    restarts the index converges again."""
    stub = mesh.stub()
    victim, survivor = mesh.engine_name(0), mesh.engine_name(1)
    prefix = random_prompt(60, 16 * 6)
    list(engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engines[0].address)).Generate(
        engine_pb2.EngineGenerateRequest(prompt_token_ids=prefix, sampling=common_pb2.SamplingParams(max_tokens=1)),
        timeout=TIMEOUT))
    wait_indexed(mesh.index_address, prefix, victim, 6)

    def one(seed: int) -> str:
        try:
            msgs = route(stub, random_prompt(seed, 24), max_tokens=60)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert victim in e.details() and "after the first token" in e.details(), e.details()
            return "failed_clearly"
        assert len(tokens(msgs)) == 60
        return "completed"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, 200 + i) for i in range(8)]
        time.sleep(0.3)  # all 8 are streaming (60 steps of >= 10 ms each)
        mesh.engines[0].kill()
        futures += [pool.submit(one, 300 + i) for i in range(8)]  # sent while the pool notices
        outcomes = [f.result() for f in futures]
    assert "completed" in outcomes and set(outcomes) <= {"completed", "failed_clearly"}
    assert all(route(stub, random_prompt(400 + i, 20), max_tokens=2)[-1].replica == survivor for i in range(3))

    deadline = time.monotonic() + 8  # the engines' heartbeat TTL is 5 s
    while victim in index_holders(mesh.index_address, prefix):
        assert time.monotonic() < deadline, "the index still lists the killed replica"
        time.sleep(0.1)

    port = mesh.engines[0].address.rsplit(":", 1)[1]
    mesh.engines[0] = start_engine(mesh.model_dir, *mesh.engine_args, "--port", port)
    wait_healthy_replicas(stub, 2, since=time.monotonic(), within=3)
    list(engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engines[0].address)).Generate(
        engine_pb2.EngineGenerateRequest(prompt_token_ids=prefix, sampling=common_pb2.SamplingParams(max_tokens=1)),
        timeout=TIMEOUT))
    wait_indexed(mesh.index_address, prefix, victim, 6)  # the restarted replica's new state
    assert route(stub, prefix + [9], max_tokens=1)[-1].replica == victim


def test_failover_and_replica_loss(mesh):
    """A dead replica leaves the pool within ~1 s and a restarted one rejoins it; a
    replica that dies before the first token is failed over; one that dies mid-stream
    ends the stream with UNAVAILABLE naming it."""
    stub = mesh.stub()
    mesh.engines[0].kill()
    wait_healthy_replicas(stub, 1, since=time.monotonic(), within=1.5)
    for seed in range(3):
        assert route(stub, random_prompt(40 + seed, 20), max_tokens=3)[-1].replica == mesh.engine_name(1)

    # Restarted on the same port (a new epoch), with 0.5 s steps so that a request is
    # still before its first token when the engine is killed below.
    port = mesh.engines[0].address.rsplit(":", 1)[1]
    mesh.engines[0] = start_engine(mesh.model_dir, *mesh.engine_args, "--port", port,
                                   "--fault-step-delay-s", "0.5")
    wait_healthy_replicas(stub, 2, since=time.monotonic(), within=1.5)
    slow, other = mesh.engine_name(0), mesh.engine_name(1)
    prefix = random_prompt(30, 16 * 8)
    list(engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engines[0].address)).Generate(
        engine_pb2.EngineGenerateRequest(prompt_token_ids=prefix, sampling=common_pb2.SamplingParams(max_tokens=1)),
        timeout=TIMEOUT))
    wait_indexed(mesh.index_address, prefix, slow, 8)

    failovers = mesh.metric("llmesh_router_failovers_total")
    call = stub.Generate(router_pb2.RouteRequest(model=MODEL, prompt_token_ids=prefix + [3, 4],
                                                 sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)),
                         timeout=TIMEOUT)
    time.sleep(0.25)  # routed to the slow replica (it holds the prefix), inside its first step
    mesh.engines[0].kill()
    msgs = list(call)
    assert msgs[-1].replica == other and len(tokens(msgs)) == 4
    assert mesh.metric("llmesh_router_failovers_total") == failovers + 1
    assert healthy_replicas(stub) == 1

    call = stub.Generate(long_request(50), timeout=TIMEOUT)
    assert next(call).token_ids
    mesh.engines[1].kill()
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert other in e.value.details() and "after the first token" in e.value.details()

    with pytest.raises(grpc.RpcError) as e:
        route(stub, [5, 6, 7])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no healthy replica" in e.value.details()

"""Direct routing (the gateway asks the router's Route, then streams from the engine)
against proxy routing (the router's Generate stream), in a real mesh: redis-server, the
prefix-cache index, two engine processes of a tiny model, one router, and two gateway
processes over it, one per routing mode.

The engines sleep 10 ms per step so that a long stream is still running when a test
cancels it. The failover test kills the engines, so it runs last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time

import grpc
import pytest
import yaml

from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, inference_pb2, inference_pb2_grpc
from llmesh.v1 import router_pb2, router_pb2_grpc
from tests.fixtures.tiny_models import build_tiny_model
from tests.mesh_helpers import RedisServer, ServiceProcess, start_engine, start_prefix_index, wait_serving
from tests.router.test_router_mesh import wait_indexed

MODEL = "tiny"
TIMEOUT = 30


@dataclasses.dataclass
class Mesh:
    engines: list[ServiceProcess]
    router: ServiceProcess
    direct: ServiceProcess
    proxy: ServiceProcess
    index_address: str
    model_dir: str
    engine_args: list[str]

    def gateway(self, mode: str) -> inference_pb2_grpc.InferenceStub:
        proc = self.direct if mode == "direct" else self.proxy
        return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(proc.address))

    def router_stub(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(grpc.insecure_channel(self.router.address))

    def engine(self, i: int) -> engine_pb2_grpc.EngineStub:
        return engine_pb2_grpc.EngineStub(grpc.insecure_channel(self.engines[i].address))

    def engine_name(self, i: int) -> str:
        return f"{MODEL}@{self.engines[i].address}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct-routing")
    model_dir = build_tiny_model(str(root / "tiny-llama"), "llama")
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        index = stack.enter_context(start_prefix_index(redis_server.url))
        engine_args = ["--served-model-name", MODEL, "--num-kv-blocks", "128", "--max-model-len", "512",
                       "--prefix-index", index.address, "--heartbeat-interval-s", "0.5",
                       "--heartbeat-ttl-s", "5", "--fault-step-delay-s", "0.01"]
        engines = [stack.enter_context(start_engine(model_dir, *engine_args, wait=False)) for _ in range(2)]
        for e in engines:
            e.wait_ready()
        models_file = root / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [
            {"name": MODEL, "path": model_dir, "size_class": "small", "replicas": 2,
             "addresses": [e.address for e in engines]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", [
            "--models-file", str(models_file), "--prefix-index", index.address, "--startup-wait-s", "3"]))
        wait_serving(router.address, timeout=10)
        gateways = {mode: stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--auth", "false",
            "--routing", mode])) for mode in ("direct", "proxy")}
        yield Mesh(engines, router, gateways["direct"], gateways["proxy"], index.address, model_dir, engine_args)


def greedy(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def random_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def tokens(msgs) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


def wait_engines_idle(mesh: Mesh, within_s: float) -> None:
    stubs = [mesh.engine(i) for i, e in enumerate(mesh.engines) if e.alive()]
    t0 = time.monotonic()
    while True:
        loads = [s.Load(engine_pb2.LoadRequest(), timeout=5) for s in stubs]
        if all(ld.num_running == 0 and ld.num_waiting == 0 and ld.kv_blocks_used == 0 for ld in loads):
            return
        assert time.monotonic() - t0 < within_s, f"engines still busy after {within_s}s: {loads}"
        time.sleep(0.02)


def without_timing(msgs: list[common_pb2.GenerateResponse]) -> list[common_pb2.GenerateResponse]:
    """The messages with what may differ between two runs of one request cleared: the
    replica (two replicas serve the model) and the prompt tokens found cached."""
    out = []
    for m in msgs:
        c = common_pb2.GenerateResponse()
        c.CopyFrom(m)
        c.ClearField("replica")
        c.usage.cached_tokens = 0
        out.append(c)
    return out


@pytest.mark.parametrize("rpc", ["Generate", "Chat"])
def test_direct_and_proxy_streams_are_identical(mesh, rpc):
    streams = {}
    for mode in ("proxy", "direct"):
        stub = mesh.gateway(mode)
        if rpc == "Generate":
            req = inference_pb2.GenerateRequest(model=MODEL, text="The quick brown fox", sampling=greedy(12),
                                                request_id=f"same-{rpc}")
            streams[mode] = list(stub.Generate(req, timeout=TIMEOUT))
        else:
            req = inference_pb2.ChatRequest(model="auto", sampling=greedy(12), request_id=f"same-{rpc}",
                                            messages=[inference_pb2.ChatMessage(role="user", content="Hello")])
            streams[mode] = list(stub.Chat(req, timeout=TIMEOUT))
    proxy, direct = streams["proxy"], streams["direct"]
    assert without_timing(direct) == without_timing(proxy)
    assert len(tokens(direct)) == 12 and direct[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert direct[-1].replica in (mesh.engine_name(0), mesh.engine_name(1))
    assert direct[-1].model == MODEL and direct[-1].usage.completion_tokens == 12


def test_route_names_the_replica_holding_the_prefix_first(mesh):
    prefix = random_prompt(7, 16 * 8)
    list(mesh.engine(1).Generate(engine_pb2.EngineGenerateRequest(prompt_token_ids=prefix, sampling=greedy(1)),
                                 timeout=TIMEOUT))
    wait_indexed(mesh.index_address, prefix, mesh.engine_name(1), 8)
    req = router_pb2.RouteRequest(model=MODEL, prompt_token_ids=prefix + [9, 10], sampling=greedy(5),
                                  request_id="route-1", cache_salt="", priority=common_pb2.PRIORITY_BATCH)
    decision = mesh.router_stub().Route(req, timeout=TIMEOUT)
    target = decision.target
    assert target.model == MODEL and target.reason == "explicit"
    assert [c.replica for c in target.candidates] == [mesh.engine_name(1), mesh.engine_name(0)]
    assert [c.address for c in target.candidates] == [mesh.engines[1].address, mesh.engines[0].address]
    assert target.pick_reason == "prefix_cache" and target.matched_blocks == 8
    assert list(target.request.prompt_token_ids) == prefix + [9, 10]
    assert target.request.request_id == "route-1" and target.request.sampling == greedy(5)
    assert target.request.priority == common_pb2.PRIORITY_BATCH
    assert not decision.HasField("escalation") and decision.max_failovers == 2
    # The direct gateway goes where Route pointed, and finds the prefix cached there.
    msgs = list(mesh.gateway("direct").Generate(inference_pb2.GenerateRequest(
        model=MODEL, token_ids=router_pb2.TokenIds(ids=prefix + [11, 12]), sampling=greedy(3)),
        timeout=TIMEOUT))
    assert msgs[-1].replica == mesh.engine_name(1) and msgs[-1].usage.cached_tokens >= 16 * 8


def test_route_errors_are_the_routers(mesh):
    with pytest.raises(grpc.RpcError) as e:
        mesh.router_stub().Route(router_pb2.RouteRequest(model="nope", prompt_token_ids=[5, 6]), timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and MODEL in e.value.details()


def test_cancelling_a_direct_stream_aborts_the_engine_request(mesh):
    call = mesh.gateway("direct").Generate(inference_pb2.GenerateRequest(
        model=MODEL, text="Once upon a time", sampling=greedy(300)), timeout=TIMEOUT)
    assert next(call).token_ids
    call.cancel()
    wait_engines_idle(mesh, within_s=1.0)


def test_the_callers_deadline_reaches_the_engine_in_direct_mode(mesh):
    with pytest.raises(grpc.RpcError) as e:
        list(mesh.gateway("direct").Generate(inference_pb2.GenerateRequest(
            model=MODEL, text="Once upon a time", sampling=greedy(300)), timeout=0.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_engines_idle(mesh, within_s=1.0)


def test_direct_failover_before_the_first_token_and_failure_after_it(mesh):
    # Engine 0 restarted on its port with 0.5 s steps, so that a request is still before
    # its first token when the engine is killed below.
    port = mesh.engines[0].address.rsplit(":", 1)[1]
    mesh.engines[0].kill()
    mesh.engines[0] = start_engine(mesh.model_dir, *mesh.engine_args, "--port", port, "--fault-step-delay-s", "0.5")
    prefix = random_prompt(30, 16 * 8)
    list(mesh.engine(0).Generate(engine_pb2.EngineGenerateRequest(prompt_token_ids=prefix, sampling=greedy(1)),
                                 timeout=TIMEOUT))
    slow = mesh.engine_name(0)
    wait_indexed(mesh.index_address, prefix, slow, 8)
    route = router_pb2.RouteRequest(model=MODEL, prompt_token_ids=prefix + [3, 4], sampling=greedy(4))
    deadline = time.monotonic() + 5  # the router sees the restarted replica within a health interval
    while mesh.router_stub().Route(route, timeout=TIMEOUT).target.candidates[0].replica != slow:
        assert time.monotonic() < deadline, "the router never routed to the restarted replica"
        time.sleep(0.1)

    stub = mesh.gateway("direct")
    call = stub.Generate(inference_pb2.GenerateRequest(
        model=MODEL, token_ids=router_pb2.TokenIds(ids=prefix + [3, 4]), sampling=greedy(4)), timeout=TIMEOUT)
    time.sleep(0.25)  # on the slow replica (it holds the prefix), inside its first step
    mesh.engines[0].kill()
    msgs = list(call)
    assert msgs[-1].replica == mesh.engine_name(1) and len(tokens(msgs)) == 4

    call = stub.Generate(inference_pb2.GenerateRequest(model=MODEL, text="Once upon a time", sampling=greedy(300)),
                         timeout=TIMEOUT)
    assert next(call).token_ids
    mesh.engines[1].kill()
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mesh.engine_name(1) in e.value.details() and "after the first token" in e.value.details()

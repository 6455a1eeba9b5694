"""Escalation of ``auto`` requests from the small model to the large one, in a real mesh.

Two engine processes serve two different tiny random models: ``small-m`` (2 layers,
hidden 128) and ``large-m`` (4 layers, hidden 256, another seed). A random tiny model is
unsure of its tokens by nature, so the tests force each outcome with the threshold: one
router never escalates (threshold -1000 nats), the other always does (threshold +1: a
mean log-probability is never above 0). The small engine sleeps 10 ms per step so that
a long small request is still running when the router aborts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import urllib.request

import grpc
import pytest
import yaml

from llmesh.v1 import (common_pb2, engine_pb2, engine_pb2_grpc, inference_pb2, inference_pb2_grpc, router_pb2,
                       router_pb2_grpc)
from tests.fixtures.tiny_models import build_tiny_model
from tests.mesh_helpers import ServiceProcess, free_port, start_engine, wait_serving
from tests.otlp_receiver import OtlpReceiver

SMALL, LARGE = "small-m", "large-m"
ROUTER_MODULE = "llmesh.router.main"
TIMEOUT = 30
PROMPT = [5, 17, 99, 250, 300, 41, 7, 128, 64, 33, 12, 480]


@dataclasses.dataclass
class Router:
    proc: ServiceProcess
    metrics_port: int

    def stub(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(grpc.insecure_channel(self.proc.address))

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@dataclasses.dataclass
class EscalationMesh:
    engines: dict[str, ServiceProcess]
    never: Router
    always: Router
    otlp: OtlpReceiver
    gateways: dict[str, ServiceProcess]
    """Gateways over ``always``, by routing mode (direct, proxy)."""


def start_router(stack: contextlib.ExitStack, models_file: str, threshold: float,
                 env: dict[str, str] | None = None) -> Router:
    port = free_port()
    args = ["--models-file", models_file, "--metrics-port", str(port), "--startup-wait-s", "5",
            "--escalation-tokens", "8", f"--escalation-threshold={threshold}"]
    proc = stack.enter_context(ServiceProcess(ROUTER_MODULE, args, env=env))
    wait_serving(proc.address, timeout=10)
    return Router(proc, port)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("escalation")
    small_dir = build_tiny_model(str(root / "small"), "llama", seed=1)
    large_dir = build_tiny_model(str(root / "large"), "llama", seed=2, num_hidden_layers=4, hidden_size=256,
                                 intermediate_size=512)
    with contextlib.ExitStack() as stack:
        otlp = stack.enter_context(OtlpReceiver())
        engines = {
            SMALL: stack.enter_context(start_engine(small_dir, "--served-model-name", SMALL, "--max-model-len",
                                                    "512", "--fault-step-delay-s", "0.01", wait=False)),
            LARGE: stack.enter_context(start_engine(large_dir, "--served-model-name", LARGE, "--max-model-len",
                                                    "512", wait=False)),
        }
        for e in engines.values():
            e.wait_ready()
        models_file = root / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": SMALL, "models": [
            {"name": SMALL, "path": small_dir, "size_class": "small", "replicas": 1,
             "addresses": [engines[SMALL].address]},
            {"name": LARGE, "path": large_dir, "size_class": "large", "replicas": 1,
             "addresses": [engines[LARGE].address]},
        ]}))
        never = start_router(stack, str(models_file), -1000.0)
        always = start_router(stack, str(models_file), 1.0, env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100"})
        gateways = {mode: stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", always.proc.address, "--models-file", str(models_file), "--auth", "false",
            "--routing", mode])) for mode in ("direct", "proxy")}
        yield EscalationMesh(engines, never, always, otlp, gateways)


def greedy(max_tokens: int, logprobs: int | None = None) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if logprobs is not None:
        p.logprobs = logprobs
    return p


def auto(router: Router, max_tokens: int, model: str = "auto", logprobs: int | None = None,
         ) -> list[common_pb2.GenerateResponse]:
    req = router_pb2.RouteRequest(
        model=model, request_id="esc", sampling=greedy(max_tokens, logprobs),
        prompt_token_ids_by_model={SMALL: router_pb2.TokenIds(ids=PROMPT), LARGE: router_pb2.TokenIds(ids=PROMPT)})
    return list(router.stub().Generate(req, timeout=TIMEOUT))


def direct(mesh: EscalationMesh, model: str, max_tokens: int, logprobs: int | None = None) -> list[int]:
    stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engines[model].address))
    msgs = stub.Generate(engine_pb2.EngineGenerateRequest(prompt_token_ids=PROMPT,
                                                          sampling=greedy(max_tokens, logprobs)), timeout=TIMEOUT)
    return [t for m in msgs for t in m.token_ids]


def tokens(msgs) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


def stream_summary(msgs) -> tuple:
    last = msgs[-1]
    return (tokens(msgs), "".join(m.text for m in msgs), {m.model for m in msgs}, last.finish_reason,
            last.usage.prompt_tokens, last.usage.completion_tokens, last.replica.split("@")[0])


def engine_load(mesh: EscalationMesh, model: str) -> engine_pb2.LoadResponse:
    stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engines[model].address))
    return stub.Load(engine_pb2.LoadRequest(), timeout=5)


def small_steps_until_idle(mesh: EscalationMesh, steps_before: int) -> int:
    """The small engine's steps from ``steps_before`` until it holds no request.

    Counted in steps, not seconds: on a loaded CI host the cancel takes a while to cross
    two processes, but the engine slows down with it, so an abort still ends the request
    within a few dozen of its 300 steps."""
    deadline = time.monotonic() + 10
    while (load := engine_load(mesh, SMALL)).num_running + load.num_waiting:
        assert time.monotonic() < deadline, "the small model's request was not aborted within 10 s"
        time.sleep(0.02)
    return load.steps - steps_before


# The prompt's prefill, the 8 judged tokens and the steps the cancel takes to arrive: far
# below the 300 a request left running would take.
ABORTED_WITHIN_STEPS = 120


def test_the_models_differ(mesh):
    assert direct(mesh, SMALL, 12) != direct(mesh, LARGE, 12)


def test_low_confidence_escalates_to_the_large_model(mesh):
    r = mesh.always
    before = r.metric(f'llmesh_router_escalations_total{{from_model="{SMALL}",to_model="{LARGE}"}}')
    msgs = auto(r, 12)
    assert tokens(msgs) == direct(mesh, LARGE, 12)
    assert all(m.model == LARGE for m in msgs) and msgs[-1].model == LARGE
    assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == 12
    assert not any(m.logprobs for m in msgs), "the caller did not ask for logprobs"
    assert r.metric(f'llmesh_router_escalations_total{{from_model="{SMALL}",to_model="{LARGE}"}}') == before + 1
    assert r.metric(f'llmesh_router_model_decisions_total{{model="{LARGE}",reason="auto_escalated"}}') >= 1
    # Counted when the router's handler returns, just after the caller got the last message.
    deadline = time.monotonic() + 5
    while r.metric(f'llmesh_router_requests_total{{code="OK",model="{LARGE}"}}') < 1:
        assert time.monotonic() < deadline, "the request was not counted under the model that answered"
        time.sleep(0.05)
    # The router's server span carries the event and names the model that answered.
    spans = mesh.otlp.wait_for(lambda got: any("escalated" in sp.events for sp in got))
    span = next(sp for sp in spans if "escalated" in sp.events)
    assert span.service == "llmesh-router" and span.attributes["llmesh.model"] == LARGE
    assert span.attributes["llmesh.model_reason"] == "auto_default"


def test_confident_small_model_streams_its_own_tokens(mesh):
    r = mesh.never
    msgs = auto(r, 12)
    assert tokens(msgs) == direct(mesh, SMALL, 12)
    assert msgs[-1].model == SMALL and msgs[-1].usage.completion_tokens == 12
    assert not any(m.logprobs for m in msgs), "the router's own logprobs must be stripped"
    assert r.metric("llmesh_router_escalations_total") == 0
    assert r.metric(f'llmesh_router_escalation_checks_total{{model="{SMALL}",outcome="kept"}}') >= 1


def test_logprobs_the_caller_asked_for_are_kept(mesh):
    kept = auto(mesh.never, 10, logprobs=2)
    assert [lp.token_id for m in kept for lp in m.logprobs] == tokens(kept) == direct(mesh, SMALL, 10)
    assert all(len(lp.top) == 2 for m in kept for lp in m.logprobs)
    escalated = auto(mesh.always, 10, logprobs=0)
    assert [lp.token_id for m in escalated for lp in m.logprobs] == tokens(escalated) == direct(mesh, LARGE, 10)


def test_a_stream_shorter_than_the_window_is_judged_on_what_it_has(mesh):
    assert tokens(auto(mesh.always, 3)) == direct(mesh, LARGE, 3)
    assert tokens(auto(mesh.never, 3)) == direct(mesh, SMALL, 3)


def test_explicit_model_never_escalates(mesh):
    assert tokens(auto(mesh.always, 10, model=SMALL)) == direct(mesh, SMALL, 10)


def test_escalation_aborts_the_small_request(mesh):
    # Left running, the small request would take 300 steps; the escalation must abort it.
    steps_before = engine_load(mesh, SMALL).steps
    req = router_pb2.RouteRequest(model="auto", sampling=greedy(300), prompt_token_ids=PROMPT)
    call = mesh.always.stub().Generate(req, timeout=TIMEOUT)
    first = next(call)
    assert small_steps_until_idle(mesh, steps_before) < ABORTED_WITHIN_STEPS
    msgs = [first, *call]
    assert tokens(msgs) == direct(mesh, LARGE, 300) and msgs[-1].model == LARGE


def gateway_auto(mesh: EscalationMesh, mode: str, max_tokens: int) -> list[common_pb2.GenerateResponse]:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.gateways[mode].address))
    req = inference_pb2.GenerateRequest(model="auto", text="Hello there", sampling=greedy(max_tokens),
                                        request_id="esc-gw")
    return list(stub.Generate(req, timeout=TIMEOUT))


def test_route_plans_the_escalation(mesh):
    req = router_pb2.RouteRequest(model="auto", request_id="plan", sampling=greedy(5), prompt_token_ids=PROMPT)
    decision = mesh.always.stub().Route(req, timeout=TIMEOUT)
    assert decision.target.model == SMALL and decision.target.reason == "auto_default"
    assert decision.target.request.sampling.HasField("logprobs"), "the judge needs the small model's logprobs"
    plan = decision.escalation
    assert plan.large.model == LARGE and plan.tokens == 8 and plan.threshold == 1.0 and plan.strip_logprobs
    assert [c.address for c in plan.large.candidates] == [mesh.engines[LARGE].address]
    assert not plan.large.request.sampling.HasField("logprobs")
    explicit = mesh.always.stub().Route(router_pb2.RouteRequest(model=SMALL, sampling=greedy(5),
                                                                prompt_token_ids=PROMPT), timeout=TIMEOUT)
    assert not explicit.HasField("escalation") and explicit.target.model == SMALL


def test_direct_routing_escalates_like_the_router(mesh):
    direct_msgs = gateway_auto(mesh, "direct", 12)
    proxy_msgs = gateway_auto(mesh, "proxy", 12)
    # How tokens are grouped into messages depends on step timing; the stream's content does not.
    assert stream_summary(direct_msgs) == stream_summary(proxy_msgs)
    assert all(m.model == LARGE for m in direct_msgs) and not any(m.logprobs for m in direct_msgs)
    assert direct_msgs[-1].usage.completion_tokens == 12
    # Left running, the small request would take 300 steps: the gateway must abort it on
    # its engine when it escalates.
    steps_before = engine_load(mesh, SMALL).steps
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.gateways["direct"].address))
    call = stub.Generate(inference_pb2.GenerateRequest(model="auto", text="Hello there", sampling=greedy(300)),
                         timeout=TIMEOUT)
    first = next(call)
    assert small_steps_until_idle(mesh, steps_before) < ABORTED_WITHIN_STEPS
    assert first.model == LARGE and len(tokens([first, *call])) == 300

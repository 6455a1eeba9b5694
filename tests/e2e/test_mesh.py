"""End to end through all four services as real processes, with a real Redis and a real
OTLP receiver: streamed text, usage, one trace per request, and errors that leave every
process healthy."""

from __future__ import annotations

import os
import time

import grpc
import pytest
import yaml
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from llmesh.engine import LLM, SamplingParams
from llmesh.health import wait_serving
from llmesh.launcher import Mesh, UpConfig
from llmesh.mesh_secret import MESH_SECRET_FILE, METADATA_KEY, read_secret
from llmesh.prefix_hash import hash_prefix_blocks
from llmesh.router.config import RouterConfig
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, prefix_index_pb2, prefix_index_pb2_grpc
from tests.mesh_helpers import free_ports
from tests.otlp_receiver import OtlpReceiver

PROMPT = "the quick brown fox jumps over the lazy dog and keeps running far away"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, tiny_llama):
    run_dir = tmp_path_factory.mktemp("mesh")
    models = {"default_model": "tiny", "models": [{
        "name": "tiny", "path": tiny_llama, "size_class": "small", "replicas": 1,
        "engine": {"dtype": "float32", "num_kv_blocks": 128, "max_model_len": 256}}]}
    (run_dir / "models.in.yaml").write_text(yaml.safe_dump(models))
    gateway, router, prefix_cache, engine_base, redis = free_ports(5)
    cfg = UpConfig(models_file=str(run_dir / "models.in.yaml"), gateway_port=gateway,
                   router_port=router, prefix_cache_port=prefix_cache, engine_base_port=engine_base,
                   redis_port=redis, metrics_base_port=0, device="cpu", run_dir=str(run_dir),
                   auth=False)
    with OtlpReceiver() as otlp:
        saved = dict(os.environ)
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                           "OTEL_BSP_SCHEDULE_DELAY": "100"})
        try:
            with Mesh(cfg, quiet=True) as m:
                m.start(timeout=180)
                yield m, otlp, cfg
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _stub(cfg) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"{cfg.host}:{cfg.gateway_port}"))


def _generate(cfg, request_id: str, **sampling):
    req = inference_pb2.GenerateRequest(model="tiny", text=PROMPT, request_id=request_id,
                                        sampling=common_pb2.SamplingParams(**sampling))
    return list(_stub(cfg).Generate(req, timeout=60))


def test_streams_the_engines_greedy_text_with_usage(mesh, tiny_llama):
    m, _, cfg = mesh
    chunks = _generate(cfg, "e2e-text", max_tokens=10, temperature=0.0, ignore_eos=True)
    ref = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=64).generate(
        [PROMPT], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert "".join(c.text for c in chunks) == ref.text
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids) and last.usage.completion_tokens == 10
    assert last.model == "tiny" and last.replica


def test_one_trace_gateway_router_engine(mesh):
    m, otlp, cfg = mesh
    # The router grants reused routes (docs/routing.md): past the grant of the module's earlier
    # requests the gateway asks it again, so this request's trace has the router's Route span.
    time.sleep(RouterConfig.decision_reuse_ms / 1000 + 0.3)
    _generate(cfg, "e2e-trace", max_tokens=4, temperature=0.0, ignore_eos=True)

    def engine_span(spans):
        """The engine knows the request by the gateway's engine request id, not the client's."""
        gateway = next((s for s in spans if s.service == "llmesh-gateway"
                        and s.attributes.get("llmesh.request_id") == "e2e-trace"), None)
        return None if gateway is None else next(
            (s for s in spans if s.service == "llmesh-engine"
             and s.attributes.get("llmesh.request_id") == gateway.attributes["llmesh.engine_request_id"]), None)

    spans = otlp.wait_for(lambda s: engine_span(s) is not None
                          and {x.service for x in s if x.trace_id == engine_span(s).trace_id}
                          >= {"llmesh-gateway", "llmesh-router", "llmesh-engine"})
    leaf = engine_span(spans)
    trace = {s.span_id: s for s in spans if s.trace_id == leaf.trace_id}
    path, span = [], leaf
    while span is not None:
        path.append(span.service)
        span = trace.get(span.parent_span_id)
    services_in_order = [s for i, s in enumerate(path) if i == 0 or path[i - 1] != s]
    # Direct routing (the gateway's default): the engine's span is the gateway's child, and
    # the router's Route span is its sibling, under the same gateway span.
    assert services_in_order == ["llmesh-engine", "llmesh-gateway"], path
    gateway_span = trace[leaf.parent_span_id]
    assert any(s.service == "llmesh-router" and trace.get(s.parent_span_id) is not None
               and trace[s.parent_span_id].service == "llmesh-gateway" for s in trace.values())
    assert gateway_span.service == "llmesh-gateway"
    assert {"queued", "first_token", "finished"} <= set(leaf.events)
    assert leaf.attributes["llmesh.prompt_tokens"] > 0 and leaf.attributes["llmesh.completion_tokens"] == 4
    assert "llmesh.cached_tokens" in leaf.attributes and leaf.attributes["llmesh.model"] == "tiny"


def test_the_index_learns_where_the_prefix_is(mesh, tiny_llama):
    m, _, cfg = mesh
    _generate(cfg, "e2e-index", max_tokens=2, temperature=0.0)
    from llmesh.engine.text.loading import load_tokenizer

    ids = load_tokenizer(tiny_llama).encode(PROMPT)
    hashes = hash_prefix_blocks(ids, 16, "tiny")
    assert hashes, "the prompt must fill at least one block"
    index = prefix_index_pb2_grpc.PrefixIndexStub(grpc.insecure_channel(f"{cfg.host}:{cfg.prefix_cache_port}"))
    import time

    deadline = time.monotonic() + 10
    while True:
        resp = index.Match(prefix_index_pb2.MatchRequest(namespace="tiny", block_hashes=hashes), timeout=5,
                           metadata=[(METADATA_KEY, read_secret(m.run_dir / MESH_SECRET_FILE).decode())])
        if resp.replicas and resp.replicas[0].matched_blocks == len(hashes):
            break
        assert time.monotonic() < deadline, f"index never matched the prefix: {resp}"
        time.sleep(0.1)


@pytest.mark.parametrize("request_kw,code,needle", [
    ({"model": "no-such-model", "text": "hi"}, grpc.StatusCode.NOT_FOUND, "tiny"),
    ({"model": "tiny", "text": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ({"model": "tiny", "text": "word " * 400}, grpc.StatusCode.INVALID_ARGUMENT, "256"),
    ({"model": "tiny", "text": "hi", "sampling": common_pb2.SamplingParams(max_tokens=0)},
     grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"model": "tiny", "text": "hi", "sampling": common_pb2.SamplingParams(temperature=-1)},
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
])
def test_bad_requests_get_clear_statuses_and_leave_everything_healthy(mesh, request_kw, code, needle):
    m, _, cfg = mesh
    with pytest.raises(grpc.RpcError) as e:
        list(_stub(cfg).Generate(inference_pb2.GenerateRequest(**request_kw), timeout=30))
    assert e.value.code() == code and needle in e.value.details()
    assert m.failed() is None
    for name, address in m.endpoints():
        if name != "redis":
            wait_serving(address, timeout=5)


def test_reflection_lists_the_public_services(mesh):
    _, _, cfg = mesh
    # The descriptor database's stream is not wait-for-ready: a first connect attempt that fails
    # (a loaded CI machine) ends it UNAVAILABLE. channel_ready_future retries until ready, bounded.
    with grpc.insecure_channel(f"{cfg.host}:{cfg.gateway_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"llmesh.v1.Inference", "grpc.health.v1.Health"} <= set(db.get_services())

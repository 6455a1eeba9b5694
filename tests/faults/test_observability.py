"""What operators see, on a real mesh (`llmesh up`'s processes, a real Redis, real OTLP
receivers): one status-code label everywhere, every RPC counted, no traces for polls and
probes, OTLP over HTTP, failures logged with their reason and trace id, and a Prometheus
config and Grafana dashboard that match what the services export."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from llmesh.launcher import ENGINE_METRICS_OFFSET, METRICS_OFFSETS, Mesh, UpConfig
from llmesh.telemetry import NO_ROOT_METHODS, UNTRACED_METHODS
from llmesh.v1 import (common_pb2, engine_pb2, engine_pb2_grpc, inference_pb2, inference_pb2_grpc,
                       prefix_index_pb2, prefix_index_pb2_grpc)
from tests.mesh_helpers import RedisServer, free_port_base, free_ports, start_prefix_index
from tests.otlp_receiver import OtlpHttpReceiver, OtlpReceiver

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
PROMPT = "the quick brown fox jumps over the lazy dog"
SERVICES = {**METRICS_OFFSETS, f"engine-{MODEL}-0": ENGINE_METRICS_OFFSET}
"""Process name in the run dir → its metrics port's offset from metrics_base_port."""
REQUEST_ROOTS = {"/llmesh.v1.Inference/Generate", "/llmesh.v1.Inference/Chat", "/llmesh.v1.Inference/Tokenize",
                 "/llmesh.v1.Inference/ListModels", "/llmesh.v1.Engine/Generate"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, tiny_llama):
    run_dir = tmp_path_factory.mktemp("obs-mesh")
    models = {"default_model": MODEL, "models": [{
        "name": MODEL, "path": tiny_llama, "size_class": "small", "replicas": 1,
        "engine": {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256}}]}
    (run_dir / "models.in.yaml").write_text(yaml.safe_dump(models))
    gateway, router, prefix_cache, engine_base, redis = free_ports(5)
    cfg = UpConfig(models_file=str(run_dir / "models.in.yaml"), gateway_port=gateway,
                   router_port=router, prefix_cache_port=prefix_cache, engine_base_port=engine_base,
                   redis_port=redis, metrics_base_port=free_port_base(SERVICES.values()), device="cpu",
                   run_dir=str(run_dir), auth=False)
    with OtlpReceiver() as otlp:
        saved = dict(os.environ)
        # Fast polls, so that the test sees many of them in a short time.
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                           "OTEL_BSP_SCHEDULE_DELAY": "100", "LLMESH_GATEWAY_MODELS_REFRESH_S": "0.3",
                           "LLMESH_ENGINE_HEARTBEAT_INTERVAL_S": "0.3"})
        try:
            with Mesh(cfg, quiet=True) as m:
                m.start(timeout=180)
                yield m, otlp, cfg
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _gateway(cfg) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"{cfg.host}:{cfg.gateway_port}"))


def _generate(cfg, request_id: str, **sampling) -> list[common_pb2.GenerateResponse]:
    req = inference_pb2.GenerateRequest(model=MODEL, text=PROMPT, request_id=request_id,
                                        sampling=common_pb2.SamplingParams(**sampling))
    return list(_gateway(cfg).Generate(req, timeout=60))


def _scrape(cfg, service: str) -> list:
    url = f"http://{cfg.host}:{cfg.metrics_base_port + SERVICES[service]}/metrics"
    return list(text_string_to_metric_families(urllib.request.urlopen(url, timeout=5).read().decode()))


def _exported_names(families) -> set[str]:
    """Every series name a family can produce (a labelled family with no child yet still counts)."""
    names = set()
    for fam in families:
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names.update(fam.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def _log_lines(mesh_obj: Mesh, process: str) -> list[dict]:
    lines = []
    for raw in (mesh_obj.run_dir / f"{process}.log").read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue  # a line some library printed outside the JSON logger
    return lines


def _wait(predicate, timeout: float = 10.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---- metrics -----------------------------------------------------------------------------
def test_every_service_labels_status_codes_code_and_counts_tokenize_and_list_models(mesh):
    m, _, cfg = mesh
    gw = _gateway(cfg)
    gw.Tokenize(inference_pb2.TokenizeRequest(model=MODEL, text=PROMPT), timeout=10)
    gw.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
    with pytest.raises(grpc.RpcError):
        gw.Tokenize(inference_pb2.TokenizeRequest(model="no-such-model", text=PROMPT), timeout=10)
    _generate(cfg, "obs-label", max_tokens=3, temperature=0.0, ignore_eos=True)
    status_like = {"status", "grpc_code", "status_code", "grpc_status"}
    for service in SERVICES:
        families = _scrape(cfg, service)
        samples = [s for fam in families for s in fam.samples]
        wrong = {(s.name, tuple(s.labels)) for s in samples if status_like & set(s.labels)}
        assert not wrong, f"{service} labels status codes other than 'code': {wrong}"
        handled = [s for s in samples if s.name == "llmesh_rpc_server_handled_total"]
        assert handled and all(s.labels["code"] for s in handled), service
    gateway = [s for fam in _scrape(cfg, "gateway") for s in fam.samples]

    def handled(method: str, code: str) -> float:
        return sum(s.value for s in gateway if s.name == "llmesh_rpc_server_handled_total"
                   and s.labels["grpc_method"] == method and s.labels["code"] == code)

    assert handled("Tokenize", "OK") >= 1 and handled("Tokenize", "NOT_FOUND") >= 1
    assert handled("ListModels", "OK") >= 1 and handled("Generate", "OK") >= 1
    assert any(s.name == "llmesh_gateway_requests_total" and s.labels.get("code") == "OK" for s in gateway)
    engine = [s for fam in _scrape(cfg, f"engine-{MODEL}-0") for s in fam.samples]
    assert any(s.name == "llmesh_rpc_server_handled_total" and s.labels["grpc_method"] == "Generate"
               and s.labels["code"] == "OK" for s in engine)


def test_dashboard_queries_use_only_metrics_the_services_export(mesh):
    m, _, cfg = mesh
    _generate(cfg, "obs-dashboard", max_tokens=2, temperature=0.0, ignore_eos=True)
    exported = set().union(*(_exported_names(_scrape(cfg, s)) for s in SERVICES))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "llmesh.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    used = {name for e in exprs for name in re.findall(r"\bllmesh_[a-z0-9_]+", e)}
    assert len(used) >= 10
    assert used <= exported, f"the dashboard queries metrics no service exports: {sorted(used - exported)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("first token", "per output token", "throughput", "kv cache", "prefix cache hit", "errors"):
        assert topic in titles, topic


# ---- traces --------------------------------------------------------------------------------
def test_polls_health_checks_and_heartbeats_make_no_spans_while_requests_do(mesh):
    m, otlp, cfg = mesh
    engine_address = next(addr for name, addr in m.endpoints() if name.startswith("engine-"))
    channel = grpc.insecure_channel(engine_address)
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    engine_pb2_grpc.EngineStub(channel).Load(engine_pb2.LoadRequest(), timeout=5, metadata=m.credential())
    engine_pb2_grpc.EngineStub(channel).Info(engine_pb2.InfoRequest(), timeout=5, metadata=m.credential())
    time.sleep(1.0)  # the router polls Health and Load, engines heartbeat, the gateway lists models
    _generate(cfg, "obs-trace", max_tokens=2, temperature=0.0, ignore_eos=True)
    def engine_span_of_the_request(ss) -> bool:
        # Engines know the request by the gateway's id for it (per-tenant ids), which the
        # gateway's span records beside the client's.
        ids = {s.attributes.get("llmesh.engine_request_id") for s in ss
               if s.service == "llmesh-gateway" and s.attributes.get("llmesh.request_id") == "obs-trace"}
        return any(s.service == "llmesh-engine" and s.name == "/llmesh.v1.Engine/Generate"
                   and s.attributes.get("llmesh.request_id") in ids for s in ss)

    spans = otlp.wait_for(engine_span_of_the_request)
    polls = [(s.service, s.name) for s in spans if s.name in UNTRACED_METHODS]
    assert not polls, f"polls and probes were traced: {polls}"
    roots = {s.name for s in spans if not s.parent_span_id}
    assert roots <= REQUEST_ROOTS, f"traces that are not requests: {roots - REQUEST_ROOTS}"
    assert not {s.name for s in spans if not s.parent_span_id} & NO_ROOT_METHODS


def test_http_protobuf_export_delivers_spans_and_heartbeats_stay_untraced():
    with RedisServer() as redis, OtlpHttpReceiver() as otlp:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
               "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with start_prefix_index(redis.url, env=env) as index:
            stub = prefix_index_pb2_grpc.PrefixIndexStub(grpc.insecure_channel(index.address))
            stub.Heartbeat(prefix_index_pb2.HeartbeatRequest(instance_id="e0", epoch=1, namespace="m",
                                                             ttl_seconds=5, address="127.0.0.1:1"), timeout=5)
            stub.Match(prefix_index_pb2.MatchRequest(namespace="m", block_hashes=[1, 2, 3]), timeout=5)
            spans = otlp.wait_for(lambda ss: any(s.name == "/llmesh.v1.PrefixIndex/Match" for s in ss))
    match = next(s for s in spans if s.name == "/llmesh.v1.PrefixIndex/Match")
    assert match.service == "llmesh-prefix-cache" and len(match.trace_id) == 32
    assert not [s for s in spans if s.name in UNTRACED_METHODS]


# ---- logs ----------------------------------------------------------------------------------
def test_a_failed_request_is_logged_with_its_code_reason_and_trace_id(mesh):
    m, _, cfg = mesh
    with pytest.raises(grpc.RpcError) as e:
        _generate(cfg, "obs-bad", max_tokens=2, top_p=2.0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def gateway_lines():
        lines = _log_lines(m, "gateway")
        failed = [x for x in lines if x.get("logger") == "llmesh.rpc" and x.get("code") == "INVALID_ARGUMENT"
                  and x.get("rpc") == "/llmesh.v1.Inference/Generate"]
        usage = [x for x in lines if x.get("msg") == "usage" and x.get("request_id") == "obs-bad"]
        return (failed, usage) if failed and usage else None

    failed, usage = _wait(gateway_lines, what="the gateway's failure lines")
    assert "top_p" in failed[-1]["error"] and re.fullmatch(r"[0-9a-f]{32}", failed[-1]["trace_id"])
    assert usage[-1]["status"] == "INVALID_ARGUMENT" and "top_p" in usage[-1]["error"]
    assert usage[-1]["trace_id"] == failed[-1]["trace_id"]

    # A failure inside the engine is logged by the engine, with the caller's trace id.
    engine_address = next(addr for name, addr in m.endpoints() if name.startswith("engine-"))
    with pytest.raises(grpc.RpcError) as e:
        list(engine_pb2_grpc.EngineStub(grpc.insecure_channel(engine_address)).Generate(
            engine_pb2.EngineGenerateRequest(request_id="obs-long", prompt_token_ids=[5] * 300), timeout=10,
            metadata=m.credential()))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    engine_failed = _wait(lambda: [x for x in _log_lines(m, f"engine-{MODEL}-0")
                                   if x.get("logger") == "llmesh.rpc" and x.get("code") == "INVALID_ARGUMENT"],
                          what="the engine's failure line")
    assert "256" in engine_failed[-1]["error"] and len(engine_failed[-1]["trace_id"]) == 32


# ---- deployment ----------------------------------------------------------------------------
def test_prometheus_scrapes_every_service_of_compose():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name, svc in compose.items():
        env = svc.get("environment") or {}
        port = next((str(v) for k, v in env.items() if k.startswith("LLMESH_") and k.endswith("_METRICS_PORT")),
                    None)
        if port is None:
            continue
        aliases = ((svc.get("networks") or {}).get("default") or {}).get("aliases") or [name]
        expected |= {f"{alias}:{port}" for alias in aliases}
    assert len(expected) >= 5 and expected <= targets, f"not scraped: {expected - targets}"
    assert {"prometheus", "grafana"} <= set(compose)
    mounts = " ".join(compose["prometheus"]["volumes"])
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml" in mounts


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    volumes = {v.split(":")[0]: v.split(":")[1] for v in compose["grafana"]["volumes"]}
    assert volumes["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = volumes["./deploy/grafana/dashboards"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/llmesh.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_dir
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    ds = source["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["prometheus"]["ports"]
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "llmesh.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {ds["uid"]}

"""deploy/k8s: every manifest and every rendered overlay validates against the Kubernetes
1.31 schemas (kubernetes-validate, strict: unknown fields are errors), selectors select
pods, probes hit ports that serve grpc.health.v1, every LLMESH_* variable is a real option
of its service, and TLS, models file and autoscaling agree with the code."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from llmesh.config import options
from llmesh.engine.metrics import NUM_WAITING
from llmesh.engine.service.config import EngineServiceConfig
from llmesh.gateway.config import GatewayConfig
from llmesh.models_file import parse_discovery, parse_models
from llmesh.prefix_cache.config import PrefixCacheConfig
from llmesh.router.config import RouterConfig
from tests.deploy.kustomize import KustomizeError, build, strategic_merge

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.31.0"
OVERLAYS = ["overlays/cpu", "overlays/gpu", "overlays/tp", "autoscaling"]
NOT_RESOURCES = {"kustomization.yaml", "models.yaml", "prometheus-adapter-rules.yaml"}
SERVICES = {"gateway": GatewayConfig, "router": RouterConfig, "prefix-cache": PrefixCacheConfig,
            "engine": EngineServiceConfig}
PREFIX = {"gateway": "LLMESH_GATEWAY_", "router": "LLMESH_ROUTER_", "prefix-cache": "LLMESH_PREFIX_CACHE_",
          "engine": "LLMESH_ENGINE_"}


def _manifest_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.yaml") if p.name not in NOT_RESOURCES and "cert-manager" not in p.parts)


def _validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def _pods(resources: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) of every workload."""
    return [(r, r["spec"]["template"]) for r in resources if r["kind"] in ("Deployment", "StatefulSet")]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> list[dict]:
    return build(ROOT / request.param)


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_file_validates_against_kubernetes_1_31(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        if path.parent.name in ("gpu", "tp"):  # strategic-merge patches: checked once rendered
            continue
        _validate(doc)


def test_rendered_overlays_validate(rendered):
    assert rendered
    for r in rendered:
        _validate(r)
        if r["kind"] not in ("Namespace",):
            assert r["metadata"]["namespace"] == "llmesh", r["metadata"]["name"]


def test_selectors_select_rendered_pods(rendered):
    pods = [t["metadata"]["labels"] for _, t in _pods(rendered)]
    if not pods:
        return  # the autoscaling folder holds no workloads
    for r in rendered:
        kind, name = r["kind"], r["metadata"]["name"]
        selectors = []
        if kind == "Service":
            selectors.append(r["spec"]["selector"])
        elif kind == "PodDisruptionBudget":
            selectors.append(r["spec"]["selector"]["matchLabels"])
        elif kind == "NetworkPolicy":
            if r["spec"]["podSelector"]:
                selectors.append(r["spec"]["podSelector"]["matchLabels"])
            for rule in r["spec"].get("ingress", []):
                selectors += [p["podSelector"]["matchLabels"] for p in rule.get("from", []) if "podSelector" in p]
        elif kind in ("Deployment", "StatefulSet"):
            assert _selects(r["spec"]["selector"]["matchLabels"], r["spec"]["template"]["metadata"]["labels"])
        for s in selectors:
            assert s and any(_selects(s, labels) for labels in pods), f"{kind}/{name}: {s} selects no pod"


def test_only_the_gateway_is_exposed_and_engines_are_headless(rendered):
    services = {r["metadata"]["name"]: r for r in rendered if r["kind"] == "Service"}
    if not services:
        return
    exposed = {n for n, s in services.items() if s["spec"].get("type", "ClusterIP") != "ClusterIP"}
    assert exposed == {"llmesh-gateway"}
    assert {p["name"] for p in services["llmesh-gateway"]["spec"]["ports"]} == {"grpc", "http"}
    for n, s in services.items():
        if n.startswith("llmesh-engine-"):
            assert s["spec"]["clusterIP"] == "None"


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_probes_reach_grpc_health_and_every_variable_is_an_option(rendered):
    for workload, template in _pods(rendered):
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        for c in template["spec"]["containers"]:
            assert {"readinessProbe", "livenessProbe"} <= set(c), f"{c['name']}: probes missing"
            if component == "redis":
                continue
            env, prefix = _env(c), PREFIX[component]
            known = {o.env(component) for o in options(SERVICES[component]).values()}
            ours = {k for k in env if k.startswith("LLMESH_")} - {"LLMESH_REDIS_URL"}
            assert ours <= known, f"{component}: not options of the service: {sorted(ours - known)}"
            main_port = int(env[prefix + "PORT"])
            tls = bool(env.get(prefix + "TLS_CERT"))
            health_port = int(env.get(prefix + "HEALTH_PORT") or 0)
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                if kind not in c:
                    continue
                port = c[kind]["grpc"]["port"]
                # A port with TLS fails kubelet's plaintext gRPC probe: probes use the health port.
                assert port == (health_port if tls else main_port), f"{component} {kind} probes port {port}"
                assert c[kind]["grpc"].get("service", "") in ("", "liveness")
            assert c["livenessProbe"]["grpc"].get("service") == "liveness"
            if component == "engine":
                assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


def test_tls_comes_from_cert_manager_shaped_secrets(rendered):
    certificates = [d for d in yaml.safe_load_all((ROOT / "cert-manager" / "certificates.yaml").read_text()) if d]
    issued = {d["spec"]["secretName"]: d for d in certificates if d["kind"] == "Certificate"}
    services = {r["metadata"]["name"] for r in rendered if r["kind"] == "Service"}
    for _, template in _pods(rendered):
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "redis":
            continue
        c = template["spec"]["containers"][0]
        env, prefix = _env(c), PREFIX[component]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        cert_var = "TLS_CLIENT_CERT" if component == "gateway" else "TLS_CERT"
        key_var = "TLS_CLIENT_KEY" if component == "gateway" else "TLS_KEY"
        files = {env[prefix + cert_var]: "tls.crt", env[prefix + key_var]: "tls.key", env[prefix + "TLS_CA"]: "ca.crt"}
        for path, key in files.items():
            folder, name = path.rsplit("/", 1)
            assert name == key
            secret = volumes[mounts[folder]]["secret"]["secretName"]
            assert secret in issued, f"{component}: {secret} is not issued by cert-manager/certificates.yaml"
            own = [s for s in services if issued[secret]["metadata"]["name"].removeprefix("llmesh-") in s]
            for s in own:
                assert s in issued[secret]["spec"]["dnsNames"]
        if component != "gateway":
            assert env[prefix + "TLS_REQUIRE_CLIENT_CERT"] == "true"
        assert env[prefix + "INTERNAL_SECRET_FILE"].startswith("/etc/llmesh/mesh/")


def test_models_file_discovery_matches_engine_services_and_env(rendered):
    cms = [r for r in rendered if r["kind"] == "ConfigMap" and r["metadata"]["name"] == "llmesh-models"]
    if not cms:
        return
    models = parse_models(yaml.safe_load(cms[0]["data"]["models.yaml"]))
    services = {r["metadata"]["name"]: r for r in rendered if r["kind"] == "Service"}
    pods = _pods(rendered)
    for spec in models.models:
        host, port = parse_discovery(spec.discovery)
        svc = services[host]
        assert svc["spec"]["clusterIP"] == "None" and port in [p["port"] for p in svc["spec"]["ports"]]
        engines = [t for _, t in pods if _selects(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert len(engines) == 1
        env = _env(engines[0]["spec"]["containers"][0])
        assert env["LLMESH_ENGINE_SERVED_MODEL_NAME"] == spec.name and env["LLMESH_ENGINE_MODEL"] == spec.path
        assert int(env["LLMESH_ENGINE_PORT"]) == port
        for key, value in spec.engine.items():
            assert env[f"LLMESH_ENGINE_{key.upper()}"] == str(value)


def test_gpu_overlays_ask_for_gpus_and_tp_matches_them():
    for overlay, gpus in (("overlays/gpu", 1), ("overlays/tp", 4)):
        large = next(r for r in build(ROOT / overlay) if r["metadata"]["name"] == "llmesh-engine-large"
                     and r["kind"] == "Deployment")
        c = large["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert _env(c)["LLMESH_ENGINE_DEVICE"] == "cuda" and large["spec"]["replicas"] == 1
        args = c.get("args", [])
        assert (int(args[args.index("--tensor-parallel-size") + 1]) if args else 1) == gpus
    cpu = build(ROOT / "overlays/cpu")
    assert not any("nvidia.com/gpu" in str(r) for r in cpu)


def test_engine_autoscaling_targets_the_engines_waiting_gauge():
    rules = yaml.safe_load((ROOT / "autoscaling" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    assert NUM_WAITING._name in rules[0]["seriesQuery"] and rules[0]["name"]["as"] == NUM_WAITING._name
    hpas = build(ROOT / "autoscaling")
    base = {r["metadata"]["name"] for r in build(ROOT / "overlays/cpu") if r["kind"] == "Deployment"}
    for h in hpas:
        assert h["spec"]["metrics"][0]["pods"]["metric"]["name"] == NUM_WAITING._name
        assert h["spec"]["scaleTargetRef"]["name"] in base


def test_renderer_strategic_merge_and_refusals(tmp_path):
    base = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "ports": [{"containerPort": 1}]},
                                    {"name": "b"}], "tolerations": [{"key": "t"}], "drop": 1}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "2"}, {"name": "Y", "value": "3"}]}],
                      "tolerations": [{"key": "u"}], "drop": None}}
    out = strategic_merge(base, patch)
    assert out["spec"]["containers"][0]["env"] == [{"name": "X", "value": "2"}, {"name": "Y", "value": "3"}]
    assert out["spec"]["containers"][0]["ports"] == [{"containerPort": 1}]
    assert [c["name"] for c in out["spec"]["containers"]] == ["a", "b"]
    assert out["spec"]["tolerations"] == [{"key": "u"}] and "drop" not in out["spec"]
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="unsupported keys"):
        build(tmp_path)

"""compose.yaml is valid against the Compose Specification, and `llmesh up` starts the same
services with the same settings (the LLMESH_* variables) as compose does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from llmesh.launcher import UpConfig, plan_mesh
from llmesh.models_file import load_models_file

ROOT = Path(__file__).resolve().parents[2]
# Settings that are about where a process listens or is reached, which differ by design
# between containers (0.0.0.0, service names) and local processes (127.0.0.1, ports).
PLACEMENT = ("_HOST", "_PORT", "_ADDRESS", "_PREFIX_INDEX", "_ROUTER", "_REDIS_URL", "_MODELS_FILE", "_DEVICE",
             "_INTERNAL_SECRET_FILE")
# mTLS is compose's alone: `llmesh up` runs on loopback with the mesh secret only.
TLS = ("_TLS_CERT", "_TLS_KEY", "_TLS_CA", "_TLS_REQUIRE_CLIENT_CERT", "_TLS_CLIENT_CERT", "_TLS_CLIENT_KEY")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _schema() -> dict:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the Compose Specification schema ships in docker-compose==1.29.2 (make install adds it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "config" / "compose_spec.json"
    return json.loads(path.read_text())


def test_compose_file_follows_the_compose_specification():
    # The schema names draft 2019-09 by an address jsonschema does not map; pick it explicitly.
    jsonschema.Draft201909Validator(_schema()).validate(_compose())


def test_compose_has_the_topology_of_the_design():
    services = _compose()["services"]
    assert {"redis", "jaeger", "prefix-cache", "engine-small", "engine-large", "router", "gateway"} <= set(services)
    gpu = services["engine-large-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name, svc in services.items():
        if name != "jaeger":
            assert "healthcheck" in svc, f"{name} has no healthcheck"


def _settings(env: dict) -> dict:
    return {k: str(v) for k, v in env.items()
            if k.startswith("LLMESH_") and not k.endswith(PLACEMENT)}


def test_llmesh_up_starts_the_same_services_with_the_same_settings(tmp_path):
    models = load_models_file(ROOT / "deploy" / "models.compose.yaml")
    plan, _ = plan_mesh(UpConfig(), models, tmp_path)
    by_name = {p.name: p for p in plan}
    compose = _compose()["services"]
    pairs = {"prefix-cache": "prefix-cache", "router": "router", "gateway": "gateway",
             "engine-smollm2-135m-0": "engine-small", "engine-large-0": "engine-large"}
    assert set(by_name) == set(pairs) | {"redis"}
    for local, container in pairs.items():
        local_env = by_name[local].env
        container_env = {k: v for k, v in compose[container]["environment"].items() if not k.endswith(TLS)}
        assert set(local_env) == {k for k in container_env if k.startswith("LLMESH_")}, local
        assert _settings(local_env) == _settings(container_env), local
    # engines are reachable at the addresses the models file gives the router
    for m in models.models:
        for i, addr in enumerate(m.addresses):
            env = compose["engine-small" if m.size_class == "small" else "engine-large"]["environment"]
            assert env["LLMESH_ENGINE_ADVERTISE_ADDRESS"] == addr
            assert env["LLMESH_ENGINE_PORT"] == addr.rsplit(":", 1)[1]


def test_redis_is_durable_and_password_protected_in_compose_and_llmesh_up(tmp_path):
    """Both start Redis with an fsync-every-second append-only file on storage that outlives
    the container or process, and every service reaches it with the password."""
    from llmesh.local_redis import LocalRedis

    services = _compose()["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command and "--dir /data" in command
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in _compose()["volumes"]
    assert "requirepass" in command and "--requirepass" not in command  # never on argv
    for name, var in (("gateway", "LLMESH_GATEWAY_REDIS_URL"), ("prefix-cache", "LLMESH_PREFIX_CACHE_REDIS_URL"),
                      ("init", "LLMESH_REDIS_URL")):
        assert "${LLMESH_REDIS_PASSWORD" in services[name]["environment"][var], name

    store = LocalRedis(tmp_path / "data")
    store.write_conf("s3cret")
    conf = store.conf_file.read_text().splitlines()
    assert {"appendonly yes", "appendfsync everysec", 'requirepass "s3cret"'} <= set(conf)
    assert store.conf_file.stat().st_mode & 0o077 == 0
    models = load_models_file(ROOT / "deploy" / "models.compose.yaml")
    plan, _ = plan_mesh(UpConfig(data_dir=str(tmp_path / "data")), models, tmp_path, redis_password="pw")
    by_name = {p.name: p for p in plan}
    assert by_name["redis"].argv[1] == str(store.conf_file)
    assert by_name["gateway"].env["LLMESH_GATEWAY_REDIS_URL"].startswith("redis://:pw@")
    assert by_name["prefix-cache"].env["LLMESH_PREFIX_CACHE_REDIS_URL"].startswith("redis://:pw@")


def test_compose_init_writes_the_admin_key_where_the_gateway_and_readme_have_it():
    services = _compose()["services"]
    init, gateway = services["init"], services["gateway"]
    assert init["restart"] == "no" and init["command"][:3] == ["llmesh", "keys", "create"]
    out = init["command"][init["command"].index("--out") + 1]
    assert "--if-missing" in init["command"]
    assert gateway["depends_on"]["init"] == {"condition": "service_completed_successfully"}
    volume = next(v for v in init["volumes"] if v.endswith(":/var/lib/llmesh"))
    assert f"{volume}:ro" in gateway["volumes"] and out.startswith("/var/lib/llmesh/")
    assert f"docker compose exec gateway cat {out}" in (ROOT / "README.md").read_text()
    # the gateway sees the models folder, so a mounted large model is served and a missing one reported
    assert "./models:/models:ro" in gateway["volumes"]

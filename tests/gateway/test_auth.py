"""API keys at the gateway, as real processes (Redis, engine, router, gateway): the keys
CLI, every way of calling without a valid key refused with the right status, revocation
seen within a second, model lists per key, tiers, keys files, and random requests that
never crash the gateway."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmesh.gateway.keys import new_key, redis_put
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.mesh_helpers import RedisServer, ServiceProcess, start_engine

MODEL = "tiny"
WINDOW = 256
LLMESH = [sys.executable, "-m", "llmesh.cli"]


# ---- helpers shared by the rate-limit and usage tests ---------------------------------------
@contextlib.contextmanager
def engine_and_router(tiny_llama, run_dir, *engine_args: str):
    """A tiny engine behind a router; yields (router address, models file path)."""
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(
            tiny_llama, "--served-model-name", MODEL, "--num-kv-blocks", "128", "--max-model-len", str(WINDOW),
            *engine_args))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": tiny_llama, "size_class": "small", "replicas": 1,
            "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        yield router.address, models_file


def start_gateway(router: str, models_file, *args: str) -> ServiceProcess:
    return ServiceProcess("llmesh.gateway.main", ["--router", router, "--models-file", str(models_file), *args])


def add_key(redis_url: str, **kw) -> tuple[str, str]:
    """(key, key id) of a fresh key registered in Redis."""
    key, record = new_key(kw.pop("tenant", "t1"), **kw)
    redis_put(redis.Redis.from_url(redis_url), record)
    return key, record.key_id


def stub(address: str) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(address))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def generate(address: str, metadata=(), text: str = "hello there", model: str = MODEL, timeout: float = 30,
             **sampling) -> list[common_pb2.GenerateResponse]:
    sampling.setdefault("max_tokens", 2)
    req = inference_pb2.GenerateRequest(model=model, text=text, sampling=common_pb2.SamplingParams(**sampling))
    return list(stub(address).Generate(req, metadata=metadata, timeout=timeout))


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("auth-mesh")
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        router, models_file = stack.enter_context(engine_and_router(tiny_llama, run_dir))
        gateway = stack.enter_context(start_gateway(router, models_file, "--redis-url", redis_server.url))
        yield {"redis": redis_server, "router": router, "models_file": models_file, "gateway": gateway.address,
               "gateway_proc": gateway, "dir": run_dir}


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*LLMESH, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


# ---- tests -------------------------------------------------------------------------------------
def test_keys_cli_create_list_revoke_and_revocation_within_a_second(mesh):
    url, gw = mesh["redis"].url, mesh["gateway"]
    out = _cli("keys", "create", "--tenant", "acme", "--tier", "interactive", "--models", "*", "--rpm", "60",
               "--tpm", "100000", "--concurrency", "4", "--redis", url)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("llm_") and len(key.split("_", 2)) == 3
    key_id = key.split("_")[1]
    stored = redis.Redis.from_url(url).hgetall(f"llmesh:apikey:{key_id}")
    assert key.encode() not in b"".join(stored.values())  # only the hash is stored

    listed = _cli("keys", "list", "--json", "--redis", url)
    assert listed.returncode == 0, listed.stderr
    rows = {r["key_id"]: r for r in json.loads(listed.stdout)}
    assert rows[key_id]["tenant"] == "acme" and rows[key_id]["rpm"] == 60 and not rows[key_id]["revoked"]
    assert key not in listed.stdout and "hash" not in listed.stdout

    assert "".join(c.text for c in generate(gw, bearer(key))) is not None
    assert _cli("keys", "revoke", key_id, "--redis", url).returncode == 0
    time.sleep(1.0)
    code, msg = code_of(lambda: generate(gw, bearer(key)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in msg
    assert key not in mesh["gateway_proc"].log_tail(1 << 22)  # keys are never logged


@pytest.mark.parametrize("metadata, fragment", [
    ((), "missing API key"),
    ((("authorization", "Basic dXNlcjpwYXNz"),), "Bearer scheme"),
    ((("authorization", "Bearer"),), "Bearer scheme"),
    ((("authorization", "Bearer not-a-key"),), "malformed"),
    ((("authorization", "Bearer llm_0123456789ab_" + "x" * 40),), "invalid API key"),
    ((("authorization", "Bearer " + "A" * 4000),), "malformed"),
])
def test_missing_or_malformed_keys_are_unauthenticated(mesh, metadata, fragment):
    code, msg = code_of(lambda: generate(mesh["gateway"], metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED, (code, msg)
    assert fragment in msg
    code, _ = code_of(lambda: stub(mesh["gateway"]).ListModels(inference_pb2.ListModelsRequest(),
                                                                metadata=metadata, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_secret_for_a_real_key_id_and_two_headers_are_refused(mesh):
    key, key_id = add_key(mesh["redis"].url)
    other, _ = add_key(mesh["redis"].url)
    forged = f"llm_{key_id}_{other.split('_', 2)[2]}"
    code, msg = code_of(lambda: generate(mesh["gateway"], bearer(forged)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid" in msg
    code, _ = code_of(lambda: generate(mesh["gateway"], (*bearer(key), *bearer(other))))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_oversized_metadata_is_refused_and_the_gateway_stays_healthy(mesh):
    key, _ = add_key(mesh["redis"].url)
    code, _ = code_of(lambda: generate(mesh["gateway"], (*bearer(key), ("x-padding", "p" * 64_000))))
    assert code != grpc.StatusCode.OK
    assert generate(mesh["gateway"], bearer(key))


def test_models_outside_the_key_are_permission_denied_and_hidden(mesh):
    gw = mesh["gateway"]
    narrow, _ = add_key(mesh["redis"].url, tenant="other", models=["some-other-model"])
    code, msg = code_of(lambda: generate(gw, bearer(narrow)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and MODEL in msg
    code, _ = code_of(lambda: stub(gw).Tokenize(inference_pb2.TokenizeRequest(model=MODEL, text="hi"),
                                                metadata=bearer(narrow), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    listed = stub(gw).ListModels(inference_pb2.ListModelsRequest(), metadata=bearer(narrow), timeout=10)
    assert [m.name for m in listed.models] == []
    wide, _ = add_key(mesh["redis"].url, models=[MODEL])
    listed = stub(gw).ListModels(inference_pb2.ListModelsRequest(), metadata=bearer(wide), timeout=10)
    assert [m.name for m in listed.models] == [MODEL]


def test_bad_numbers_and_max_tokens_past_the_window_are_invalid(mesh):
    key, _ = add_key(mesh["redis"].url)
    for sampling in ({"max_tokens": WINDOW + 1}, {"max_tokens": 2 ** 32 - 1}, {"temperature": -1.0},
                     {"top_k": -5}, {"top_p": -0.5}):
        code, msg = code_of(lambda: generate(mesh["gateway"], bearer(key), **sampling))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (sampling, code, msg)


def test_a_batch_key_cannot_ask_for_interactive_priority(mesh):
    key, _ = add_key(mesh["redis"].url, tier="batch")
    req = inference_pb2.GenerateRequest(model=MODEL, text="hi", priority=common_pb2.PRIORITY_INTERACTIVE,
                                        sampling=common_pb2.SamplingParams(max_tokens=2))
    code, msg = code_of(lambda: list(stub(mesh["gateway"]).Generate(req, metadata=bearer(key), timeout=10)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "batch" in msg
    assert generate(mesh["gateway"], bearer(key))


def test_a_keys_file_gateway_sees_revocations_at_once(mesh):
    path = mesh["dir"] / "keys.json"
    out = _cli("keys", "create", "--tenant", "filed", "--models", MODEL, "--keys-file", str(path))
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and key not in path.read_text()
    with start_gateway(mesh["router"], mesh["models_file"], "--keys-file", str(path)) as gw:
        assert generate(gw.address, bearer(key))
        assert _cli("keys", "revoke", key.split("_")[1], "--keys-file", str(path)).returncode == 0
        code, _ = code_of(lambda: generate(gw.address, bearer(key)))
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_gateway_refuses_to_start_with_auth_and_no_key_store(mesh):
    with pytest.raises(RuntimeError, match="nowhere to find API keys"):
        start_gateway(mesh["router"], mesh["models_file"])


def test_local_admin_key_file_is_private(tmp_path):
    from llmesh.keys_cli import ensure_local_key, local_api_key

    env = dict(os.environ)
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path)
    try:
        key, record = ensure_local_key()
        path = tmp_path / "llmesh" / "api_key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert local_api_key() == key and ensure_local_key()[0] == key
        assert record.key_id in key
    finally:
        os.environ.clear()
        os.environ.update(env)


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
_sampling = st.fixed_dictionaries({}, optional={
    "max_tokens": st.one_of(st.integers(0, 8), st.integers(0, 2 ** 32 - 1)),
    "temperature": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "top_k": st.integers(-(2 ** 31), 2 ** 31 - 1),
    "top_p": st.floats(width=32),
    "min_p": st.floats(width=32),
    "repetition_penalty": st.floats(width=32),
    "seed": st.integers(0, 2 ** 64 - 1),
    "stop": st.lists(_text, max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 2 ** 32 - 1), max_size=3),
    "logprobs": st.integers(0, 2 ** 32 - 1),
    "min_tokens": st.integers(0, 2 ** 32 - 1),
})


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=st.one_of(st.just(MODEL), st.just("auto"), st.just(""), _text), text=_text,
       token_ids=st.one_of(st.none(), st.lists(st.integers(0, 2 ** 32 - 1), max_size=20)),
       sampling=_sampling, priority=st.integers(-3, 5), request_id=_text)
def test_random_generate_requests_never_crash_the_gateway(mesh, model, text, token_ids, sampling, priority,
                                                           request_id):
    if "fuzz_key" not in mesh:
        mesh["fuzz_key"] = add_key(mesh["redis"].url)[0]
    key = mesh["fuzz_key"]
    req = inference_pb2.GenerateRequest(model=model, request_id=request_id, priority=priority,
                                        sampling=common_pb2.SamplingParams(**sampling))
    if token_ids is None:
        req.text = text
    else:
        req.token_ids.ids.extend(token_ids)
    code, msg = code_of(lambda: list(stub(mesh["gateway"]).Generate(req, metadata=bearer(key), timeout=30)))
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE), msg


def test_no_auth_is_an_explicit_choice(mesh):
    with start_gateway(mesh["router"], mesh["models_file"], "--no-auth") as gw:
        assert generate(gw.address)


def test_llmesh_up_plans_auth_unless_told_otherwise(tmp_path):
    from llmesh.launcher import DEMO_MODELS, UpConfig, plan_mesh
    from llmesh.models_file import parse_models

    models = parse_models(DEMO_MODELS, "demo")
    gateway = {p.name: p for p in plan_mesh(UpConfig(), models, tmp_path)[0]}["gateway"]
    assert gateway.env["LLMESH_GATEWAY_AUTH"] == "true" and gateway.env["LLMESH_GATEWAY_REDIS_URL"]
    gateway = {p.name: p for p in plan_mesh(UpConfig(auth=False), models, tmp_path)[0]}["gateway"]
    assert gateway.env["LLMESH_GATEWAY_AUTH"] == "false"

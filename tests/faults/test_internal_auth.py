"""Internal ports need a service credential: a mesh whose services share a secret refuses
every internal call without it (engine Generate/Abort, the index's Forget, the router's
Route/Generate), answers health checks and reflection to anyone, and still serves end to
end; tenants' cache salts are keyed by the secret, so a forged salt finds nothing; and
with mTLS (``llmesh certs``) a client without a certificate is refused."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from llmesh.certs import write_certs
from llmesh.engine.text.loading import load_tokenizer
from llmesh.health import wait_serving
from llmesh.mesh_secret import METADATA_KEY, cache_salt, read_secret
from llmesh.prefix_hash import hash_prefix_blocks
from llmesh.v1 import (
    common_pb2,
    engine_pb2,
    engine_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    prefix_index_pb2,
    prefix_index_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.faults._auth_helpers import BLOCK_SIZE, MODEL, secure_mesh
from tests.mesh_helpers import RedisServer, ServiceProcess

PROMPT = "the quick brown fox jumps over the lazy dog and keeps running far away from the farm"
TIMEOUT = 30
LLMESH = [sys.executable, "-m", "llmesh.cli"]


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    with secure_mesh(tiny_llama, tmp_path_factory.mktemp("auth-mesh")) as m:
        yield m


@pytest.fixture(scope="module")
def prompt_ids(tiny_llama) -> list[int]:
    ids = load_tokenizer(tiny_llama).encode(PROMPT)
    assert len(ids) >= 2 * BLOCK_SIZE, "the prompt must fill at least two blocks"
    return ids


def _greedy(n: int = 2) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _calls(mesh, prompt_ids):
    """Each internal RPC under test: (service, method, call(metadata))."""
    engine = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engine.address))
    index = prefix_index_pb2_grpc.PrefixIndexStub(grpc.insecure_channel(mesh.index.address))
    router = router_pb2_grpc.RouterStub(grpc.insecure_channel(mesh.router.address))
    route = router_pb2.RouteRequest(request_id="probe", model=MODEL, prompt_token_ids=prompt_ids, sampling=_greedy())
    return {
        "engine Generate": lambda md: list(engine.Generate(engine_pb2.EngineGenerateRequest(
            request_id="probe", prompt_token_ids=prompt_ids, sampling=_greedy()), metadata=md, timeout=TIMEOUT)),
        "engine Abort": lambda md: engine.Abort(engine_pb2.AbortRequest(request_id="probe"), metadata=md,
                                                timeout=TIMEOUT),
        "index Forget": lambda md: index.Forget(prefix_index_pb2.ForgetRequest(instance_id="tiny-0"), metadata=md,
                                                timeout=TIMEOUT),
        "router Route": lambda md: router.Route(route, metadata=md, timeout=TIMEOUT),
        "router Generate": lambda md: list(router.Generate(route, metadata=md, timeout=TIMEOUT)),
    }


def _gateway_generate(mesh, key: str, ids: list[int], request_id: str) -> list[common_pb2.GenerateResponse]:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.gateways["direct"].address))
    req = inference_pb2.GenerateRequest(model=MODEL, token_ids=router_pb2.TokenIds(ids=ids), request_id=request_id,
                                        sampling=_greedy())
    return list(stub.Generate(req, metadata=[("authorization", f"Bearer {mesh.keys[key]}")], timeout=TIMEOUT))


def _matched_blocks(mesh, ids: list[int], salt: str | None) -> int:
    index = prefix_index_pb2_grpc.PrefixIndexStub(grpc.insecure_channel(mesh.index.address))
    resp = index.Match(prefix_index_pb2.MatchRequest(
        namespace=MODEL, block_hashes=hash_prefix_blocks(ids, BLOCK_SIZE, MODEL, salt=salt)),
        metadata=mesh.credential(), timeout=TIMEOUT)
    return max((r.matched_blocks for r in resp.replicas if r.instance_id == "tiny-0"), default=0)


def _wait_matched(mesh, ids: list[int], salt: str, blocks: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (got := _matched_blocks(mesh, ids, salt)) < blocks:
        assert time.monotonic() < deadline, f"the index matched {got} blocks, not {blocks}"
        time.sleep(0.05)


CALLS = ["engine Generate", "engine Abort", "index Forget", "router Route", "router Generate"]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("credential", ["missing", "wrong"])
def test_internal_call_without_the_mesh_secret_is_unauthenticated(mesh, prompt_ids, call, credential):
    metadata = [] if credential == "missing" else [(METADATA_KEY, "x" * 64)]
    with pytest.raises(grpc.RpcError) as e:
        _calls(mesh, prompt_ids)[call](metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
    service = call.split()[0].replace("index", "prefix-cache")
    assert e.value.details().startswith(f"{service}: ") and METADATA_KEY in e.value.details()
    assert ("no service credential" if credential == "missing" else "a wrong service credential") in e.value.details()
    assert mesh.secret not in e.value.details()


def test_refused_forget_leaves_the_engines_blocks_in_the_index(mesh, prompt_ids):
    _gateway_generate(mesh, "a", prompt_ids, "before-forget")
    salt = cache_salt(mesh.secret.encode(), "team-a")
    _wait_matched(mesh, prompt_ids, salt, len(prompt_ids) // BLOCK_SIZE)
    with pytest.raises(grpc.RpcError):
        _calls(mesh, prompt_ids)["index Forget"]([])
    assert _matched_blocks(mesh, prompt_ids, salt) == len(prompt_ids) // BLOCK_SIZE


def test_health_checks_and_reflection_answer_without_a_credential(mesh):
    for proc in (mesh.index, mesh.engine, mesh.router):
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(proc.address))
        resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, proc.address
    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(mesh.engine.address))
    assert "llmesh.v1.Engine" in set(db.get_services())


def test_the_mesh_serves_end_to_end_with_the_credential(mesh, prompt_ids):
    """Gateway → router → engine → index all present the secret: a stream completes, the
    index holds the engine's blocks under the secret-keyed salt (the hashes the router
    matches with the same salt), the router routes, and a second request hits the cache."""
    first = _gateway_generate(mesh, "b", prompt_ids, "e2e-1")
    assert sum(len(m.token_ids) for m in first) == 2 and first[-1].finish_reason
    salt = cache_salt(mesh.secret.encode(), "team-b")
    _wait_matched(mesh, prompt_ids, salt, len(prompt_ids) // BLOCK_SIZE)
    assert _matched_blocks(mesh, prompt_ids, "team-b") == 0, "the index must not hold the tenant's name as salt"
    router = router_pb2_grpc.RouterStub(grpc.insecure_channel(mesh.router.address))
    decision = router.Route(router_pb2.RouteRequest(request_id="e2e-route", model=MODEL, prompt_token_ids=prompt_ids,
                                                    sampling=_greedy(), cache_salt=salt),
                            metadata=mesh.credential(), timeout=TIMEOUT)
    assert [c.replica for c in decision.target.candidates] == ["tiny-0"]
    second = _gateway_generate(mesh, "b", prompt_ids, "e2e-2")
    assert second[-1].usage.cached_tokens >= BLOCK_SIZE


def test_a_forged_cache_salt_gets_no_prefix_hits(mesh, prompt_ids):
    """Tenant team-a's prompt is cached; an internal caller naming the tenant as salt finds
    none of it, while the secret-keyed salt (the gateway's) does."""
    ids = [*prompt_ids[:BLOCK_SIZE], *reversed(prompt_ids[BLOCK_SIZE:])]  # a prefix no other test caches
    _gateway_generate(mesh, "a", ids, "salted")
    engine = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engine.address))

    def cached_with(salt: str) -> int:
        out = list(engine.Generate(engine_pb2.EngineGenerateRequest(
            request_id=f"forged-{salt[:8]}-{time.monotonic_ns()}", prompt_token_ids=ids, sampling=_greedy(),
            cache_salt=salt), metadata=mesh.credential(), timeout=TIMEOUT))
        return out[-1].usage.cached_tokens

    assert cached_with("team-a") == 0
    assert cached_with("") == 0
    assert cached_with(cache_salt(mesh.secret.encode(), "team-a")) >= BLOCK_SIZE


def test_the_gateway_takes_api_keys_not_the_mesh_secret(mesh, prompt_ids):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.gateways["direct"].address))
    req = inference_pb2.GenerateRequest(model=MODEL, text="hello", sampling=_greedy())
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, metadata=mesh.credential(), timeout=TIMEOUT))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in e.value.details()


def test_llmesh_up_gives_every_service_the_secret_file_never_the_secret(tmp_path):
    from llmesh.launcher import Mesh, UpConfig

    mesh = Mesh(UpConfig(run_dir=str(tmp_path)), quiet=True)
    secret = read_secret(tmp_path / "mesh.secret").decode()
    assert (tmp_path / "mesh.secret").stat().st_mode & 0o077 == 0
    for spec in mesh.plan:
        if spec.grpc:
            files = [v for k, v in spec.env.items() if k.endswith("_INTERNAL_SECRET_FILE")]
            assert files == [str(tmp_path / "mesh.secret")], spec.name
        assert all(secret not in x for x in [*spec.argv, *spec.env.values()]), spec.name


# ---- mTLS ----------------------------------------------------------------------------------
def test_mtls_refuses_a_client_without_a_certificate(tmp_path):
    """``llmesh certs`` makes the CA, certificates and secret; an index requiring client
    certificates refuses a client that verifies the server but shows no certificate, and
    answers one that shows its certificate (and the secret)."""
    certs = tmp_path / "certs"
    out = subprocess.run([*LLMESH, "certs", "--out", str(certs), "prefix-cache", "router"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (certs / "router.key").stat().st_mode & 0o077 == 0
    env = {"LLMESH_PREFIX_CACHE_TLS_CERT": str(certs / "prefix-cache.pem"),
           "LLMESH_PREFIX_CACHE_TLS_KEY": str(certs / "prefix-cache.key"),
           "LLMESH_PREFIX_CACHE_TLS_CA": str(certs / "ca.pem"),
           "LLMESH_PREFIX_CACHE_TLS_REQUIRE_CLIENT_CERT": "true",
           "LLMESH_PREFIX_CACHE_INTERNAL_SECRET_FILE": str(certs / "mesh.secret")}

    with RedisServer() as redis, ServiceProcess(
            "llmesh.prefix_cache.main", ["--redis-url", redis.url], env=env, ready_timeout=60) as index:
        read = lambda name: (certs / name).read_bytes()  # noqa: E731
        match = prefix_index_pb2.MatchRequest(namespace=MODEL, block_hashes=[1, 2])
        secret = [(METADATA_KEY, read_secret(certs / "mesh.secret").decode())]
        no_cert = grpc.secure_channel(index.address, grpc.ssl_channel_credentials(read("ca.pem")))
        with pytest.raises(grpc.RpcError) as e:
            prefix_index_pb2_grpc.PrefixIndexStub(no_cert).Match(match, metadata=secret, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.secure_channel(index.address, grpc.ssl_channel_credentials(
            read("ca.pem"), read("router.key"), read("router.pem")))
        stub = prefix_index_pb2_grpc.PrefixIndexStub(with_cert)
        assert stub.Match(match, metadata=secret, timeout=10).replicas == []
        with pytest.raises(grpc.RpcError) as e:
            stub.Match(match, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health checks stay open to the secret, not to mTLS: a probe shows a certificate.
        health = subprocess.run([*LLMESH, "health", index.address, "--timeout", "5", "--tls-ca", str(certs / "ca.pem"),
                                 "--tls-cert", str(certs / "router.pem"), "--tls-key", str(certs / "router.key")],
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stderr
        with pytest.raises(TimeoutError):
            wait_serving(index.address, timeout=1, credentials=grpc.ssl_channel_credentials(read("ca.pem")))


def test_llmesh_certs_keeps_what_exists_and_adds_what_is_missing(tmp_path):
    assert write_certs(tmp_path, ["router"]) == ["ca.pem", "ca.key", "router.pem", "router.key", "mesh.secret"]
    ca, secret = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "mesh.secret").read_bytes()
    assert write_certs(tmp_path, ["router", "gateway=gw.example.internal"]) == ["gateway.pem", "gateway.key"]
    assert (tmp_path / "ca.pem").read_bytes() == ca and (tmp_path / "mesh.secret").read_bytes() == secret
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "gateway.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"gateway", "localhost", "gw.example.internal"} <= set(names.get_values_for_type(x509.DNSName))
    with pytest.raises(ValueError, match="lower-case"):
        write_certs(tmp_path, ["Bad_Name"])


def test_compose_internal_services_use_mtls_and_the_secret():
    from pathlib import Path

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "compose.yaml").read_text())["services"]
    assert "llmesh certs" in " ".join(compose["certs"]["command"])
    for name, prefix in (("prefix-cache", "PREFIX_CACHE"), ("engine-small", "ENGINE"), ("engine-large", "ENGINE"),
                         ("engine-large-gpu", "ENGINE"), ("router", "ROUTER")):
        env = compose[name]["environment"]
        assert env[f"LLMESH_{prefix}_TLS_REQUIRE_CLIENT_CERT"] == "true", name
        assert env[f"LLMESH_{prefix}_INTERNAL_SECRET_FILE"] == "/certs/mesh.secret", name
        assert "--tls-cert" in compose[name]["healthcheck"]["test"], name
        assert "certs:/certs:ro" in compose[name]["volumes"], name
    gateway = compose["gateway"]["environment"]
    assert "LLMESH_GATEWAY_TLS_CERT" not in gateway, "the public port stays plaintext, API-key authenticated"
    assert gateway["LLMESH_GATEWAY_TLS_CLIENT_CERT"] == "/certs/gateway.pem"

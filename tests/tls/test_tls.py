"""TLS on a service's port and mTLS between services, with certificates the test makes."""

from __future__ import annotations

import grpc
import pytest

from llmesh.v1 import engine_pb2, engine_pb2_grpc
from tests.mesh_helpers import start_engine
from tests.tls_certs import make_ca, make_leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder)
    return ca, make_leaf(folder, "engine"), make_leaf(folder, "router")


def _info(address: str, creds: grpc.ChannelCredentials | None):
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    with channel:
        return engine_pb2_grpc.EngineStub(channel).Info(engine_pb2.InfoRequest(), timeout=5)


def test_mtls_engine_accepts_only_clients_with_a_certificate(tiny_llama, pki):
    ca, engine, router = pki
    read = lambda p: open(p, "rb").read()  # noqa: E731
    with start_engine(tiny_llama, "--num-kv-blocks", "16", "--tls-cert", engine.cert, "--tls-key", engine.key,
                      "--tls-ca", ca, "--tls-require-client-cert", "true") as proc:
        address = f"localhost:{proc.address.rsplit(':', 1)[1]}"
        with_cert = grpc.ssl_channel_credentials(read(ca), read(router.key), read(router.cert))
        assert _info(address, with_cert).block_size == 16
        for creds in (grpc.ssl_channel_credentials(read(ca)), None):  # no client certificate / plaintext
            with pytest.raises(grpc.RpcError) as e:
                _info(address, creds)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_whole_chain_over_tls_and_mtls(tiny_llama, pki, tmp_path):
    """client —TLS→ gateway —mTLS→ router —mTLS→ engine; a plaintext client is refused."""
    import yaml

    from llmesh.client import LlmeshClient
    from tests.mesh_helpers import ServiceProcess

    ca, engine_id, router_id = pki
    tls = lambda leaf, mutual: ["--tls-cert", leaf.cert, "--tls-key", leaf.key, "--tls-ca", ca,  # noqa: E731
                                "--tls-require-client-cert", "true" if mutual else "false"]
    with start_engine(tiny_llama, "--num-kv-blocks", "32", *tls(engine_id, True)) as engine:
        models = tmp_path / "models.yaml"
        models.write_text(yaml.safe_dump({"models": [{"name": "llama", "path": tiny_llama,
                                                      "addresses": [engine.address]}]}))
        with ServiceProcess("llmesh.router.main", ["--models-file", str(models), *tls(router_id, True)]) as router, \
                ServiceProcess("llmesh.gateway.main", ["--router", router.address, "--models-file", str(models),
                                                       "--auth", "false", *tls(router_id, False)]) as gateway:
            with LlmeshClient(gateway.address, tls_ca=ca, timeout=60) as client:
                chunks = list(client.generate([5, 6, 7, 8], model="llama", max_tokens=4, temperature=0.0,
                                              ignore_eos=True))
            assert sum(len(c.token_ids) for c in chunks) == 4
            with LlmeshClient(gateway.address, timeout=10) as plain, pytest.raises(grpc.RpcError) as e:
                plain.list_models()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

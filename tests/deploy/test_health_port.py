"""The plaintext health port that Kubernetes' gRPC probes use (deploy/k8s).

A prefix-cache index serving mTLS only, whose Redis is down: its TLS port refuses a
plaintext probe, while its health port answers it: NOT_SERVING overall (not ready: no
Redis) yet SERVING for ``liveness`` (alive: not to be restarted).
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.grpc_server import LIVENESS
from tests.mesh_helpers import ServiceProcess, free_port
from tests.tls_certs import make_ca, make_leaf


def _check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_port_answers_plaintext_probes_of_an_mtls_service(tmp_path):
    ca = make_ca(tmp_path)
    leaf = make_leaf(tmp_path, "prefix-cache")
    health_port = free_port()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    with ServiceProcess("llmesh.prefix_cache.main", [
            "--redis-url", dead_redis, "--redis-check-interval-s", "0.2", "--redis-timeout-s", "0.5",
            "--tls-cert", leaf.cert, "--tls-key", leaf.key, "--tls-ca", ca, "--tls-require-client-cert", "true",
            "--health-port", str(health_port)], ready_timeout=60) as proc:
        probe = f"127.0.0.1:{health_port}"
        assert _check(probe, LIVENESS) == health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + 10  # the first Redis check fails within about a second
        while _check(probe) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "readiness never followed the dead Redis"
            time.sleep(0.1)
        assert _check(probe, LIVENESS) == health_pb2.HealthCheckResponse.SERVING
        try:
            _check(proc.address)
            raise AssertionError("the mTLS port answered a plaintext probe")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE

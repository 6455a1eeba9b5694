"""Client-side health helpers (grpc.health.v1)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_serving(address: str, timeout: float = 30, service: str = "",
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """Poll Check on ``address`` until it reports SERVING; TimeoutError with the last answer.
    ``credentials``: TLS (with a client certificate for a service that requires mTLS)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with (grpc.secure_channel(address, credentials) if credentials is not None
          else grpc.insecure_channel(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(0.05)
    raise TimeoutError(f"{address} not SERVING within {timeout}s (last: {last})")

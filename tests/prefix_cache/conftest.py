"""A real redis-server and a real prefix-cache index process, shared by a test module."""

from __future__ import annotations

import grpc
import pytest

from llmesh.v1 import prefix_index_pb2_grpc
from tests.mesh_helpers import RedisServer, start_prefix_index


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as r:
        yield r


@pytest.fixture(scope="module")
def index_proc(redis_server):
    with start_prefix_index(redis_server.url, "--sweep-interval-s", "0.5") as proc:
        yield proc


@pytest.fixture(scope="module")
def index_stub(index_proc):
    with grpc.insecure_channel(index_proc.address) as channel:
        yield prefix_index_pb2_grpc.PrefixIndexStub(channel)

"""A real engine process serving a tiny Mixtral: Info reports its experts, and after a request
llmesh_engine_expert_tokens_total adds up to every token fed times top-k times the sparse layers."""

from __future__ import annotations

import grpc
import pytest

from llmesh.v1 import engine_pb2, engine_pb2_grpc
from tests.engine_service.test_engine_metrics import PROMPT, Scraper, _request
from tests.fixtures.tiny_models import build_tiny_model
from tests.mesh_helpers import free_port, start_engine

METRIC = "llmesh_engine_expert_tokens_total"


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-mixtral") / "mixtral"), "mixtral")


def test_expert_token_counters_add_up(tiny_mixtral):
    port = free_port()
    with start_engine(tiny_mixtral, "--max-model-len", "512", "--metrics-port", str(port)) as proc:
        stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(proc.address))
        info = stub.Info(engine_pb2.InfoRequest(), timeout=10)
        assert (info.num_experts, info.num_experts_per_tok) == (8, 2)
        model = info.model
        scraper = Scraper(port)
        max_tokens = 6
        list(stub.Generate(_request("moe-0", max_tokens=max_tokens), timeout=60))
        fed = len(PROMPT) + max_tokens - 1  # the last token is sampled, never fed back
        expected = fed * 2 * 2  # top-2, both layers sparse
        total = scraper.wait_for(METRIC, lambda v: v >= expected, timeout=20, model=model)
        assert total == expected
        samples = scraper.samples()
        labels = {dict(lab)["expert"] for (name, lab), _ in samples.items() if name == METRIC}
        assert labels == {f"{layer}.{e}" for layer in (0, 1) for e in range(8)}
        per_layer = [scraper.value(METRIC, samples, model=model, expert=f"0.{e}") for e in range(8)]
        assert sum(per_layer) == fed * 2

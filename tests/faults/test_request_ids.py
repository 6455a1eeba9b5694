"""Request ids are per API key: two tenants sending the same request_id at once are both
served, each under its own id; a key reusing one of its live ids is refused with
ALREADY_EXISTS and learns nothing about other tenants; ids come free again when a stream
ends or is cancelled (which still frees the engine). Both routing modes: the gateway
streaming from the engine (direct) and through the router (proxy)."""

from __future__ import annotations

import time

import grpc
import pytest

from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.faults._auth_helpers import MODEL, secure_mesh

TIMEOUT = 30
STEP_DELAY_S = 0.02
"""Every engine step sleeps this long, so a 24-token stream stays live for half a second or more."""


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    with secure_mesh(tiny_llama, tmp_path_factory.mktemp("ids-mesh"), step_delay_s=STEP_DELAY_S,
                     modes=("direct", "proxy")) as m:
        yield m


def _open(mesh, mode: str, key: str, request_id: str, max_tokens: int = 24):
    """A started stream and its first message (so it is live on the engine)."""
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.gateways[mode].address))
    req = inference_pb2.GenerateRequest(model=MODEL, text="tell me a long story about ids", request_id=request_id,
                                        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                           ignore_eos=True))
    call = stub.Generate(req, metadata=[("authorization", f"Bearer {mesh.keys[key]}")], timeout=TIMEOUT)
    return call, next(call)


def _rest(call, first) -> list[common_pb2.GenerateResponse]:
    return [first, *call]


def _engine_idle(mesh, within_s: float) -> None:
    stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engine.address))
    deadline = time.monotonic() + within_s
    while True:
        load = stub.Load(engine_pb2.LoadRequest(), metadata=mesh.credential(), timeout=5)
        if load.num_running == 0 and load.num_waiting == 0 and load.kv_blocks_used == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {load}"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["direct", "proxy"])
def test_two_tenants_with_the_same_request_id_at_once_are_both_served_under_their_own_id(mesh, mode):
    rid = f"shared-{mode}"
    call_a, first_a = _open(mesh, mode, "a", rid)
    call_b, first_b = _open(mesh, mode, "b", rid)
    assert first_a.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED, "the streams must overlap"
    out_a, out_b = _rest(call_a, first_a), _rest(call_b, first_b)
    for out in (out_a, out_b):
        assert {m.request_id for m in out} == {rid}
        assert sum(len(m.token_ids) for m in out) == 24 and out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    usage_a = mesh.usage_of(mode, mesh.key_ids["a"], rid)
    usage_b = mesh.usage_of(mode, mesh.key_ids["b"], rid)
    assert usage_a["status"] == usage_b["status"] == "OK"
    assert usage_a["engine_request_id"].startswith(mesh.key_ids["a"] + "-")
    assert usage_b["engine_request_id"].startswith(mesh.key_ids["b"] + "-")
    assert rid not in usage_a["engine_request_id"] + usage_b["engine_request_id"]


@pytest.mark.parametrize("mode", ["direct", "proxy"])
def test_a_key_reusing_its_live_request_id_is_refused_without_learning_other_tenants_ids(mesh, mode):
    rid = f"dup-{mode}"
    call_a, first_a = _open(mesh, mode, "a", rid)
    call_b, first_b = _open(mesh, mode, "b", "b-private-id")
    call_a2, first_a2 = _open(mesh, mode, "a2", rid)  # the same tenant's other key has its own ids
    with pytest.raises(grpc.RpcError) as e:
        _open(mesh, mode, "a", rid)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    message = e.value.details()
    assert repr(rid) in message and "this API key" in message
    for secret_bit in ("b-private-id", mesh.key_ids["b"], mesh.key_ids["a2"], "team-b"):
        assert secret_bit not in message
    # A tenant probing another tenant's live id learns nothing: it is simply served.
    probe, first_probe = _open(mesh, mode, "a", "b-private-id", max_tokens=2)
    assert [m.request_id for m in _rest(probe, first_probe)][-1] == "b-private-id"
    for call, first in ((call_a, first_a), (call_b, first_b), (call_a2, first_a2)):
        assert _rest(call, first)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    again, first_again = _open(mesh, mode, "a", rid, max_tokens=2)  # free once its stream ended
    assert _rest(again, first_again)[-1].request_id == rid


def test_a_cancelled_request_frees_the_engine_and_its_id(mesh):
    call, _ = _open(mesh, "direct", "a", "cancel-me", max_tokens=200)
    call.cancel()
    _engine_idle(mesh, within_s=5)
    assert mesh.usage_of("direct", mesh.key_ids["a"], "cancel-me")["status"] == "CANCELLED"
    again, first = _open(mesh, "direct", "a", "cancel-me", max_tokens=2)
    assert _rest(again, first)[-1].request_id == "cancel-me"


def test_requests_without_an_id_get_a_fresh_one_each(mesh):
    ids = set()
    for _ in range(2):
        call, first = _open(mesh, "direct", "a", "", max_tokens=2)
        out = _rest(call, first)
        assert len({m.request_id for m in out}) == 1 and out[0].request_id
        ids.add(out[0].request_id)
    assert len(ids) == 2

"""The engine as a real gRPC process: streaming, Info/Load/Abort, cancellation, health
that tells the truth about a stalled step loop, reflection and graceful shutdown."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from llmesh.engine import LLM, SamplingParams
from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.mesh_helpers import start_engine

PROMPT = [5, 17, 99, 23, 42, 7, 300, 12, 64, 128, 256, 33, 91, 18, 44, 71, 3, 250]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    # A step takes at least 5 ms, so a 400-token request outlives the 0.3 s deadline and the
    # cancel/abort calls of the tests below: the tiny model alone decodes 400 tokens in well
    # under 0.3 s on a fast host (a clean-clone run saw the deadline test's stream complete).
    with start_engine(tiny_llama, "--num-kv-blocks", "64", "--max-model-len", "512",
                      "--fault-step-delay-s", "0.005") as proc:
        yield proc


def _stub(address: str) -> engine_pb2_grpc.EngineStub:
    return engine_pb2_grpc.EngineStub(grpc.insecure_channel(address))


def _request(rid: str, max_tokens: int = 12, **kw) -> engine_pb2.EngineGenerateRequest:
    return engine_pb2.EngineGenerateRequest(
        request_id=rid, prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw))


def _wait_idle(stub, timeout: float = 2.0) -> engine_pb2.LoadResponse:
    deadline = time.monotonic() + timeout
    while True:
        load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
        if (load.kv_blocks_used == 0 and load.num_running == 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.01)


def test_stream_equals_in_process_engine(engine, tiny_llama):
    chunks = list(_stub(engine.address).Generate(_request("eq"), timeout=30))
    ref = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=64).generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert "".join(c.text for c in chunks) == ref.text
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 12)
    assert last.replica and all(c.finish_reason == 0 for c in chunks[:-1])


def test_info_and_load(engine):
    stub = _stub(engine.address)
    info = stub.Info(engine_pb2.InfoRequest(), timeout=5)
    assert info.block_size == 16 and info.max_model_len == 512 and info.prefix_caching
    assert info.hash_algorithm == "blake2b-64" and info.kv_blocks_total == 64 and info.vocab_size == 512
    assert info.instance_id.endswith(engine.address)
    assert info.kv_cache_dtype == info.dtype == "float32"  # kv_cache_dtype auto: the model dtype
    load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
    assert load.kv_blocks_total == 64


def test_bad_request_is_invalid_argument_and_process_stays_healthy(engine):
    stub = _stub(engine.address)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(_request("bad", top_p=2.0), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(engine_pb2.EngineGenerateRequest(request_id="long", prompt_token_ids=[5] * 600),
                           timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "512" in e.value.details()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(engine.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_cancel_frees_blocks(engine):
    stub = _stub(engine.address)
    for attempt in range(3):
        call = stub.Generate(_request(f"cancel-{attempt}", max_tokens=400), timeout=60)
        next(call)
        if stub.Load(engine_pb2.LoadRequest(), timeout=5).kv_blocks_used > 0:
            break
        # The tiny model can finish 400 tokens before a client on a loaded machine asks: then
        # there is nothing left to cancel, so try again.
        call.cancel()
        _wait_idle(stub)
    else:
        pytest.fail("the request finished before Load saw it, three times")
    call.cancel()
    load = _wait_idle(stub)
    assert load.kv_blocks_used == 0 and load.num_running == 0


def test_deadline_frees_blocks(engine):
    stub = _stub(engine.address)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(_request("deadline", max_tokens=400), timeout=0.3))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    load = _wait_idle(stub)
    assert load.kv_blocks_used == 0 and load.num_running == 0


def test_abort_reports_found_and_freed(engine):
    stub = _stub(engine.address)
    call = stub.Generate(_request("abort-me", max_tokens=400), timeout=60)
    next(call)
    resp = stub.Abort(engine_pb2.AbortRequest(request_id="abort-me"), timeout=5)
    assert resp.found and resp.freed_blocks >= 2
    rest = list(call)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert not stub.Abort(engine_pb2.AbortRequest(request_id="abort-me"), timeout=5).found


def test_reflection_lists_services(engine):
    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(engine.address))
    services = set(db.get_services())
    assert {"llmesh.v1.Engine", "grpc.health.v1.Health"} <= services


def test_health_reports_a_stalled_step_loop(tiny_llama):
    with start_engine(tiny_llama, "--num-kv-blocks", "64", "--stall-timeout-s", "0.5",
                      "--fault-step-delay-s", "2.0") as proc:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(proc.address))
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
        call = _stub(proc.address).Generate(_request("slow", max_tokens=2), timeout=60)
        statuses = []
        reader = threading.Thread(target=lambda: list(call))
        reader.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and reader.is_alive():
            statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
            time.sleep(0.1)
        reader.join()
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != serving:
            assert time.monotonic() < deadline, "health did not recover after the stall"
            time.sleep(0.1)


def test_graceful_shutdown_lets_streams_finish(tiny_llama):
    proc = start_engine(tiny_llama, "--num-kv-blocks", "64", "--grace-period-s", "20")
    with proc:
        call = _stub(proc.address).Generate(_request("drain", max_tokens=40), timeout=60)
        next(call)
        proc._proc.send_signal(signal.SIGTERM)
        rest = list(call)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert proc._proc.wait(timeout=30) == 0, proc.log_tail()
        # Stopping the core on shutdown is not a core failure: no fresh core is started.
        assert "fresh core" not in proc.log_tail(20000), proc.log_tail()


def test_speculating_engine_reports_its_config_and_serves_both_ways(tiny_llama):
    with start_engine(tiny_llama, "--num-kv-blocks", "64", "--speculative-method", "ngram",
                      "--num-speculative-tokens", "3", "--prompt-lookup-max", "3") as proc:
        stub = _stub(proc.address)
        info = stub.Info(engine_pb2.InfoRequest(), timeout=10)
        assert (info.speculative_method, info.num_speculative_tokens, info.prompt_lookup_max,
                info.prompt_lookup_min) == ("ngram", 3, 3, 1)
        on = [t for m in stub.Generate(_request("spec-on", 20), timeout=60) for t in m.token_ids]
        off = [t for m in stub.Generate(_request("spec-off", 20, speculative=False), timeout=60) for t in m.token_ids]
        assert on == off and len(on) == 20
        assert _wait_idle(stub).kv_blocks_used == 0


def test_fp8_kv_engine_reports_it_and_serves_as_in_process(tiny_llama):
    """vLLM's spelling fp8_e4m3 on the command line; Info names the pool's type as "fp8"."""
    with start_engine(tiny_llama, "--num-kv-blocks", "64", "--kv-cache-dtype", "fp8_e4m3") as proc:
        stub = _stub(proc.address)
        info = stub.Info(engine_pb2.InfoRequest(), timeout=10)
        assert (info.kv_cache_dtype, info.dtype) == ("fp8", "float32")
        got = [t for m in stub.Generate(_request("fp8", 8), timeout=60) for t in m.token_ids]
        ref = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=64, kv_cache_dtype="fp8").generate(
            [PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
        assert got == ref.token_ids
        assert _wait_idle(stub).kv_blocks_used == 0

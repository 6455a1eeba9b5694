"""The engine's core process failing under a real gRPC engine: in-flight streams end at once
with UNAVAILABLE naming the engine, health turns NOT_SERVING, new calls are refused; and a
stopped engine leaves no core process behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.mesh_helpers import start_engine

PROMPT = [5, 17, 99, 23, 42, 7, 300, 12, 64, 128]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _core_pid(engine_pid: int) -> int:
    """The engine's core process: its spawned child (multiprocessing's resource tracker,
    the other child, is left alone)."""
    cores = []
    for task in os.listdir(f"/proc/{engine_pid}/task"):
        with open(f"/proc/{engine_pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"spawn_main" in c.read():
                        cores.append(int(child))
    assert len(cores) == 1, f"expected one engine-core process, found {cores}"
    return cores[0]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _request(rid: str, max_tokens: int = 400) -> engine_pb2.EngineGenerateRequest:
    return engine_pb2.EngineGenerateRequest(
        request_id=rid, prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def _health(address: str) -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _wait_not_serving(address: str, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while _health(address) != NOT_SERVING:
        assert time.monotonic() < deadline, "health still SERVING after the core died"
        time.sleep(0.02)


def _drain(call, errors: list) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        errors.append((e, time.monotonic()))


def _start_streams(address: str, n: int):
    stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(address))
    calls = [stub.Generate(_request(f"r{i}"), timeout=60) for i in range(n)]
    for c in calls:
        next(c)  # every stream is live and producing
    errors: list = []
    readers = [threading.Thread(target=_drain, args=(c, errors)) for c in calls]
    for r in readers:
        r.start()
    return stub, readers, errors


def _assert_unavailable(errors, n, t0, address, words):
    assert len(errors) == n
    for e, t in errors:
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert address in e.details() and words in e.details(), e.details()
        assert t - t0 < 1.0, f"a stream took {t - t0:.2f}s to end"


def test_killed_core(tiny_llama):
    with start_engine(tiny_llama, "--num-kv-blocks", "64", "--max-model-len", "512") as proc:
        core = _core_pid(proc.pid)
        stub, readers, errors = _start_streams(proc.address, 3)
        t0 = time.monotonic()
        os.kill(core, signal.SIGKILL)
        for r in readers:
            r.join(10)
        _assert_unavailable(errors, 3, t0, proc.address, "killed by SIGKILL")
        _wait_not_serving(proc.address)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(_request("late", 4), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "SIGKILL" in e.value.details()
        assert stub.Info(engine_pb2.InfoRequest(), timeout=5).model  # the process itself still answers


def test_failing_step(tiny_llama):
    with start_engine(tiny_llama, "--num-kv-blocks", "64", "--fault-fail-step-at", "30") as proc:
        core = _core_pid(proc.pid)
        stub, readers, errors = _start_streams(proc.address, 2)
        t0 = time.monotonic()
        for r in readers:
            r.join(30)
        assert len(errors) == 2
        first = min(t for _, t in errors)
        _assert_unavailable(errors, 2, first, proc.address, "step failed")
        assert "fault injection" in errors[0][0].details()
        _wait_not_serving(proc.address)
        deadline = time.monotonic() + 5
        while _alive(core):
            assert time.monotonic() < deadline, "the failed core did not exit"
            time.sleep(0.05)
        assert t0 > 0


def test_stopped_engine_leaves_no_core(tiny_llama):
    proc = start_engine(tiny_llama, "--num-kv-blocks", "64", "--grace-period-s", "2")
    with proc:
        core = _core_pid(proc.pid)
        proc._proc.send_signal(signal.SIGTERM)  # the engine alone, not its process group
        assert proc._proc.wait(timeout=30) == 0
    assert not _alive(core)

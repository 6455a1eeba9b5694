"""Engine failures contained, with real engine processes: a failed or killed core is
replaced by a fresh one (NOT_SERVING meanwhile, its requests failed with UNAVAILABLE
naming the engine), past the restart budget the engine process exits, and a deadline
that passes during a long CPU prefill frees the engine within a step."""

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
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RESTART_WITHIN_S = 60
"""A fresh core is a new process loading the model: seconds, more on a loaded CI machine."""


def core_pid(engine_pid: int) -> int:
    """The engine's core process: its child started by multiprocessing's spawn."""
    cores = []
    for task in os.listdir(f"/proc/{engine_pid}/task"):
        with open(f"/proc/{engine_pid}/task/{task}/children") as f:
            for child in f.read().split():
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as c:
                        if b"spawn_main" in c.read():
                            cores.append(int(child))
                except FileNotFoundError:
                    pass  # a child that exited meanwhile (the old core being reaped)
    assert len(cores) == 1, f"expected one engine-core process, found {cores}"
    return cores[0]


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_health(address: str, status: int, within_s: float) -> float:
    t0 = time.monotonic()
    while health(address) != status:
        assert time.monotonic() - t0 < within_s, f"health not {status} within {within_s}s"
        time.sleep(0.02)
    return time.monotonic() - t0


def request(rid: str, max_tokens: int, prompt: list[int] = PROMPT) -> engine_pb2.EngineGenerateRequest:
    return engine_pb2.EngineGenerateRequest(
        request_id=rid, prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def start_streams(stub: engine_pb2_grpc.EngineStub, n: int) -> tuple[list[threading.Thread], list]:
    """n long streams, each past its first message, drained on threads; errors collected."""
    calls = [stub.Generate(request(f"r{i}", 400), timeout=120) for i in range(n)]
    for c in calls:
        next(c)
    errors: list = []

    def drain(call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            errors.append(e)

    threads = [threading.Thread(target=drain, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    return threads, errors


def test_failed_step_reports_not_serving_then_a_fresh_core_serves(tiny_llama):
    args = ("--num-kv-blocks", "64", "--max-model-len", "512", "--fault-fail-step-at", "25",
            "--instance-id", "tiny-0")
    with start_engine(tiny_llama, *args) as proc:
        stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(proc.address))
        old_core = core_pid(proc.pid)
        threads, errors = start_streams(stub, 2)
        for t in threads:
            t.join(60)
        assert len(errors) == 2
        for e in errors:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            assert f"engine tiny-0 at {proc.address} is unavailable" in e.details(), e.details()
            assert "step failed" in e.details() and "fault injection" in e.details(), e.details()
        wait_health(proc.address, NOT_SERVING, 2)  # until a fresh core has loaded
        wait_health(proc.address, SERVING, RESTART_WITHIN_S)
        assert core_pid(proc.pid) != old_core
        msgs = list(stub.Generate(request("after", 4), timeout=30))  # 4 steps: under the fault's 25
        assert sum(len(m.token_ids) for m in msgs) == 4
        load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
        assert load.kv_blocks_total == 64 and load.num_running == 0


def test_killed_core_is_replaced_and_its_requests_fail_naming_the_engine(tiny_llama):
    with start_engine(tiny_llama, "--num-kv-blocks", "64", "--max-model-len", "512",
                      "--fault-step-delay-s", "0.01") as proc:
        stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(proc.address))
        epoch = stub.Info(engine_pb2.InfoRequest(), timeout=5).epoch
        old_core = core_pid(proc.pid)
        threads, errors = start_streams(stub, 2)
        t0 = time.monotonic()
        os.kill(old_core, signal.SIGKILL)
        for t in threads:
            t.join(10)
        assert time.monotonic() - t0 < 5 and len(errors) == 2
        for e in errors:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            assert f"engine llama@{proc.address} is unavailable" in e.details() and "SIGKILL" in e.details()
        # While the fresh core loads, calls are refused with the reason, not queued. (A tiny
        # model's fresh core may already be up by now: then the call is simply served.)
        try:
            list(stub.Generate(request("late", 2), timeout=30))
        except grpc.RpcError as late:
            assert late.code() == grpc.StatusCode.UNAVAILABLE and "SIGKILL" in late.details(), late
        # The fresh core's new epoch (the index drops the old core's blocks) marks the restart
        # as done; SERVING alone could be read before the supervisor saw the death.
        t1 = time.monotonic()
        while stub.Info(engine_pb2.InfoRequest(), timeout=5).epoch == epoch:
            assert time.monotonic() - t1 < RESTART_WITHIN_S, "no fresh core (new epoch) in time"
            time.sleep(0.02)
        wait_health(proc.address, SERVING, RESTART_WITHIN_S)
        assert sum(len(m.token_ids) for m in stub.Generate(request("after", 3), timeout=30)) == 3


def test_core_failure_past_the_restart_budget_exits_the_engine(tiny_llama):
    with start_engine(tiny_llama, "--num-kv-blocks", "64", "--fault-fail-step-at", "3",
                      "--core-restarts", "0") as proc:
        stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(proc.address))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request("r", 10), timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "step failed" in e.value.details()
        assert proc._proc.wait(timeout=30) == 1  # for its supervisor to restart
        assert "core_restarts budget" in proc.log_tail()


def test_deadline_during_a_long_cpu_prefill_frees_the_engine_within_a_step(tiny_llama):
    """A 1,000-token prompt with the CPU's default step budget (128 tokens) is prefilled over
    8 steps (0.4 s each here, --fault-step-delay-s); the deadline passes mid-prefill and the
    abort lands at the next step, leaving no KV block behind. With one 1,000-token step
    (the old 2,048 budget) the prefill would not be split and the check below fails."""
    with start_engine(tiny_llama, "--max-model-len", "1024", "--num-kv-blocks", "128",
                      "--fault-step-delay-s", "0.4") as proc:
        stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(proc.address))
        chunks = -(-1000 // 128)
        prompt = [(i * 37) % 500 + 3 for i in range(1000)]
        steps0 = stub.Load(engine_pb2.LoadRequest(), timeout=5).steps
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request("long", 4, prompt), timeout=1.0))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        t0 = time.monotonic()
        while True:
            load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
            if load.num_running == 0 and load.num_waiting == 0:
                break
            assert time.monotonic() - t0 < 10, f"the engine still holds the request: {load}"
            time.sleep(0.02)
        freed_after = time.monotonic() - t0
        assert load.kv_blocks_used == 0, f"the aborted request's blocks leaked: {load}"
        steps = load.steps - steps0
        assert 2 <= steps < chunks, f"{steps} steps: the prefill was not split, or ran to its end"
        # At most one step ran past the deadline: the one in flight when it passed.
        step_s = (1.0 + freed_after) / steps
        assert freed_after < max(2.0, 2.5 * step_s), (freed_after, step_s)

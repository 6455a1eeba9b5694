"""Cancel storms against real processes: many concurrent streams cancelled at random points
(client cancel mid-decode, deadlines expiring in the queue and mid-prefill, connections
closed by a killed client, Abort RPCs racing cancels, and the same through the gateway,
its HTTP front and the router). After each storm the engine holds no KV block, has no
request waiting or running, and its greedy output for a fixed prompt equals the output
from before any storm.

The engine runs with a small batch (max_num_seqs 8), a pool of 64 blocks and a 10 ms
step delay, so that a storm always has requests in the queue, in prefill and in decode
when the cancels land (a Load monitor checks it did).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess
import sys
import time

import grpc
import pytest

from llmesh.v1 import (
    common_pb2,
    engine_pb2,
    engine_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.faults._robustness_helpers import (
    MODEL,
    greedy_probe,
    robust_mesh,
    wait_engine_idle,
)

VOCAB = 512
"""The tiny test model's vocabulary."""
STORM_TIMEOUT_S = 90.0
"""Bound on one whole storm (every call also has its own deadline)."""
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    # A deep waiting queue: the storm cancels requests while they wait (admission control
    # would otherwise refuse most of them, see test_admission.py).
    with robust_mesh(tiny_llama, tmp_path_factory.mktemp("storm-mesh"), "--max-num-seqs", "8",
                     "--max-waiting-requests", "512",
                     "--fault-step-delay-s", "0.01") as m:
        yield m


@pytest.fixture(scope="module")
def baseline(mesh) -> list[int]:
    """The engine's greedy tokens for the probe prompt before any storm."""
    return greedy_probe(mesh.engine.address)


def _prompt(rng: random.Random, lo: int = 8, hi: int = 120) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))]


def _engine_request(rng: random.Random, rid: str, lo: int = 8, hi: int = 120) -> engine_pb2.EngineGenerateRequest:
    return engine_pb2.EngineGenerateRequest(
        request_id=rid, prompt_token_ids=_prompt(rng, lo, hi),
        sampling=common_pb2.SamplingParams(max_tokens=rng.randint(16, 64), temperature=rng.choice([0.0, 0.8]),
                                           ignore_eos=True))


@dataclasses.dataclass
class LoadPeak:
    waiting: int = 0
    running: int = 0
    blocks: int = 0


async def _monitor(address: str, peak: LoadPeak, stop: asyncio.Event) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = engine_pb2_grpc.EngineStub(ch)
        while not stop.is_set():
            load = await stub.Load(engine_pb2.LoadRequest(), timeout=5)
            peak.waiting = max(peak.waiting, load.num_waiting)
            peak.running = max(peak.running, load.num_running)
            peak.blocks = max(peak.blocks, load.kv_blocks_used)
            await asyncio.sleep(0.01)


async def _consume(call, read_at_most: int | None, cancel_after_s: float | None = None) -> grpc.StatusCode:
    """Read ``read_at_most`` messages (all when None), or until ``cancel_after_s`` passed,
    then cancel; the call's final status."""
    async def reader() -> None:
        n = 0
        while read_at_most is None or n < read_at_most:
            if await call.read() is grpc.aio.EOF:
                return
            n += 1

    try:
        await asyncio.wait_for(reader(), cancel_after_s)
    except asyncio.TimeoutError:
        pass  # the planned cancel point: mid-prefill or in the queue
    except grpc.aio.AioRpcError as e:
        if e.code() not in CLEAN:
            print(f"unclean ending {e.code().name}: {e.details()}")  # shown when the test fails
        return e.code()
    call.cancel()
    return await call.code()


async def _storm(address: str, calls, engine_address: str) -> tuple[dict[str, int], LoadPeak]:
    """Run the coroutines ``calls(channel)`` yields with a Load monitor on the engine; the
    count of each final status, and the engine's peak load meanwhile."""
    peak, stop = LoadPeak(), asyncio.Event()
    async with grpc.aio.insecure_channel(address) as ch:
        monitor = asyncio.create_task(_monitor(engine_address, peak, stop))
        try:
            codes = await asyncio.wait_for(asyncio.gather(*calls(ch)), STORM_TIMEOUT_S)
        finally:
            stop.set()
            await monitor
    counts: dict[str, int] = {}
    for code in codes:
        counts[code.name] = counts.get(code.name, 0) + 1
    return counts, peak


def _after_storm(mesh, baseline: list[int], counts: dict[str, int]) -> None:
    assert set(counts) <= {c.name for c in CLEAN}, f"unclean endings in the storm: {counts}"
    wait_engine_idle(mesh.engine.address, timeout=30)
    assert greedy_probe(mesh.engine.address) == baseline, "greedy output changed after the storm"
    wait_engine_idle(mesh.engine.address, timeout=10)
    for name, proc in mesh.processes().items():
        assert proc.alive(), f"{name} died in the storm:\n{proc.log_tail()}"


def test_client_cancels_mid_decode_free_every_kv_block(mesh, baseline):
    rng = random.Random("mid-decode")

    def calls(ch):
        stub = engine_pb2_grpc.EngineStub(ch)
        for i in range(48):
            call = stub.Generate(_engine_request(rng, f"decode-{i}"), timeout=60)
            yield _consume(call, read_at_most=rng.randint(1, 8))

    counts, peak = asyncio.run(_storm(mesh.engine.address, calls, mesh.engine.address))
    assert counts.get("CANCELLED", 0) > 24, counts
    assert peak.running > 1 and peak.blocks > 0, peak
    _after_storm(mesh, baseline, counts)


def test_deadlines_expiring_in_the_queue_and_mid_prefill_free_every_kv_block(mesh, baseline):
    rng = random.Random("deadlines")

    def calls(ch):
        stub = engine_pb2_grpc.EngineStub(ch)
        for i in range(128):
            # Long prompts with deadlines from 20 ms: many expire before admission or in prefill.
            req = _engine_request(rng, f"deadline-{i}", lo=60, hi=130)
            yield _consume(stub.Generate(req, timeout=rng.uniform(0.05, 3.0)), read_at_most=None)

    counts, peak = asyncio.run(_storm(mesh.engine.address, calls, mesh.engine.address))
    assert counts.get("DEADLINE_EXCEEDED", 0) > 16, counts
    assert peak.waiting > 0, f"no request was ever waiting: {peak}"
    _after_storm(mesh, baseline, counts)


def test_requests_cancelled_while_waiting_in_the_queue_leave_no_trace(mesh, baseline):
    """A full batch of long runners, 96 more queued behind them, all queued ones cancelled
    before admission (checked: the queue was full when the cancels went out), then the runners."""
    rng = random.Random("queued")

    async def run() -> dict[str, int]:
        async with grpc.aio.insecure_channel(mesh.engine.address) as ch:
            stub = engine_pb2_grpc.EngineStub(ch)
            runners = [stub.Generate(engine_pb2.EngineGenerateRequest(
                request_id=f"runner-{i}", prompt_token_ids=_prompt(rng, 8, 16),
                sampling=common_pb2.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)), timeout=120)
                for i in range(8)]
            for call in runners:
                assert (await call.read()) is not grpc.aio.EOF
            queued = [stub.Generate(_engine_request(rng, f"queued-{i}"), timeout=120) for i in range(96)]
            deadline = time.monotonic() + 30
            while (await stub.Load(engine_pb2.LoadRequest(), timeout=5)).num_waiting < 80:
                assert time.monotonic() < deadline, "the queued requests never reached the engine's queue"
                await asyncio.sleep(0.02)
            for call in queued:
                call.cancel()
            codes = [await call.code() for call in queued]
            load = await stub.Load(engine_pb2.LoadRequest(), timeout=5)
            for call in runners:
                call.cancel()
            codes += [await call.code() for call in runners]
        assert load.num_running <= 8
        return {c.name: codes.count(c) for c in set(codes)}

    counts = asyncio.run(asyncio.wait_for(run(), STORM_TIMEOUT_S))
    assert counts == {"CANCELLED": 104}, counts
    _after_storm(mesh, baseline, counts)


CLIENT_SCRIPT = """
import asyncio, random, sys
import grpc
from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc

async def main(address):
    rng = random.Random(7)
    ch = grpc.aio.insecure_channel(address)
    stub = engine_pb2_grpc.EngineStub(ch)
    calls = [stub.Generate(engine_pb2.EngineGenerateRequest(
        request_id=f"orphan-{i}", prompt_token_ids=[rng.randrange(512) for _ in range(rng.randint(8, 120))],
        sampling=common_pb2.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)), timeout=300)
        for i in range(64)]
    await asyncio.gather(*(c.read() for c in calls))

asyncio.run(main(sys.argv[1]))
"""


def test_connections_closed_by_a_killed_client_free_every_kv_block(mesh, baseline, tmp_path):
    """A client process with 64 open streams is killed (SIGKILL) once the engine runs some of
    them and queues the rest: the engine sees only the connection drop, and must abort every
    stream by itself."""
    errors = tmp_path / "client.stderr"
    stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh.engine.address))
    with open(errors, "wb") as err:
        client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, mesh.engine.address],
                                  stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
            if load.num_running > 0 and load.num_waiting > 0:
                break
            assert client.poll() is None, f"the client exited: {errors.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the client's streams never filled the engine: {load}"
            time.sleep(0.05)
    finally:
        client.kill()
        client.wait(timeout=10)
    _after_storm(mesh, baseline, {})


def test_abort_rpcs_racing_client_cancels_free_every_kv_block(mesh, baseline):
    """Abort by id (twice, and for ids that never existed) while the same streams are being
    cancelled by their clients and others run to completion."""
    rng = random.Random("abort-race")

    def calls(ch):
        stub = engine_pb2_grpc.EngineStub(ch)

        async def abort(rid: str, delay: float) -> grpc.StatusCode:
            await asyncio.sleep(delay)
            for _ in range(2):
                await stub.Abort(engine_pb2.AbortRequest(request_id=rid), timeout=10)
            return grpc.StatusCode.OK

        for i in range(40):
            rid = f"abort-{i}"
            call = stub.Generate(_engine_request(rng, rid), timeout=60)
            yield _consume(call, read_at_most=rng.choice([None, 1, 2, 5]))
            yield abort(rid if rng.random() < 0.8 else f"never-{i}", rng.uniform(0, 0.4))

    counts, peak = asyncio.run(_storm(mesh.engine.address, calls, mesh.engine.address))
    assert peak.running > 1, peak
    _after_storm(mesh, baseline, counts)


def test_cancel_storm_through_gateway_and_router_frees_every_kv_block(mesh, baseline):
    """The gateway's gRPC front (direct routing), the router's Generate (proxy path) and the
    HTTP front, each with cancels mid-stream, deadlines and closed connections at once."""
    rng = random.Random("mesh-storm")

    def gateway_calls(ch):
        stub = inference_pb2_grpc.InferenceStub(ch)
        for i in range(48):
            req = inference_pb2.GenerateRequest(model=MODEL, token_ids=router_pb2.TokenIds(ids=_prompt(rng)),
                                                sampling=common_pb2.SamplingParams(
                                                    max_tokens=rng.randint(16, 64), ignore_eos=True))
            if rng.random() < 0.5:
                yield _consume(stub.Generate(req, timeout=60), read_at_most=rng.randint(1, 6))
            else:
                yield _consume(stub.Generate(req, timeout=rng.uniform(0.05, 1.0)), read_at_most=None)

    async def router_storm() -> tuple[dict[str, int], LoadPeak]:
        def calls(ch):
            stub = router_pb2_grpc.RouterStub(ch)
            for i in range(32):
                req = router_pb2.RouteRequest(request_id=f"route-{i}", model=MODEL, prompt_token_ids=_prompt(rng),
                                              sampling=common_pb2.SamplingParams(max_tokens=80, ignore_eos=True))
                yield _consume(stub.Generate(req, timeout=60), read_at_most=rng.randint(0, 5),
                               cancel_after_s=rng.uniform(0.01, 0.5))
        return await _storm(mesh.router.address, calls, mesh.engine.address)

    async def http_close(i: int) -> grpc.StatusCode:
        body = (f'{{"model": "{MODEL}", "prompt": "word {i} " , "max_tokens": 100, "ignore_eos": true, '
                f'"stream": {"true" if i % 2 else "false"}}}').encode()
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", mesh.http_port), 10)
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.01, 0.5))
        writer.transport.abort()  # the connection drops mid-request: no FIN handshake, no reading
        return grpc.StatusCode.CANCELLED

    async def run():
        results = await asyncio.gather(_storm(mesh.gateway.address, gateway_calls, mesh.engine.address),
                                       router_storm(), asyncio.gather(*(http_close(i) for i in range(32))))
        (gw_counts, peak), (rt_counts, _), _ = results
        return gw_counts, rt_counts, peak

    gw_counts, rt_counts, peak = asyncio.run(asyncio.wait_for(run(), STORM_TIMEOUT_S))
    assert peak.running > 1 and peak.waiting > 0, peak
    _after_storm(mesh, baseline, gw_counts)
    assert set(rt_counts) <= {c.name for c in CLEAN}, rt_counts

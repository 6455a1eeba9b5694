"""Admission control on a real mesh (Redis, an engine, a router, two gateways, all real
processes): overload is shed at once with RESOURCE_EXHAUSTED and a retry hint (HTTP 429 +
Retry-After), nothing leaks and service resumes when the load drains; cheap checks run
before tokenizing; a large prompt is tokenized off the gateway's event loop.

The engine runs one request at a time with a waiting queue of one (``--max-num-seqs 1
--max-waiting-requests 1``) and sleeps 50 ms per step, so two long streams fill it.
Timings are the median of several attempts: CI machines are shared and a single sample
can catch a scheduling hiccup.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import yaml

from llmesh.v1 import (
    common_pb2,
    engine_pb2,
    engine_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.gateway.test_auth import add_key, bearer
from tests.mesh_helpers import RedisServer, ServiceProcess, free_port, free_ports, start_engine

MODEL = "tiny"
WINDOW = 512
FAST_S = 0.1
"""The brief's bound on a refusal: under 100 ms."""
ONE_MB = 1_000_000


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("admission")
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        # A fixed port (the last --port wins), so that every process starts at once.
        engine_address = f"127.0.0.1:{free_port()}"
        engine = stack.enter_context(start_engine(
            tiny_llama, "--served-model-name", MODEL, "--num-kv-blocks", "64", "--max-model-len", str(WINDOW),
            "--max-num-seqs", "1", "--max-waiting-requests", "1", "--fault-step-delay-s", "0.05",
            "--port", engine_address.rsplit(":", 1)[1], wait=False))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": tiny_llama, "size_class": "small", "replicas": 1,
            "addresses": [engine_address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)],
                                                    wait=False))
        router.wait_ready()
        common = ["--router", router.address, "--models-file", str(models_file)]
        keyed_http, capped_http = free_ports(2)
        keyed = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            *common, "--redis-url", redis_server.url, "--http-port", str(keyed_http)], wait=False))
        capped = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            *common, "--auth", "false", "--max-streams", "2", "--max-prompt-bytes", "4096",
            "--http-port", str(capped_http)], wait=False))
        for proc in (engine, keyed, capped):
            proc.wait_ready()
        _wait_router_healthy(router.address)
        yield {"redis": redis_server, "engine": engine.address, "keyed": keyed.address,
               "capped": capped.address, "capped_http": capped_http}


# ---- helpers ---------------------------------------------------------------------------------
def _wait_router_healthy(address: str, timeout: float = 60.0) -> None:
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while True:
        cards = stub.ListModels(router_pb2.RouterListModelsRequest(), timeout=5).models
        if cards and all(c.healthy_replicas for c in cards):
            return
        assert time.monotonic() < deadline, f"the router never saw a healthy engine: {cards}"
        time.sleep(0.1)


def _engine(mesh) -> engine_pb2_grpc.EngineStub:
    return engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh["engine"]))


def _gateway(address: str) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(address))


def _load(mesh) -> engine_pb2.LoadResponse:
    return _engine(mesh).Load(engine_pb2.LoadRequest(), timeout=5)


def _wait_load(mesh, running: int, waiting: int, timeout: float = 20.0) -> engine_pb2.LoadResponse:
    deadline = time.monotonic() + timeout
    while True:
        load = _load(mesh)
        if load.num_running == running and load.num_waiting == waiting:
            return load
        assert time.monotonic() < deadline, f"engine never reached {running} running/{waiting} waiting: {load}"
        time.sleep(0.05)


def _long(**kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=400, ignore_eos=True, **kw)


@contextlib.contextmanager
def _open_streams(calls: list):
    """Read each call in a thread (so it advances) and cancel them all on exit."""
    def drain(call) -> None:
        with contextlib.suppress(grpc.RpcError):
            for _ in call:
                pass
    threads = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    try:
        yield calls
    finally:
        for c in calls:
            c.cancel()
        for t in threads:
            t.join(timeout=10)


@contextlib.contextmanager
def _full_engine(mesh):
    """Two long streams straight at the engine: one running, one waiting — the queue is full."""
    stub = _engine(mesh)
    calls = [stub.Generate(engine_pb2.EngineGenerateRequest(request_id=f"fill-{i}-{time.monotonic_ns()}",
                                                            prompt_token_ids=[1, 5, 9, 13], sampling=_long()),
                           timeout=120) for i in range(2)]
    with _open_streams(calls):
        _wait_load(mesh, 1, 1)
        yield
    _wait_load(mesh, 0, 0)


def _refusal(call) -> tuple[float, grpc.RpcError]:
    """(seconds, error) of a call that must fail before its first message."""
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        list(call())
    return time.perf_counter() - t0, info.value


def _median_refusal(call, code: grpc.StatusCode, attempts: int = 5) -> tuple[float, grpc.RpcError]:
    times = []
    for _ in range(attempts):
        elapsed, err = _refusal(call)
        assert err.code() == code, (err.code(), err.details())
        times.append(elapsed)
    return statistics.median(times), err


def _retry_after_ms(err: grpc.RpcError) -> int:
    trailers = dict(err.trailing_metadata() or ())
    assert "retry-after-ms" in trailers and "retry-after" in trailers, trailers
    assert int(trailers["retry-after"]) >= 1
    return int(trailers["retry-after-ms"])


def _generate(address: str, metadata=(), text: str = "hello", timeout: float = 60, priority: int = 0,
              **sampling) -> list[common_pb2.GenerateResponse]:
    sampling.setdefault("max_tokens", 2)
    req = inference_pb2.GenerateRequest(model=MODEL, text=text, priority=priority,
                                        sampling=common_pb2.SamplingParams(**sampling))
    return list(_gateway(address).Generate(req, metadata=metadata, timeout=timeout))


def _invalid(fn) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    return info.value.details()


def _openai(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{mesh['capped_http']}/v1", api_key="unused", max_retries=0,
                         timeout=30)


# ---- overload ----------------------------------------------------------------------------------
def test_full_engine_queue_refuses_at_once_with_retry_after_and_leaks_no_kv_block(mesh):
    stub = _engine(mesh)
    with _full_engine(mesh):
        before = _load(mesh)
        elapsed, err = _median_refusal(lambda: stub.Generate(engine_pb2.EngineGenerateRequest(
            prompt_token_ids=list(range(1, 60)), sampling=_long()), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert elapsed < FAST_S, f"refusal took {elapsed * 1000:.0f} ms"
        assert _retry_after_ms(err) > 0
        assert "max_waiting_requests=1" in err.details() and "retry after" in err.details()
        after = _load(mesh)
        # The refused requests never reached the core: no block taken, no slot in the queue.
        assert (after.num_running, after.num_waiting) == (1, 1)
        assert after.kv_blocks_used <= before.kv_blocks_used + 1  # the running stream may grow by a block
    idle = _wait_load(mesh, 0, 0)
    assert idle.kv_blocks_used == 0
    out = list(stub.Generate(engine_pb2.EngineGenerateRequest(prompt_token_ids=[1, 2, 3],
                                                              sampling=common_pb2.SamplingParams(max_tokens=2)),
                             timeout=30))
    assert out[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def test_engine_overload_reaches_grpc_and_openai_clients_as_resource_exhausted_and_429(mesh):
    with _full_engine(mesh):
        elapsed, err = _median_refusal(lambda: _gateway(mesh["capped"]).Generate(
            inference_pb2.GenerateRequest(model=MODEL, text="hi", sampling=_long()), timeout=30),
            grpc.StatusCode.RESOURCE_EXHAUSTED, attempts=3)
        assert "overloaded" in err.details() and "max_waiting_requests" in err.details()
        assert _retry_after_ms(err) > 0
        with pytest.raises(openai.RateLimitError) as info:
            _openai(mesh).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        headers = info.value.response.headers
        assert info.value.status_code == 429
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
        assert "overloaded" in info.value.message
    # Drained: the same clients are served again.
    assert _generate(mesh["capped"])[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    done = _openai(mesh).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert done.choices[0].finish_reason in ("length", "stop")


def test_gateway_max_streams_refuses_at_once_with_retry_after_and_429(mesh):
    gw = _gateway(mesh["capped"])
    calls = [gw.Generate(inference_pb2.GenerateRequest(model=MODEL, text="hi", sampling=_long()), timeout=120)
             for _ in range(2)]
    with _open_streams(calls):
        _wait_load(mesh, 1, 1)  # both streams are through the gateway: its two slots are taken
        elapsed, err = _median_refusal(lambda: gw.Generate(
            inference_pb2.GenerateRequest(model=MODEL, text="hi"), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert elapsed < FAST_S, f"refusal took {elapsed * 1000:.0f} ms"
        assert "max_streams" in err.details() and "2 streams open" in err.details()
        assert _retry_after_ms(err) > 0
        body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{mesh['capped_http']}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 429 and int(info.value.headers["Retry-After"]) >= 1
        assert json.loads(info.value.read())["error"]["type"] == "rate_limit_error"
    _wait_load(mesh, 0, 0)
    assert _generate(mesh["capped"])[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


# ---- cheap checks first ------------------------------------------------------------------------
def test_a_1mb_prompt_does_not_stall_another_stream(mesh):
    key, _ = add_key(mesh["redis"].url)
    stream = _gateway(mesh["keyed"]).Generate(inference_pb2.GenerateRequest(
        model=MODEL, text="hello", sampling=_long()), metadata=bearer(key), timeout=120)
    arrivals: list[float] = []

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):
            for _ in stream:
                arrivals.append(time.perf_counter())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(arrivals) < 20:
            assert time.monotonic() < deadline, "the stream never got going"
            time.sleep(0.05)
        big_start = time.perf_counter()
        details = _invalid(lambda: _generate(mesh["keyed"], bearer(key), text=("lorem ipsum dolor " * 60_000)[:ONE_MB]))
        big_end = time.perf_counter()
        time.sleep(0.3)
    finally:
        stream.cancel()
        reader.join(timeout=10)
    assert "window" in details  # it was tokenized: only the token count could refuse it
    before = [b - a for a, b in zip(arrivals, arrivals[1:]) if b < big_start]
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > big_start and a < big_end]
    assert during, "no token arrived while the large prompt was tokenized"
    stall = max(during) - statistics.median(before)
    # Tokenized on the event loop this prompt stalls every stream for its whole
    # tokenization (seconds with this tokenizer, which the big request's own duration shows).
    assert big_end - big_start > 0.5, big_end - big_start
    # The bound separates that failure (a stall as long as the tokenization, > 0.5 s) from the
    # prompt's other work on a 2-core machine: its ~250k ids unpacked and copied into the
    # RouteRequest on the gateway's loop (~40 ms in a py-spy profile), and the router and engine
    # parsing them beside the streaming engine. 100 ms held on this machine once and then
    # measured 104-229 ms in repeated runs here, also with the code of commit 066d6cc.
    assert stall < 0.25, f"a stream stalled {stall * 1000:.0f} ms while a 1 MB prompt was tokenized"


def test_an_empty_rate_limit_bucket_refuses_a_1mb_prompt_without_tokenizing_it(mesh):
    key, _ = add_key(mesh["redis"].url, rpm=1)
    _generate(mesh["keyed"], bearer(key))  # the bucket's one request
    big = ("lorem ipsum dolor " * 60_000)[:ONE_MB]
    elapsed, err = _median_refusal(lambda: _gateway(mesh["keyed"]).Generate(
        inference_pb2.GenerateRequest(model=MODEL, text=big), metadata=bearer(key), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED, attempts=3)
    assert "requests per minute" in err.details()
    # Tokenizing this prompt takes seconds (see the test above); the refusal does not wait for it.
    assert elapsed < FAST_S, f"refusal took {elapsed * 1000:.0f} ms"

    key, _ = add_key(mesh["redis"].url, tpm=40)
    _generate(mesh["keyed"], bearer(key), max_tokens=30, ignore_eos=True)  # ~35 of 40 tokens used
    # max_tokens=30 alone is more than is left (the bucket refills 40 tokens a minute).
    elapsed, err = _median_refusal(lambda: _gateway(mesh["keyed"]).Generate(
        inference_pb2.GenerateRequest(model=MODEL, text=big, sampling=common_pb2.SamplingParams(max_tokens=30)),
        metadata=bearer(key), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED, attempts=3)
    assert "tokens per minute" in err.details() and elapsed < FAST_S, (elapsed, err.details())


def test_stop_strings_over_the_count_or_length_limit_are_invalid_argument(mesh):
    gw = mesh["capped"]
    assert _generate(gw, stop=["x" * 256] * 16)  # at the limits: served
    for stops in (["a"] * 17, ["s%d" % i for i in range(10_000)]):
        msg = _invalid(lambda: _generate(gw, stop=stops))
        assert f"sampling.stop has {len(stops)} strings" in msg and "limit of 16 (max_stop_strings)" in msg
    msg = _invalid(lambda: _generate(gw, stop=["ok", "y" * 257]))
    assert "sampling.stop[1] has 257 characters" in msg and "limit of 256 (max_stop_chars)" in msg
    with pytest.raises(openai.BadRequestError) as info:
        _openai(mesh).completions.create(model=MODEL, prompt="hi", max_tokens=2, stop=["a"] * 17)
    assert info.value.status_code == 400 and info.value.param == "stop"


def test_priority_outside_the_enum_is_invalid_argument(mesh):
    gw = mesh["capped"]
    assert _generate(gw, priority=common_pb2.PRIORITY_BATCH)
    for value in (3, 99):
        msg = _invalid(lambda: _generate(gw, priority=value))
        assert f"priority {value} is not a Priority value" in msg and "PRIORITY_BATCH (2)" in msg


def test_prompt_over_max_prompt_bytes_is_invalid_argument_naming_the_field(mesh):
    gw = mesh["capped"]
    at_limit = _invalid(lambda: _generate(gw, text="é" * 2048))  # 4096 bytes: tokenized, then too long
    assert "window" in at_limit and "max_prompt_bytes" not in at_limit
    msg = _invalid(lambda: _generate(gw, text="é" * 2049))
    assert "prompt.text is 4098 bytes" in msg and "limit of 4096 bytes (max_prompt_bytes)" in msg
    chat = inference_pb2.ChatRequest(model=MODEL, messages=[
        inference_pb2.ChatMessage(role="system", content="s" * 3000),
        inference_pb2.ChatMessage(role="user", content="u" * 3000)])
    msg = _invalid(lambda: list(_gateway(gw).Chat(chat, timeout=30)))
    assert "messages is 6000 bytes" in msg and "max_prompt_bytes" in msg

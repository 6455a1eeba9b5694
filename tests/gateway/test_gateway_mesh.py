"""The gateway as a real process in front of a real router and a real engine (tiny model):
streaming equal to the engine's greedy output, chat templates, Tokenize, ListModels, clear
statuses for bad requests, and cancellation/deadlines that free the engine's KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmesh.client import AsyncLlmeshClient, LlmeshClient
from llmesh.engine.text.loading import load_tokenizer
from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.mesh_helpers import ServiceProcess, free_port, start_engine, wait_serving

MODEL = "tiny"
WINDOW = 512
PROMPT = "The quick brown fox jumps over the lazy dog"
STEP_DELAY_S = 0.01
"""Engine fault injection: every step sleeps this long, so a 300-token stream lasts
seconds and cancellation can be tested mid-stream."""


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gateway-mesh")
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(
            tiny_llama, "--served-model-name", MODEL, "--num-kv-blocks", "64", "--max-model-len", str(WINDOW),
            "--fault-step-delay-s", str(STEP_DELAY_S)))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": tiny_llama, "size_class": "small", "replicas": 1,
            "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        metrics_port = free_port()
        gateway = stack.enter_context(ServiceProcess(
            "llmesh.gateway.main", ["--router", router.address, "--models-file", str(models_file),
                                    "--metrics-port", str(metrics_port), "--auth", "false"]))
        gateway.metrics_port = metrics_port
        yield {"engine": engine, "router": router, "gateway": gateway}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.fixture
def client(mesh):
    with LlmeshClient(mesh["gateway"].address, timeout=60) as c:
        yield c


def _engine(mesh) -> engine_pb2_grpc.EngineStub:
    return engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh["engine"].address))


def _gateway(mesh) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh["gateway"].address))


def _engine_greedy(mesh, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    req = engine_pb2.EngineGenerateRequest(request_id=f"ref-{time.monotonic_ns()}", prompt_token_ids=ids,
                                           sampling=common_pb2.SamplingParams(
                                               max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    chunks = list(_engine(mesh).Generate(req, timeout=60))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def _wait_engine_idle(mesh, within_s: float) -> float:
    """Seconds until the engine holds no KV blocks and runs nothing; fails past ``within_s``."""
    stub, start = _engine(mesh), time.monotonic()
    while True:
        load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
        elapsed = time.monotonic() - start
        if load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0:
            return elapsed
        assert elapsed < within_s, f"engine still busy after {elapsed:.2f}s: {load}"
        time.sleep(0.01)


def _usage_lines(mesh) -> list[dict]:
    lines = []
    for raw in mesh["gateway"].log_tail(200_000).splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(raw)
            if doc.get("msg") == "usage":
                lines.append(doc)
    return lines


def _usage_of(mesh, request_id: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [u for u in _usage_lines(mesh) if u["request_id"] == request_id]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no usage line for {request_id}"
        time.sleep(0.05)


# ---- happy paths -----------------------------------------------------------------------
@pytest.mark.parametrize("model", [MODEL, "auto"])
def test_generate_streams_the_engines_greedy_output(mesh, client, tokenizer, model):
    ids, text = _engine_greedy(mesh, tokenizer.encode(PROMPT), 16)
    chunks = list(client.generate(PROMPT, model=model, max_tokens=16, temperature=0.0, ignore_eos=True,
                                  request_id=f"greedy-{model}"))
    assert [t for c in chunks for t in c.token_ids] == ids
    assert "".join(c.text for c in chunks) == text
    last = chunks[-1]
    assert last.finish_reason == "length" and last.model == MODEL and last.replica
    assert last.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) and last.usage.completion_tokens == 16
    assert all(c.finish_reason is None for c in chunks[:-1])
    usage = _usage_of(mesh, f"greedy-{model}")
    assert usage["status"] == "OK" and usage["model"] == MODEL and len(usage["trace_id"]) == 32
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(tokenizer.encode(PROMPT)), 16)
    assert usage["ttft_ms"] > 0 and usage["duration_ms"] >= usage["ttft_ms"]


def test_generate_from_token_ids(mesh, client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    ref_ids, _ = _engine_greedy(mesh, ids, 8)
    chunks = list(client.generate(ids, model=MODEL, max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == ref_ids


def test_chat_applies_the_models_chat_template(mesh, client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    chat_ids = tokenizer.encode_chat(messages)
    assert chat_ids != tokenizer.encode(messages[-1]["content"])
    ref_ids, ref_text = _engine_greedy(mesh, chat_ids, 12)
    chunks = list(client.chat(messages, model=MODEL, max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == ref_ids
    assert "".join(c.text for c in chunks) == ref_text
    assert chunks[-1].usage.prompt_tokens == len(chat_ids)
    assert client.tokenize(model=MODEL, messages=messages).token_ids == chat_ids


def test_tokenize(client, tokenizer):
    out = client.tokenize(PROMPT, MODEL)
    assert out.token_ids == tokenizer.encode(PROMPT)
    assert out.tokens == tokenizer.convert_ids_to_tokens(out.token_ids)
    assert out.max_model_len == WINDOW
    special = "<|im_start|>user"
    assert client.tokenize(special, MODEL).token_ids[0] == 1
    assert client.tokenize(special, MODEL, add_special_tokens=False).token_ids == \
        tokenizer.encode(special, add_special_tokens=False)


def test_list_models(client):
    models = client.list_models()
    assert [m.name for m in models] == [MODEL]
    card = models[0]
    assert card.max_model_len == WINDOW and card.size_class == "small"
    assert card.replicas == 1 and card.healthy_replicas == 1


def test_async_client(mesh, client):
    sync_text = "".join(c.text for c in client.generate(PROMPT, model=MODEL, max_tokens=6, temperature=0.0,
                                                        ignore_eos=True))

    async def run():
        async with AsyncLlmeshClient(mesh["gateway"].address, timeout=60) as ac:
            models = await ac.list_models()
            tok = await ac.tokenize(PROMPT, MODEL)
            text = "".join([c.text async for c in ac.generate(PROMPT, model=MODEL, max_tokens=6,
                                                              temperature=0.0, ignore_eos=True)])
            chat = [c async for c in ac.chat([{"role": "user", "content": "hi"}], model=MODEL, max_tokens=3)]
            return models, tok, text, chat

    models, tok, text, chat = asyncio.run(run())
    assert [m.name for m in models] == [MODEL] and tok.max_model_len == WINDOW
    assert text == sync_text
    assert chat[-1].usage.completion_tokens <= 3 and chat[-1].finish_reason in ("stop", "length")


# ---- bad requests ----------------------------------------------------------------------
def _gen(**kw) -> inference_pb2.GenerateRequest:
    kw.setdefault("model", MODEL)
    return inference_pb2.GenerateRequest(**kw)


BAD_REQUESTS = {
    "unknown model": ("Generate", _gen(model="no-such-model", text="hi"), grpc.StatusCode.NOT_FOUND,
                      ["no-such-model", MODEL, "auto"]),
    "empty prompt": ("Generate", _gen(text=""), grpc.StatusCode.INVALID_ARGUMENT, ["prompt is empty"]),
    "no prompt": ("Generate", _gen(), grpc.StatusCode.INVALID_ARGUMENT, ["prompt is empty"]),
    "prompt over the window": ("Generate", _gen(text="word " * 600), grpc.StatusCode.INVALID_ARGUMENT,
                               [str(WINDOW), "shorten the prompt"]),
    "prompt + max_tokens over the window": (
        "Generate", _gen(text="hi", sampling=common_pb2.SamplingParams(max_tokens=WINDOW)),
        grpc.StatusCode.INVALID_ARGUMENT, ["max_tokens", str(WINDOW), "at most"]),
    "max_tokens 0": ("Generate", _gen(text="hi", sampling=common_pb2.SamplingParams(max_tokens=0)),
                     grpc.StatusCode.INVALID_ARGUMENT, ["sampling.max_tokens"]),
    "temperature -1": ("Generate", _gen(text="hi", sampling=common_pb2.SamplingParams(temperature=-1)),
                       grpc.StatusCode.INVALID_ARGUMENT, ["sampling.temperature"]),
    "top_p 2": ("Generate", _gen(text="hi", sampling=common_pb2.SamplingParams(top_p=2)),
                grpc.StatusCode.INVALID_ARGUMENT, ["sampling.top_p"]),
    "oversized request": ("Generate", _gen(text="a" * ((1 << 20) + 10)), grpc.StatusCode.INVALID_ARGUMENT,
                          ["max_request_bytes", str(1 << 20)]),
    "token id outside the vocabulary": (
        "Generate", _gen(token_ids={"ids": [5, 100000]}), grpc.StatusCode.INVALID_ARGUMENT,
        ["prompt.token_ids[1]", "512"]),
    "token ids with auto": ("Generate", _gen(model="auto", token_ids={"ids": [5]}),
                            grpc.StatusCode.INVALID_ARGUMENT, ["explicit model"]),
    "chat without messages": ("Chat", inference_pb2.ChatRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT,
                              ["messages is empty"]),
    "chat with a bad role": ("Chat", inference_pb2.ChatRequest(
        model=MODEL, messages=[inference_pb2.ChatMessage(role="robot", content="hi")]),
        grpc.StatusCode.INVALID_ARGUMENT, ["messages[0].role", "robot"]),
    "tokenize an unknown model": ("Tokenize", inference_pb2.TokenizeRequest(model="nope", text="x"),
                                  grpc.StatusCode.NOT_FOUND, ["nope", MODEL]),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_clear_statuses_and_everything_stays_healthy(mesh, case):
    rpc, request, code, needles = BAD_REQUESTS[case]
    method = getattr(_gateway(mesh), rpc)
    with pytest.raises(grpc.RpcError) as e:
        result = method(request, timeout=30)
        if rpc in ("Generate", "Chat"):
            list(result)
    assert e.value.code() == code, e.value.details()
    for needle in needles:
        assert needle in e.value.details(), e.value.details()
    for proc in mesh.values():
        assert proc.alive()
        wait_serving(proc.address, timeout=5)


def test_invalid_utf8_bytes_are_invalid_argument(mesh):
    channel = grpc.insecure_channel(mesh["gateway"].address)
    raw = channel.unary_stream("/llmesh.v1.Inference/Generate", request_serializer=lambda b: b,
                               response_deserializer=common_pb2.GenerateResponse.FromString)
    good = _gen(text="ab").SerializeToString()
    with pytest.raises(grpc.RpcError) as e:
        list(raw(good.replace(b"ab", b"\xed\xa0"), timeout=10))  # half a surrogate pair: not UTF-8
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in e.value.details()


# ---- cancellation and deadlines ---------------------------------------------------------
def test_client_cancel_mid_stream_frees_the_engine(mesh, client):
    _wait_engine_idle(mesh, 10)
    stream = client.generate(PROMPT, model=MODEL, max_tokens=300, temperature=0.0, ignore_eos=True,
                             request_id="cancel-1")
    first = next(stream)
    assert first.token_ids
    load = _engine(mesh).Load(engine_pb2.LoadRequest(), timeout=5)
    assert load.num_running == 1 and load.kv_blocks_used > 0, "the request should still be running"
    stream.close()  # cancels the call
    _wait_engine_idle(mesh, within_s=1.0)
    usage = _usage_of(mesh, "cancel-1")
    assert usage["status"] == "CANCELLED" and 0 < usage["completion_tokens"] < 300


def test_deadline_mid_stream_is_deadline_exceeded_and_frees_the_engine(mesh, client):
    _wait_engine_idle(mesh, 10)
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for chunk in client.generate(PROMPT, model=MODEL, max_tokens=300, temperature=0.0, ignore_eos=True,
                                     request_id="deadline-1", timeout=0.8):
            got.append(chunk)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got and sum(len(c.token_ids) for c in got) < 300, "the deadline must pass mid-stream"
    _wait_engine_idle(mesh, within_s=1.0)
    assert _usage_of(mesh, "deadline-1")["status"] == "DEADLINE_EXCEEDED"


# ---- the CLI ---------------------------------------------------------------------------
def _cli(mesh, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmesh.cli_client", *args,
                           "--address", mesh["gateway"].address, "--timeout", "60"],
                          input=stdin, capture_output=True, text=True, timeout=120)


TIMING = re.compile(r"^\[(\d+) tokens · TTFT \d+ ms · [\d.]+ tok/s · model tiny · (stop|length)\]$")


def test_cli_generate_streams_text_and_a_timing_line(mesh, tokenizer):
    _, ref_text = _engine_greedy(mesh, tokenizer.encode(PROMPT), 8)
    out = _cli(mesh, "generate", "--raw", PROMPT, "--model", MODEL, "--max-tokens", "8", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(ref_text) and out.stdout.strip("\n") == ref_text.strip("\n")
    m = TIMING.match(out.stderr.strip())
    assert m and int(m.group(1)) <= 8, out.stderr


def test_cli_errors_are_one_line_with_exit_code_1(mesh):
    out = _cli(mesh, "generate", "hi", "--model", "nope")
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: NOT_FOUND:") and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr and out.stdout == ""
    out = _cli(mesh, "chat", "--once", "hi", "--temperature", "-1")
    assert out.returncode == 1 and "sampling.temperature" in out.stderr


def test_cli_chat_keeps_the_conversation(mesh):
    out = _cli(mesh, "chat", "--once", "Hello", "--model", MODEL, "--max-tokens", "4", "--temperature", "0")
    assert out.returncode == 0 and TIMING.match(out.stderr.strip()), out.stderr
    out = _cli(mesh, "chat", "--model", MODEL, "--max-tokens", "4", "--temperature", "0",
               stdin="Hello\nAnd then?\n")
    assert out.returncode == 0, out.stderr
    timings = [line for line in out.stderr.splitlines() if TIMING.match(line)]
    assert len(timings) == 2
    chats = [u for u in _usage_lines(mesh) if u["rpc"] == "Chat" and u["status"] == "OK"]
    first, second = chats[-2], chats[-1]
    # The second turn's prompt holds the first question, its answer and the new question.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]


# ---- metrics ---------------------------------------------------------------------------
def test_metrics_count_requests_tokens_and_ttft(mesh, client):
    list(client.generate(PROMPT, model=MODEL, max_tokens=5, temperature=0.0, ignore_eos=True))
    with pytest.raises(grpc.RpcError):
        list(client.generate(PROMPT, model=MODEL, top_p=2.0))
    url = f"http://127.0.0.1:{mesh['gateway'].metrics_port}/metrics"
    samples = [sample for family in text_string_to_metric_families(
        urllib.request.urlopen(url, timeout=5).read().decode()) for sample in family.samples]

    def value(name: str, **labels: str) -> float:
        found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
        assert found, f"{name}{labels} not in /metrics"
        return sum(found)

    assert value("llmesh_gateway_requests_total", rpc="Generate", model=MODEL, code="OK") >= 1
    assert value("llmesh_gateway_requests_total", rpc="Generate", model=MODEL, code="INVALID_ARGUMENT") >= 1
    assert value("llmesh_gateway_completion_tokens_total", model=MODEL) >= 5
    assert value("llmesh_gateway_prompt_tokens_total", model=MODEL) > 0
    assert value("llmesh_gateway_ttft_seconds_count", model=MODEL) >= 1
    assert value("llmesh_gateway_streams_in_flight") == 0


# ---- without a router ------------------------------------------------------------------
def test_gateway_without_a_router_answers_unavailable_and_still_tokenizes(tiny_llama, tmp_path, tokenizer):
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": [{"name": MODEL, "path": tiny_llama}]}))
    router = f"127.0.0.1:{free_port()}"
    with ServiceProcess("llmesh.gateway.main", ["--router", router, "--models-file", str(models_file),
                                                "--auth", "false"]) as gw, \
            LlmeshClient(gw.address, timeout=10) as c:
        for call in (lambda: list(c.generate("hi", model=MODEL)), c.list_models):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and router in e.value.details()
        out = c.tokenize(PROMPT, MODEL)
        assert out.token_ids == tokenizer.encode(PROMPT) and out.max_model_len == 0
        wait_serving(gw.address, timeout=5)

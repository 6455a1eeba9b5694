"""The gateway's OpenAI-compatible HTTP front, driven by the official ``openai`` SDK against
real processes (Redis, a tiny engine, the router, the gateway with --http-port): the same
tokens as the gRPC front, streaming with usage, typed errors for every refusal, generation
defaults from generation_config.json, and a disconnect that frees the engine's KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import redis
import yaml

from llmesh.client import LlmeshClient
from llmesh.gateway.keys import new_key, redis_put
from llmesh.v1 import engine_pb2, engine_pb2_grpc
from tests.mesh_helpers import RedisServer, ServiceProcess, free_port, start_engine

MODEL = "tiny"
WINDOW = 256
PROMPT = "The quick brown fox jumps over the lazy dog"
GENERATION_CONFIG = {"temperature": 0.7, "top_k": 20, "do_sample": True}
"""A model default (temperature) and a models-file override (top_p) are both checked."""


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("http-mesh")
    model_dir = run_dir / "model"
    shutil.copytree(tiny_llama, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        engine = stack.enter_context(start_engine(
            str(model_dir), "--served-model-name", MODEL, "--num-kv-blocks", "64",
            "--max-model-len", str(WINDOW), "--fault-step-delay-s", "0.01"))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": str(model_dir), "addresses": [engine.address],
            "generation": {"top_p": 0.9}}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        http_port = free_port()
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--redis-url", redis_server.url,
            "--http-port", str(http_port)]))
        keys = {}
        client = redis.Redis.from_url(redis_server.url)
        for name, kw in {"admin": {}, "other_model": {"models": ["elsewhere"]}, "rpm1": {"rpm": 1}}.items():
            key, record = new_key("t-" + name, **kw)
            redis_put(client, record)
            keys[name] = key
        yield {"engine": engine, "gateway": gateway, "base_url": f"http://127.0.0.1:{http_port}/v1",
               "keys": keys}


def sdk(mesh, key: str = "admin") -> openai.OpenAI:
    # max_retries=0: the SDK retries 429/5xx by itself, which would hide the first answer.
    return openai.OpenAI(base_url=mesh["base_url"], api_key=mesh["keys"].get(key, key), max_retries=0,
                         timeout=60)


def grpc_tokens(mesh, **kw) -> tuple[list[int], str]:
    with LlmeshClient(mesh["gateway"].address, api_key=mesh["keys"]["admin"], timeout=60) as c:
        chunks = list(c.chat(**kw) if "messages" in kw else c.generate(**kw))
    return [t for ch in chunks for t in ch.token_ids], "".join(ch.text for ch in chunks)


def wait_engine_idle(mesh, within_s: float) -> None:
    stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh["engine"].address))
    deadline = time.monotonic() + within_s
    while True:
        load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
        if load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {load}"
        time.sleep(0.02)


# ---- same answers as the gRPC front -------------------------------------------------------------
def test_completion_equals_grpc_generate(mesh):
    ids, text = grpc_tokens(mesh, prompt=PROMPT, model=MODEL, max_tokens=12, temperature=0.0, ignore_eos=True)
    out = sdk(mesh).completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == len(ids) == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_chat_streams_what_grpc_chat_gives_and_usage_last(mesh):
    messages = [{"role": "user", "content": "Hello there"}]
    _, text = grpc_tokens(mesh, messages=messages, model=MODEL, max_tokens=10, temperature=0.0, ignore_eos=True)
    chunks = list(sdk(mesh).chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_prompt_as_token_ids_and_stop_string(mesh):
    client = sdk(mesh)
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    ids = LlmeshClient(mesh["gateway"].address, api_key=mesh["keys"]["admin"]).tokenize(PROMPT, model=MODEL)
    by_ids = client.completions.create(model=MODEL, prompt=ids.token_ids, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    assert by_ids == base
    cut = base.strip()[:2]
    if cut:
        stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[cut])
        assert cut not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_logprobs_in_chat_and_completions(mesh):
    chat = sdk(mesh).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                             extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    comp = sdk(mesh).completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1,
                                        extra_body={"ignore_eos": True})
    assert len(comp.choices[0].logprobs.token_logprobs) == 3


def test_async_client_streams(mesh):
    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=mesh["base_url"], api_key=mesh["keys"]["admin"], max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        parts = [c.choices[0].text async for c in stream]
        await client.close()
        return "".join(parts)

    _, text = grpc_tokens(mesh, prompt=PROMPT, model=MODEL, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert asyncio.run(run()) == text


def test_models_and_health(mesh):
    models = sdk(mesh).models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0].model_dump()
    assert card["generation_defaults"] == {"temperature": pytest.approx(0.7), "top_k": 20,
                                           "top_p": pytest.approx(0.9)}
    assert card["max_model_len"] == WINDOW and card["has_chat_template"] is True
    with urllib.request.urlopen(mesh["base_url"].removesuffix("/v1") + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_generation_defaults_reach_the_engine(mesh):
    """Unset temperature takes the model's 0.7 (sampled text varies by seed); an explicit 0 is greedy."""
    client = sdk(mesh)
    texts = {client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=s,
                                       extra_body={"ignore_eos": True}).choices[0].text for s in range(4)}
    greedy = {client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, seed=s,
                                        extra_body={"ignore_eos": True}).choices[0].text for s in range(2)}
    assert len(texts) > 1 and len(greedy) == 1


# ---- errors: OpenAI's shape, the SDK's typed exceptions --------------------------------------------
def test_missing_and_bad_keys_are_401(mesh):
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(mesh, "llm_nope_nope").completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    req = urllib.request.Request(mesh["base_url"] + "/completions", method="POST",
                                 data=json.dumps({"model": MODEL, "prompt": "x"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=10)
    err = json.loads(raw.value.read())["error"]
    assert raw.value.code == 401 and set(err) == {"message", "type", "param", "code"}


def test_model_not_allowed_403_unknown_404(mesh):
    with pytest.raises(openai.PermissionDeniedError):
        sdk(mesh, "other_model").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as e:
        sdk(mesh).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model" and "no-such-model" in e.value.message
    with pytest.raises(openai.NotFoundError):
        sdk(mesh).get("/nowhere", cast_to=object)


@pytest.mark.parametrize("kw,param", [
    ({"n": 17}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 10_000}, None),
    ({"extra_body": {"unknown_field": 1}}, "unknown_field"),
    ({"tools": [{"type": "function", "function": {"description": "a function without a name"}}]}, "tools[0]"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_invalid_requests_are_400(mesh, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        sdk(mesh).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], **kw)
    assert e.value.status_code == 400
    if param is not None:
        assert e.value.body["param"] == param, e.value.body


def test_rate_limit_is_429_with_retry_after(mesh):
    client = sdk(mesh, "rpm1")
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert int(e.value.response.headers["Retry-After"]) >= 1


def test_disconnect_mid_stream_frees_the_engine(mesh):
    client = sdk(mesh)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_engine_idle(mesh, within_s=5)


# ---- `llmesh generate`: the chat template by default, the finish reason in the timing line -------
def _llmesh(mesh, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMESH_API_KEY": mesh["keys"]["admin"]}
    return subprocess.run([sys.executable, "-m", "llmesh.cli", *args, "--address", mesh["gateway"].address],
                          capture_output=True, text=True, timeout=120, env=env)


def test_llmesh_generate_uses_the_chat_template_unless_raw(mesh):
    flags = ("--model", MODEL, "--max-tokens", "5", "--temperature", "0")
    _, chat_text = grpc_tokens(mesh, messages=[{"role": "user", "content": PROMPT}], model=MODEL, max_tokens=5,
                               temperature=0.0)
    _, raw_text = grpc_tokens(mesh, prompt=PROMPT, model=MODEL, max_tokens=5, temperature=0.0)
    templated = _llmesh(mesh, "generate", PROMPT, *flags)
    raw = _llmesh(mesh, "generate", "--raw", PROMPT, *flags)
    assert templated.returncode == 0 and raw.returncode == 0, templated.stderr + raw.stderr
    assert templated.stdout.rstrip("\n") == chat_text.rstrip("\n")
    assert raw.stdout.rstrip("\n") == raw_text.rstrip("\n")
    for out, text in ((templated, chat_text), (raw, raw_text)):
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("[") and last.endswith(("· length]", "· stop]")), last

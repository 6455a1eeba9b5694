"""The response cache through the OpenAI-compatible HTTP front, driven by the ``openai`` SDK
against real processes: /v1/completions and /v1/chat/completions, streamed and whole, hit
on the second call with the same text, usage and chunks, marked in the JSON and by the
``x-llmesh-cache: hit`` header; the request header's modes; usage recorded as a cached
response."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.gateway.test_response_cache import MODEL, cache_mesh, engine_steps, entries, fresh_key, wait_entries


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    with cache_mesh(tiny_llama, tmp_path_factory.mktemp("response-cache-http")) as m:
        yield m


def sdk(mesh, key: str, mode: str | None = None) -> openai.OpenAI:
    headers = {"x-llmesh-cache": mode} if mode else None
    return openai.OpenAI(base_url=mesh["http"] + "/v1", api_key=key, max_retries=0, timeout=60,
                         default_headers=headers)


def test_completion_whole_and_streamed_hit(mesh):
    key, tenant = fresh_key(mesh)
    client = sdk(mesh, key)
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    first = client.completions.with_raw_response.create(**kw)
    assert first.headers.get("x-llmesh-cache") is None
    wait_entries(mesh, tenant, 1)
    steps = engine_steps(mesh)
    second = client.completions.with_raw_response.create(**kw)
    assert engine_steps(mesh) == steps
    assert second.headers["x-llmesh-cache"] == "hit"
    a, b = first.parse(), second.parse()
    assert b.model_extra.get("cached_response") is True and "cached_response" not in (a.model_extra or {})
    assert b.choices[0].text == a.choices[0].text and b.usage == a.usage
    assert b.choices[0].finish_reason == a.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.model_extra.get("cached_response") for c in streamed)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == a.choices[0].text
    assert streamed[-1].usage == a.usage


def test_chat_stream_hit_has_the_same_chunks(mesh):
    key, tenant = fresh_key(mesh)
    client = sdk(mesh, key)
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
          "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
          "extra_body": {"ignore_eos": True}}
    first = list(client.chat.completions.create(**kw))
    wait_entries(mesh, tenant, 1)
    second = list(client.chat.completions.create(**kw))

    def deltas(chunks):
        return [(c.choices[0].delta.content, c.choices[0].finish_reason) if c.choices else c.usage
                for c in chunks]

    assert deltas(second) == deltas(first)
    assert all(c.model_extra.get("cached_response") for c in second)
    assert not any((c.model_extra or {}).get("cached_response") for c in first)


def test_header_modes_and_a_bad_one(mesh):
    key, tenant = fresh_key(mesh)
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "modes"}], "max_tokens": 4, "temperature": 0}
    sdk(mesh, key, "bypass").chat.completions.create(**kw)
    time.sleep(0.3)
    assert entries(mesh, tenant) == []
    sdk(mesh, key, "refresh").chat.completions.create(**kw)
    wait_entries(mesh, tenant, 1)
    assert sdk(mesh, key, "use").chat.completions.create(**kw).model_extra.get("cached_response") is True
    assert "cached_response" not in (sdk(mesh, key, "bypass").chat.completions.create(**kw).model_extra or {})
    req = urllib.request.Request(mesh["http"] + "/v1/chat/completions", data=json.dumps(kw).encode(), headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "x-llmesh-cache": "sometimes"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "x-llmesh-cache" in json.loads(err.value.read())["error"]["message"]


def test_usage_counts_a_hit_as_a_cached_response(mesh):
    key, tenant = fresh_key(mesh)
    kw = {"model": MODEL, "prompt": "usage", "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    sdk(mesh, key).completions.create(**kw)
    wait_entries(mesh, tenant, 1)
    sdk(mesh, key).completions.create(**kw)
    deadline = time.monotonic() + 5
    while True:
        out = subprocess.run([sys.executable, "-m", "llmesh.cli", "usage", "--json", "--redis",
                              mesh["keys_redis"].url], capture_output=True, text=True, timeout=60)
        rows = [r for r in json.loads(out.stdout) if r["tenant"] == tenant]
        if rows and rows[0]["requests"] == 2:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    assert rows[0]["cached_responses"] == 1 and rows[0]["completion_tokens"] == 5  # the hit spent none

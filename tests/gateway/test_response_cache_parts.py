"""The response cache's pure parts: the key changes with every input and only with them,
the codec round-trips and refuses damaged entries, the key policies and header modes
parse (and refuse), a model's revision follows its files, and the store's waits are
bounded against a real Redis that is frozen."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from llmesh.gateway.response_cache.codec import CorruptEntry, Entry, decode, encode
from llmesh.gateway.response_cache.key import cache_key, deterministic, embedding_key
from llmesh.gateway.response_cache.policy import decide, parse_key_policy, parse_mode_header
from llmesh.gateway.response_cache.revision import ModelRevisions
from llmesh.gateway.response_cache.store import TenantStore
from llmesh.models_file import ModelSpec, ModelsFile
from llmesh.v1 import common_pb2, inference_pb2
from tests.mesh_helpers import RedisServer

BASE = {"tenant": "acme", "model": "m", "revision": "r1", "shape": "chat", "prompt_token_ids": [1, 2, 3]}


def _key(secret: bytes = b"s", sampling: common_pb2.SamplingParams | None = None, **kw) -> str:
    sampling = sampling or common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    return cache_key(secret, **{**BASE, **kw}, sampling=sampling).digest


@pytest.mark.parametrize("change", [
    {"tenant": "other"}, {"model": "m2"}, {"revision": "r2"}, {"shape": "completion"},
    {"prompt_token_ids": [1, 2, 4]}, {"prompt_token_ids": [1, 2]}, {"secret": b"t"},
])
def test_each_input_changes_the_key(change):
    assert _key(**change) != _key()


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 9), ("top_k", 5), ("top_p", 0.5), ("min_p", 0.1), ("repetition_penalty", 1.1),
    ("presence_penalty", 0.5), ("frequency_penalty", 0.5), ("seed", 1), ("ignore_eos", True), ("logprobs", 2),
    ("min_tokens", 1), ("include_special_tokens", True), ("n", 2), ("regex", "a+"), ("json_object", True),
])
def test_each_sampling_field_changes_the_key(field, value):
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    setattr(sampling, field, value)
    assert _key(sampling=sampling) != _key()


def test_repeated_sampling_fields_change_the_key_and_map_order_does_not():
    for extra in ({"stop": ["x"]}, {"stop_token_ids": [3]}, {"logit_bias": {5: 1.0}}):
        assert _key(sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8, **extra)) != _key()
    a = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    b = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    for t in (1, 2, 3):
        a.logit_bias[t] = float(t)
    for t in (3, 1, 2):
        b.logit_bias[t] = float(t)
    assert _key(sampling=a) == _key(sampling=b)


def test_tenant_and_model_fields_cannot_be_shifted_into_each_other():
    assert _key(tenant="ab", model="c") != _key(tenant="a", model="bc")


def test_embedding_keys_follow_tenant_model_ids_and_dimensions_only():
    base = {"tenant": "acme", "model": "m", "revision": "r1", "token_ids": [1, 2, 3], "dimensions": None}

    def key(secret: bytes = b"s", **kw) -> str:
        return embedding_key(secret, **{**base, **kw}).digest

    for change in ({"tenant": "other"}, {"model": "m2"}, {"revision": "r2"}, {"token_ids": [1, 2, 4]},
                   {"token_ids": [1, 2]}, {"dimensions": 32}, {"secret": b"t"}):
        assert key(**change) != key(), change
    assert key(dimensions=32) != key(dimensions=16)
    assert key() == key()
    # a generation entry of the same prompt is never read as a vector
    assert key() != _key(tenant="acme", model="m", revision="r1", prompt_token_ids=[1, 2, 3])


def test_only_greedy_or_seeded_requests_are_deterministic():
    assert deterministic(common_pb2.SamplingParams(temperature=0.0))
    assert deterministic(common_pb2.SamplingParams(temperature=0.9, seed=3))
    assert not deterministic(common_pb2.SamplingParams(temperature=0.9))
    assert not deterministic(common_pb2.SamplingParams())  # the engine's default temperature is 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.lists(st.integers(0, 2 ** 32 - 1), max_size=5)),
                min_size=1, max_size=20))
def test_codec_round_trips(messages):
    parts = [common_pb2.GenerateResponse(text=t, token_ids=ids, index=i).SerializeToString()
             for i, (t, ids) in enumerate(messages)]
    out = decode(encode(parts))
    assert [m.SerializeToString() for m in out] == parts
    assert len(Entry(encode(parts))) == len(parts)


@pytest.mark.parametrize("value", [b"", b"LRC1", b"XXXX\x00\x00\x00\x00", b"LRC1\x05\x00\x00\x00ab",
                                   b"LRC1\x01\x00", b"LRC1\x02\x00\x00\x00\xff\xff"])
def test_damaged_entries_are_refused(value):
    with pytest.raises(CorruptEntry):
        Entry(value)


def test_key_policies_and_header_modes():
    assert parse_key_policy("").enabled is None and parse_key_policy("off").enabled is False
    assert parse_key_policy("TTL=30").ttl_s == 30.0 and parse_key_policy("on").ttl_s is None
    for bad in ("ttl=0", "ttl=-1", "ttl=x", "ttl=inf", "sometimes"):
        with pytest.raises(ValueError):
            parse_key_policy(bad)
    assert parse_mode_header(None) == inference_pb2.RESPONSE_CACHE_MODE_UNSPECIFIED
    assert parse_mode_header(" Refresh ") == inference_pb2.RESPONSE_CACHE_MODE_REFRESH
    with pytest.raises(ValueError, match="x-llmesh-cache"):
        parse_mode_header("no")
    assert decide(600, "", inference_pb2.RESPONSE_CACHE_MODE_UNSPECIFIED).ttl_s == 600
    assert decide(600, "ttl=5", inference_pb2.RESPONSE_CACHE_MODE_USE).ttl_s == 5
    refresh = decide(600, "", inference_pb2.RESPONSE_CACHE_MODE_REFRESH)
    assert not refresh.lookup and refresh.store
    assert decide(600, "", inference_pb2.RESPONSE_CACHE_MODE_BYPASS) is None
    assert decide(600, "off", inference_pb2.RESPONSE_CACHE_MODE_USE) is None
    assert decide(600, "garbled", inference_pb2.RESPONSE_CACHE_MODE_USE) is None  # unreadable: off


def test_revision_follows_the_model_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a" * 10)
    (folder / "README.md").write_text("not part of the answers")
    now = [0.0]
    models = ModelsFile([ModelSpec("m", str(folder), engine={"dtype": "float32"})], "m")
    revisions = ModelRevisions(models, refresh_s=10, clock=lambda: now[0])
    first = revisions.of("m")
    assert revisions.of("unknown") is None
    (folder / "README.md").write_text("edited")
    now[0] = 11
    assert revisions.of("m") == first
    (folder / "model.safetensors").write_bytes(b"b" * 11)
    assert revisions.of("m") == first  # re-read only after refresh_s
    now[0] = 22
    assert revisions.of("m") != first
    other = ModelRevisions(ModelsFile([ModelSpec("m", str(folder), engine={"dtype": "bfloat16"})], "m"))
    assert other.of("m") != revisions.of("m")


def test_store_waits_are_bounded_on_a_frozen_redis():
    async def run(server: RedisServer) -> None:
        client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=5)
        store = TenantStore(client, "t:", 0.05, retry_after_s=0.5)
        assert await store.put("a b", "d", b"v", 10) == ""
        assert (await store.get("a b", "d")).value == b"v"
        assert (await store.get("other", "d")).value is None
        assert await client.exists("t:a%20b:d")
        os.kill(server._proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            got = await store.get("a b", "d")
            assert got.error and "timed out" in got.error and time.monotonic() - started < 0.5
            started = time.monotonic()
            assert "paused" in (await store.get("a b", "d")).error  # no second wait during the pause
            assert time.monotonic() - started < 0.01
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.6)
        assert (await store.get("a b", "d")).value == b"v"
        # batches: one MGET, one pipeline of SETs, the same bound
        assert await store.put_many("a b", [("e", b"1"), ("f", b"2")], 10) == ""
        assert (await store.get_many("a b", ["e", "x", "f", "d"])).values == (b"1", None, b"2", b"v")
        assert 0 < await client.pttl("t:a%20b:f") <= 10_000
        os.kill(server._proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            many = await store.get_many("a b", ["e", "f"])
            assert many.error and many.values == () and time.monotonic() - started < 0.5
            assert "paused" in await store.put_many("a b", [("g", b"3")], 10)
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
        await client.aclose()

    with RedisServer() as server:
        asyncio.run(run(server))


def test_keys_cli_stores_the_policy_and_refuses_a_bad_one(tmp_path):
    keys_file = tmp_path / "keys.json"
    cli = [sys.executable, "-m", "llmesh.cli", "keys"]
    out = subprocess.run([*cli, "create", "--tenant", "acme", "--response-cache", "ttl=3600", "--keys-file",
                          str(keys_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (record,) = json.loads(keys_file.read_text())["keys"]
    assert record["response_cache"] == "ttl=3600"
    listed = subprocess.run([*cli, "list", "--keys-file", str(keys_file)], capture_output=True, text=True,
                            timeout=60)
    assert "ttl=3600" in listed.stdout
    bad = subprocess.run([*cli, "create", "--tenant", "acme", "--response-cache", "forever", "--keys-file",
                          str(keys_file)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "ttl=<seconds>" in bad.stderr

"""Embeddings through the whole mesh, as real processes (Redis, two tiny engines, the router,
the gateway with its HTTP front): the official ``openai`` SDK's ``embeddings.create`` and the
gRPC ``Inference.Embed`` give Hugging Face's vectors; a model without a pooling mode, a
``dimensions`` the model cannot give, bad inputs and an exhausted token budget are refused
with clear statuses; the engine's KV blocks are all free afterwards."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import urllib.request

import grpc
import numpy as np
import openai
import pytest
import redis
import torch
import yaml

from llmesh.engine.text.loading import load_tokenizer
from llmesh.gateway.keys import new_key, redis_put
from llmesh.v1 import engine_pb2, engine_pb2_grpc, inference_pb2, inference_pb2_grpc, router_pb2
from tests.engine.hf_reference import load_hf
from tests.mesh_helpers import RedisServer, ServiceProcess, free_port, start_engine

EMB, GEN = "emb", "gen"
TEXTS = ["The quick brown fox", "jumps over the lazy dog", "embeddings!"]


@pytest.fixture(scope="module")
def mesh(tiny_model_dirs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("embed-mesh")
    emb_path, gen_path = tiny_model_dirs["qwen3"], tiny_model_dirs["llama"]
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        emb = stack.enter_context(start_engine(
            emb_path, "--served-model-name", EMB, "--num-kv-blocks", "64", "--max-model-len", "256",
            "--block-size", "4", "--pooling", "last", "--normalize", "--matryoshka"))
        gen = stack.enter_context(start_engine(gen_path, "--served-model-name", GEN, "--num-kv-blocks", "64",
                                               "--max-model-len", "256"))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": GEN, "models": [
            {"name": EMB, "path": emb_path, "addresses": [emb.address],
             "engine": {"pooling": "last", "normalize": True, "matryoshka": True}},
            {"name": GEN, "path": gen_path, "addresses": [gen.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        http_port = free_port()
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--redis-url", redis_server.url,
            "--http-port", str(http_port)]))
        keys = {}
        client = redis.Redis.from_url(redis_server.url)
        for name, kw in {"admin": {}, "gen_only": {"models": [GEN]}, "tpm20": {"tpm": 20}}.items():
            key, record = new_key("t-" + name, **kw)
            redis_put(client, record)
            keys[name] = key
        yield {"emb": emb, "gateway": gateway, "keys": keys, "emb_path": emb_path,
               "base_url": f"http://127.0.0.1:{http_port}/v1"}


def sdk(mesh, key: str = "admin") -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh["base_url"], api_key=mesh["keys"][key], max_retries=0, timeout=60)


def reference(mesh, ids: list[int], dimensions: int | None = None) -> np.ndarray:
    """HF's last-token final hidden state, truncated, then L2-normalized."""
    with torch.no_grad():
        h = load_hf(mesh["emb_path"])(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    if dimensions:
        h = h[:dimensions]
    return torch.nn.functional.normalize(h, dim=-1).numpy()


def assert_close(got, ref) -> None:
    err = float(np.abs(np.asarray(got, np.float32) - ref).max())
    assert err < 1e-4, f"max |mesh - HF| = {err}"


def grpc_embed(mesh, request: inference_pb2.EmbedRequest, key: str = "admin") -> engine_pb2.EmbedResponse:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh["gateway"].address))
    return stub.Embed(request, metadata=[("authorization", f"Bearer {mesh['keys'][key]}")], timeout=60)


def wait_engine_idle(mesh, within_s: float = 10) -> None:
    stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh["emb"].address))
    deadline = time.monotonic() + within_s
    while True:
        load = stub.Load(engine_pb2.LoadRequest(), timeout=5)
        if load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {load}"
        time.sleep(0.02)


def test_engine_info_reports_pooling(mesh):
    info = engine_pb2_grpc.EngineStub(grpc.insecure_channel(mesh["emb"].address)).Info(
        engine_pb2.InfoRequest(), timeout=10)
    assert (info.pooling, info.normalize, info.matryoshka, info.embedding_dimensions) == ("last", True, True, 128)


@pytest.mark.parametrize("encoding", ["base64", "float", None])
def test_openai_sdk_texts_match_hf(mesh, encoding):
    tok = load_tokenizer(mesh["emb_path"])
    kw = {} if encoding is None else {"encoding_format": encoding}  # the SDK's default asks for base64
    out = sdk(mesh).embeddings.create(model=EMB, input=TEXTS, **kw)
    assert out.model == EMB and [d.index for d in out.data] == [0, 1, 2]
    ids = [tok.encode(t) for t in TEXTS]
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(map(len, ids))
    for d, p in zip(out.data, ids):
        # asked for explicitly, base64 comes back as sent; by default the SDK decodes it
        vector = np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding == "base64" else d.embedding
        assert len(vector) == 128
        assert_close(vector, reference(mesh, p))
    wait_engine_idle(mesh)


def test_token_id_inputs_and_dimensions(mesh):
    client = sdk(mesh)
    ids = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42]]
    one = client.embeddings.create(model=EMB, input=ids[0], encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == 9
    assert_close(one.data[0].embedding, reference(mesh, ids[0]))
    many = client.embeddings.create(model=EMB, input=ids, dimensions=32, encoding_format="float")
    for d, p in zip(many.data, ids):
        assert len(d.embedding) == 32
        assert_close(d.embedding, reference(mesh, p, dimensions=32))
    # the second call hit the prefix cache for its first input's full blocks: same vector
    again = client.embeddings.create(model=EMB, input=ids, dimensions=32, encoding_format="float")
    assert_close(again.data[0].embedding, reference(mesh, ids[0], dimensions=32))


def test_grpc_embed_texts_and_token_ids(mesh):
    tok = load_tokenizer(mesh["emb_path"])
    req = inference_pb2.EmbedRequest(model=EMB, request_id="mine-1", inputs=[
        inference_pb2.EmbedInput(text=TEXTS[0]),
        inference_pb2.EmbedInput(token_ids=router_pb2.TokenIds(ids=[7, 8, 9]))])
    resp = grpc_embed(mesh, req)
    assert resp.request_id == "mine-1" and resp.model == EMB and resp.replica and resp.dimensions == 128
    vectors = [np.frombuffer(d.vector, "<f4") for d in resp.data]
    assert_close(vectors[0], reference(mesh, tok.encode(TEXTS[0])))
    assert_close(vectors[1], reference(mesh, [7, 8, 9]))
    assert resp.usage.prompt_tokens == len(tok.encode(TEXTS[0])) + 3


def test_model_without_pooling_is_refused_by_name(mesh):
    with pytest.raises(openai.BadRequestError, match="model 'gen' serves no embeddings"):
        sdk(mesh).embeddings.create(model=GEN, input="hello")
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(mesh, inference_pb2.EmbedRequest(model=GEN, inputs=[inference_pb2.EmbedInput(text="hi")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'gen'" in err.value.details()


def test_bad_requests_have_clear_statuses(mesh):
    client = sdk(mesh)
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served"):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError, match="'auto' is not taken"):
        client.embeddings.create(model="auto", input="x")
    with pytest.raises(openai.BadRequestError, match="input must be a non-empty"):
        client.embeddings.create(model=EMB, input=[])
    with pytest.raises(openai.BadRequestError, match=r"outside model 'emb'.s vocabulary"):
        client.embeddings.create(model=EMB, input=[[1, 2, 100000]])
    with pytest.raises(openai.BadRequestError, match=r"dimensions must be an integer in \[1, 128\]"):
        client.embeddings.create(model=EMB, input="x", dimensions=500)
    with pytest.raises(openai.BadRequestError, match="window of model 'emb' is 256"):
        client.embeddings.create(model=EMB, input=[list(range(3, 300))])
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'emb'"):
        sdk(mesh, "gen_only").embeddings.create(model=EMB, input="x")
    wait_engine_idle(mesh)


def test_input_tokens_count_against_the_token_budget(mesh):
    client = sdk(mesh, "tpm20")
    out = client.embeddings.create(model=EMB, input=[list(range(3, 15))], encoding_format="float")  # 12 tokens
    assert out.usage.prompt_tokens == 12
    with pytest.raises(openai.RateLimitError, match="tokens_per_minute|tokens per minute"):
        client.embeddings.create(model=EMB, input=[list(range(3, 15))])  # 12 more: over 20 per minute


def test_base64_is_packed_little_endian_float32(mesh):
    resp = grpc_embed(mesh, inference_pb2.EmbedRequest(model=EMB, inputs=[inference_pb2.EmbedInput(text="abc")]))
    body = json.dumps({"model": EMB, "input": "abc", "encoding_format": "base64"}).encode()
    req = urllib.request.Request(mesh["base_url"] + "/embeddings", data=body, headers={
        "Authorization": f"Bearer {mesh['keys']['admin']}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        got = json.loads(r.read())
    assert base64.b64decode(got["data"][0]["embedding"]) == resp.data[0].vector
    assert got["object"] == "list" and got["data"][0]["object"] == "embedding"
    assert got["usage"] == {"prompt_tokens": resp.usage.prompt_tokens, "total_tokens": resp.usage.prompt_tokens}

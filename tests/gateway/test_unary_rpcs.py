"""Complete / ChatComplete / Detokenize on a real gateway (engine, router, gateway processes):
one answer equal to the streamed one, n choices by index, token text in logprobs, and
INVALID_ARGUMENT naming logit_bias."""

from __future__ import annotations

import contextlib

import grpc
import pytest
import yaml

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.mesh_helpers import ServiceProcess, start_engine

MODEL = "tiny"


@pytest.fixture(scope="module")
def stub(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unary")
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(tiny_llama, "--served-model-name", MODEL, "--num-kv-blocks", "64",
                                                  "--max-model-len", "256"))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": tiny_llama, "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--no-auth"]))
        channel = stack.enter_context(grpc.insecure_channel(gateway.address))
        yield inference_pb2_grpc.InferenceStub(channel)


def sampling(**kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, ignore_eos=True, **kw)


def test_complete_equals_the_streamed_generate(stub):
    req = inference_pb2.GenerateRequest(model=MODEL, text="Once upon a time", sampling=sampling(max_tokens=7))
    streamed = list(stub.Generate(req, timeout=60))
    whole = stub.Complete(req, timeout=60)
    assert len(whole.choices) == 1
    c = whole.choices[0]
    assert c.index == 0 and c.text == "".join(m.text for m in streamed)
    assert list(c.token_ids) == [t for m in streamed for t in m.token_ids]
    assert c.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert whole.usage.completion_tokens == 7 and whole.usage.prompt_tokens > 0 and whole.replica


def test_chat_complete_n_choices_with_token_text_in_logprobs(stub):
    req = inference_pb2.ChatRequest(model=MODEL, messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                                    sampling=sampling(max_tokens=4, n=3, logprobs=2))
    whole = stub.ChatComplete(req, timeout=60)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.text for c in whole.choices}) == 1  # greedy
    assert whole.usage.completion_tokens == 12
    for lp in whole.choices[0].logprobs:
        assert lp.token_bytes and len(lp.top) == 2 and all(t.token_bytes for t in lp.top)
    assert "".join(lp.token for lp in whole.choices[0].logprobs) == whole.choices[0].text
    streamed = list(stub.Chat(req, timeout=60))
    assert sorted({m.index for m in streamed}) == [0, 1, 2]
    assert sum(m.HasField("usage") for m in streamed) == 1 and streamed[-1].HasField("usage")


def test_detokenize_inverts_tokenize(stub):
    tok = stub.Tokenize(inference_pb2.TokenizeRequest(model=MODEL, text="hello world",
                                                      add_special_tokens=False), timeout=30)
    out = stub.Detokenize(inference_pb2.DetokenizeRequest(model=MODEL, token_ids=tok.token_ids), timeout=30)
    assert out.text == "hello world" and len(out.tokens) == len(tok.token_ids)
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(inference_pb2.DetokenizeRequest(model=MODEL, token_ids=[10**8]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(inference_pb2.DetokenizeRequest(model=MODEL, token_ids=[1] * 32769), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 32768" in e.value.details()


@pytest.mark.parametrize("bias,needle", [({10**6: 1.0}, "vocabulary"), ({5: 150.0}, "[-100, 100]"),
                                         ({i: 1.0 for i in range(301)}, "at most 300")])
def test_bad_logit_bias_is_invalid_argument_naming_the_field(stub, bias, needle):
    req = inference_pb2.GenerateRequest(model=MODEL, text="x", sampling=sampling(max_tokens=2, logit_bias=bias))
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logit_bias" in e.value.details() and needle in e.value.details(), e.value.details()

"""n, logprobs with token text, logit_bias, echo, max_completion_tokens, /tokenize and
/detokenize through the HTTP front, driven by the ``openai`` SDK against real processes
(a tiny engine, the router, the gateway with --http-port)."""

from __future__ import annotations

import contextlib
import json
import urllib.request

import openai
import pytest
import yaml

from tests.mesh_helpers import ServiceProcess, free_port, start_engine

MODEL = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "user", "content": "Say something about foxes"}]


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("http-features")
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(tiny_llama, "--served-model-name", MODEL, "--num-kv-blocks", "96",
                                                  "--max-model-len", "256"))
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": tiny_llama, "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        http_port = free_port()
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--no-auth",
            "--http-port", str(http_port)]))
        yield {"base": f"http://127.0.0.1:{http_port}", "grpc": gateway.address,
               "sdk": openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0,
                                    timeout=60)}


def post(mesh, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(mesh["base"] + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_n_greedy_choices_are_identical_indexed_and_counted_once_for_the_prompt(mesh):
    client = mesh["sdk"]
    one = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    many = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, n=3,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert {c.message.content for c in many.choices} == {one.choices[0].message.content}
    assert all(c.finish_reason == "length" for c in many.choices)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.completion_tokens == 3 * 6


def test_n_streamed_seeded_choices_are_choice_by_choice_the_single_seeded_requests(mesh):
    client = mesh["sdk"]
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    finished = set()
    for chunk in client.completions.create(**kw, n=3, seed=11, stream=True):
        for c in chunk.choices:
            assert c.index not in finished
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    singles = [client.completions.create(**kw, seed=11 + i).choices[0].text for i in range(3)]
    assert [texts[i] for i in range(3)] == singles


def test_chat_logprobs_carry_token_text_bytes_and_top_alternatives(mesh):
    out = mesh["sdk"].chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        assert bytes(c.bytes).decode("utf-8", errors="replace") == c.token
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token  # greedy: the chosen token is the best one
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)


def test_completion_logprobs_and_echo(mesh):
    client = mesh["sdk"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(top) <= 2 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))

    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + out.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == echoed.choices[0].text


def test_echo_with_logprobs_leads_with_the_prompt_tokens(mesh):
    client = mesh["sdk"]
    _, tok = post(mesh, "/tokenize", {"model": MODEL, "prompt": PROMPT})
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                    logprobs=2, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    n_prompt = len(tok["tokens"])
    assert len(lp.tokens) == n_prompt + 3 and out.usage.prompt_tokens == n_prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert all(isinstance(p, float) and p <= 0 for p in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [p for s in streamed for p in s.token_logprobs] == pytest.approx(lp.token_logprobs)


def test_grpc_echo_and_prompt_logprobs_agree_with_the_generated_tokens_logprob(mesh):
    """Prompt token i's logprob is the logprob the model gave it when it generated it."""
    import grpc

    from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2

    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh["grpc"]))
    prompt = [5, 17, 99, 250, 31, 8]
    first = inference_pb2.GenerateRequest(model=MODEL, token_ids=router_pb2.TokenIds(ids=prompt),
                                          sampling=common_pb2.SamplingParams(max_tokens=1, temperature=0,
                                                                             logprobs=0, ignore_eos=True))
    generated = stub.Complete(first, timeout=60).choices[0]
    longer = prompt + list(generated.token_ids)
    req = inference_pb2.GenerateRequest(model=MODEL, token_ids=router_pb2.TokenIds(ids=longer), echo=True,
                                        sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0,
                                                                           prompt_logprobs=1, ignore_eos=True))
    msgs = list(stub.Generate(req, timeout=60))
    assert list(msgs[0].prompt_token_ids) == longer and msgs[0].prompt_text
    plps = msgs[0].prompt_logprobs
    assert [p.token_id for p in plps] == longer[1:]
    assert plps[-1].logprob == pytest.approx(generated.logprobs[0].logprob, abs=1e-4)
    assert plps[-1].rank == 1 and len(plps[-1].top) == 1  # it was the greedy choice
    assert not any(m.prompt_token_ids or m.prompt_logprobs for m in msgs[1:])
    whole = stub.Complete(req, timeout=60)
    assert list(whole.prompt_token_ids) == longer and len(whole.choices[0].prompt_logprobs) == len(longer) - 1


def test_logit_bias_steers_one_request_and_bad_bias_is_400_naming_it(mesh):
    client = mesh["sdk"]
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    status, tok = post(mesh, "/tokenize", {"model": MODEL, "prompt": " zebra", "add_special_tokens": False})
    assert status == 200
    forced = tok["tokens"][0]
    biased = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                       logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    status, back = post(mesh, "/detokenize", {"model": MODEL, "tokens": [forced] * 5})
    assert biased.choices[0].text == back["prompt"] != plain.choices[0].text
    for bias in ({"999999": 5}, {"5": 101}, {str(i): 1 for i in range(301)}, {"x": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logit_bias=bias)
        assert "logit_bias" in (e.value.body.get("param") or "") + e.value.message, e.value.body


def test_max_completion_tokens_takes_precedence_over_max_tokens(mesh):
    out = mesh["sdk"].chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9,
                                              max_completion_tokens=3, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_tokenize_and_detokenize_round_trip(mesh):
    status, tok = post(mesh, "/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert status == 200 and tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 256
    status, back = post(mesh, "/detokenize", {"model": MODEL, "tokens": tok["tokens"]})
    assert status == 200 and back["prompt"].strip() == PROMPT
    status, err = post(mesh, "/detokenize", {"model": MODEL, "tokens": [10**9]})
    assert status == 400 and "vocabulary" in err["error"]["message"]
    status, err = post(mesh, "/detokenize", {"model": "nope", "tokens": [1]})
    assert status == 404


def test_speculative_is_a_per_request_flag(mesh):
    status, body = post(mesh, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                                                  "speculative": False})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
    status, body = post(mesh, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                                                  "speculative": "no"})
    assert status == 400 and body["error"]["param"] == "speculative"

"""The gateway's request checks, as pure functions, and its tokenizer table (no processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest

from llmesh.errors import ServiceError
from llmesh.gateway.tokenizers import ModelTokenizers
from llmesh.gateway.validation import (
    AUTO,
    check_messages,
    check_prompt_present,
    check_request_id,
    check_request_size,
    check_text,
    check_token_ids,
    fit_window,
    resolve_model,
    sampling_proto_with,
    to_sampling_params,
)
from llmesh.v1 import common_pb2
from tests.fixtures.tiny_tokenizer import build_tiny_tokenizer


def _refused(fn, *args, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(ServiceError) as info:
        fn(*args)
    assert info.value.code == code
    return info.value.message


def test_request_size_limit_names_both_numbers():
    check_request_size(1024, 1024)
    msg = _refused(check_request_size, 2_000_000, 1 << 20)
    assert "2000000" in msg and str(1 << 20) in msg and "max_request_bytes" in msg


def test_text_with_a_lone_surrogate_is_refused():
    check_text("héllo ✓ 😀", "prompt.text")
    msg = _refused(check_text, "ab\ud800cd", "prompt.text")
    assert "prompt.text" in msg and "surrogate" in msg


def test_request_id_limits():
    check_request_id("")
    check_request_id("req-1")
    assert "128" in _refused(check_request_id, "x" * 129)
    _refused(check_request_id, "a\nb")


def test_unknown_model_is_not_found_and_lists_the_models():
    assert resolve_model("small", ["small", "large"]) == "small"
    assert resolve_model("auto", ["small"]) == AUTO
    assert resolve_model("  ", ["small"]) == AUTO
    msg = _refused(resolve_model, "gpt-5", ["small", "large"], code=grpc.StatusCode.NOT_FOUND)
    assert "'gpt-5'" in msg and "large, small" in msg and "auto" in msg
    _refused(resolve_model, "auto", [], code=grpc.StatusCode.UNAVAILABLE)


def test_prompt_must_be_present():
    check_prompt_present("text", "hi", [])
    check_prompt_present("token_ids", "", [1, 2])
    for kind, text, ids in ((None, "", []), ("text", "", []), ("token_ids", "", [])):
        assert "prompt is empty" in _refused(check_prompt_present, kind, text, ids)


def test_token_ids_must_be_in_the_vocabulary():
    check_token_ids([0, 511], 512, "m", "prompt.token_ids")
    msg = _refused(check_token_ids, [3, 512], 512, "m", "prompt.token_ids")
    assert "prompt.token_ids[1] = 512" in msg and "[0, 512)" in msg


def test_chat_messages_roles_and_content():
    assert check_messages([("system", "s"), ("user", "u")]) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert "messages is empty" in _refused(check_messages, [])
    msg = _refused(check_messages, [("user", "a"), ("wizard", "b")])
    assert "messages[1].role" in msg and "'wizard'" in msg
    assert "messages[0].content" in _refused(check_messages, [("user", "\udfff")])


@pytest.mark.parametrize("field,value,needle", [
    ("max_tokens", 0, "sampling.max_tokens"),
    ("temperature", -1.0, "sampling.temperature"),
    ("top_p", 2.0, "sampling.top_p"),
    ("top_p", 0.0, "sampling.top_p"),
    ("min_p", 1.5, "sampling.min_p"),
    ("repetition_penalty", 0.0, "sampling.repetition_penalty"),
    ("presence_penalty", 3.0, "sampling.presence_penalty"),
    ("frequency_penalty", -2.5, "sampling.frequency_penalty"),
    ("logprobs", 21, "sampling.logprobs"),
    ("top_k", -2, "sampling.top_k"),
    ("temperature", float("nan"), "sampling.temperature"),
])
def test_sampling_out_of_range_names_the_field(field, value, needle):
    proto = common_pb2.SamplingParams(**{field: value})
    msg = _refused(to_sampling_params, proto, 16)
    assert msg.startswith(needle), msg


def test_sampling_conversion_keeps_every_field():
    proto = common_pb2.SamplingParams(
        temperature=0.5, top_k=7, top_p=0.75, min_p=0.125, repetition_penalty=1.25,
        presence_penalty=0.5, frequency_penalty=-0.5, seed=42, stop=["\n\n"], stop_token_ids=[2],
        ignore_eos=True, logprobs=3, min_tokens=1, include_special_tokens=True)
    p = to_sampling_params(proto, 99)
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (99, 0.5, 7, 0.75, 0.125)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.25, 0.5, -0.5)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (42, ["\n\n"], [2], True)
    assert (p.logprobs, p.min_tokens, p.skip_special_tokens) == (3, 1, False)
    unset = to_sampling_params(common_pb2.SamplingParams(), 16)
    assert (unset.temperature, unset.seed, unset.logprobs, unset.skip_special_tokens) == (1.0, None, None, True)
    assert "sampling.min_tokens" in _refused(
        to_sampling_params, common_pb2.SamplingParams(min_tokens=10), 5)


def test_window_checks_and_default_max_tokens():
    assert fit_window(10, None, 256, 1024, "m") == 256
    assert fit_window(1000, None, 256, 1024, "m") == 24
    assert fit_window(10, 1014, 256, 1024, "m") == 1014
    assert fit_window(10, 5000, 256, 0, "m") == 5000  # unknown window: the engine checks
    msg = _refused(fit_window, 1024, None, 256, 1024, "m")
    assert "1024 tokens" in msg and "is 1024 tokens" in msg and "at least 1 tokens" in msg
    msg = _refused(fit_window, 100, 1000, 256, 1024, "m")
    assert "max_tokens (1000)" in msg and "at most 924" in msg


def test_sampling_proto_with_fills_max_tokens_without_touching_the_request():
    req = common_pb2.SamplingParams(temperature=0.0)
    out = sampling_proto_with(req, 12)
    assert out.max_tokens == 12 and out.HasField("temperature") and not req.HasField("max_tokens")


def test_model_tokenizers_encode_text_and_chat(tmp_path):
    build_tiny_tokenizer(str(tmp_path))
    from llmesh.engine.text.loading import load_tokenizer

    tok = load_tokenizer(str(tmp_path))
    table = ModelTokenizers({"tiny": tok})
    out = table.tokenize("tiny", text="The quick brown fox")
    assert out.token_ids == tok.encode("The quick brown fox")
    assert "".join(out.tokens).replace("Ġ", " ") == "The quick brown fox"
    messages = [{"role": "user", "content": "Hello"}]
    assert table.tokenize("tiny", messages=messages).token_ids == tok.encode_chat(messages)


def test_gateway_modules_do_not_import_torch(tmp_path):
    build_tiny_tokenizer(str(tmp_path))
    code = textwrap.dedent(f"""
        import sys
        import llmesh.gateway.main, llmesh.gateway.servicer, llmesh.client, llmesh.cli_client
        from llmesh.gateway.tokenizers import ModelTokenizers
        from llmesh.models_file import parse_models
        models = parse_models({{"models": [{{"name": "tiny", "path": {str(tmp_path)!r}}}]}})
        table = ModelTokenizers.load(models)
        table.tokenize("tiny", messages=[{{"role": "user", "content": "hi"}}])
        assert "torch" not in sys.modules, "the gateway imported torch"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

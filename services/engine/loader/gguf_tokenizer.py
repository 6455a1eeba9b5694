"""A ``tokenizers.Tokenizer`` rebuilt from a GGUF's tokenizer metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges (or SentencePiece
scores), token types and special ids under ``tokenizer.ggml.*``. Two families are rebuilt
here, matching what transformers builds from the same file (so ids agree with the HF
tokenizer the model was trained with):

- ``gpt2``: byte-level BPE. The split regex before BPE depends on ``tokenizer.ggml.pre``
  (the pre-tokenizer llama.cpp detected when converting); unknown ones are refused
  rather than guessed, since a wrong split silently changes every prompt's ids.
- ``llama``: SentencePiece BPE with byte fallback (``<0xNN>`` tokens), "▁" for spaces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from llmesh.engine.errors import UnsupportedModelError

TOKEN_TYPE_CONTROL = 3
"""llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte."""
TOKEN_TYPE_USER_DEFINED = 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_SPLITS = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT,
    # SmolLM / StarCoder: llama.cpp and the original tokenizer.json isolate every digit first.
    "smollm": None, "starcoder": None, "refact": None,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
"""tokenizer.ggml.pre → split regex applied before byte-level BPE (None: digits, then GPT-2)."""


@dataclass
class GGUFTokenizerData:
    """Everything the text layer needs from a GGUF: the tokenizer and its special tokens."""

    backend: Tokenizer
    """Encodes with the file's BOS/EOS policy applied when add_special_tokens=True."""
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    special_token_ids: set[int]
    """Control tokens plus bos/eos/unk/pad: what skip_special_tokens drops."""
    bos_token: str | None
    eos_token: str | None


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, the spelling of byte-level vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 map, in order, to U+0100 up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary that lists scores but no merges.

    Every split of a token into two tokens of the vocabulary is a merge; a merge ranks by
    the score of the token it makes (higher first), ties by the lengths of its parts.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _file_merges(metadata: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    return [tuple(merge.split(" ", 1)) for merge in merges]


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in _SPLITS:
        raise UnsupportedModelError(
            f"GGUF tokenizer pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; llmesh knows "
            f"{', '.join(sorted(_SPLITS))}. Serve the model from its Hugging Face folder instead")
    split = _SPLITS[pre]
    if split is None:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if split == _GPT2_SPLIT:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_tokenizer(metadata: Mapping[str, Any], tokens: list[str]) -> Tokenizer:
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    # Some converters store a token's raw text instead of its byte spelling; respell those.
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(tokens)}
    merges = _file_merges(metadata)
    if merges is None:
        raise UnsupportedModelError("GGUF byte-level (gpt2) tokenizer has no tokenizer.ggml.merges")
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre") or "default")
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_tokenizer(metadata: Mapping[str, Any], tokens: list[str], unk_token: str | None) -> Tokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _file_merges(metadata)
    if merges is None:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise UnsupportedModelError("GGUF SentencePiece tokenizer has neither merges nor scores")
        merges = merges_from_scores(tokens, list(scores))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True,
                            byte_fallback=True, dropout=None))
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _token(tokens: list[str], token_id: int | None) -> str | None:
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def _add_special_tokens(backend: Tokenizer, tokens: list[str], token_types: list[int],
                        named_ids: list[int], byte_level: bool) -> set[int]:
    """Register control and named special tokens as whole-match special tokens and user-defined
    ones as whole-match plain tokens; returns the special ids.

    In a byte-level vocabulary a "control" token outside the byte alphabet is a converter
    mislabel; adding it would grow the vocabulary past the model's, so it is skipped.
    """
    alphabet = set(byte_to_unicode().values()) if byte_level else None
    special_ids = {i for i, kind in enumerate(token_types) if kind == TOKEN_TYPE_CONTROL}
    special_ids |= {i for i in named_ids if 0 <= i < len(tokens)}
    addable = [i for i in sorted(special_ids) if alphabet is None or set(tokens[i]) <= alphabet]
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in addable])
    vocab = backend.get_vocab()
    user_defined = [AddedToken(tokens[i], special=False, normalized=False)
                    for i, kind in enumerate(token_types)
                    if kind == TOKEN_TYPE_USER_DEFINED and tokens[i] in vocab]
    if user_defined:
        backend.add_tokens(user_defined)
    return special_ids


def _post_processor(bos: str | None, bos_id: int | None, add_bos: bool,
                    eos: str | None, eos_id: int | None, add_eos: bool) -> processors.PostProcessor | None:
    """BOS/EOS around every encoded sequence, as the file asks (None: add nothing)."""
    head = [bos] if add_bos and bos is not None else []
    tail = [eos] if add_eos and eos is not None else []
    if not head and not tail:
        return None

    def template(sequence: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in head] + [f"${sequence}:{type_id}"] + [f"{t}:{type_id}" for t in tail]

    ids = {bos: bos_id, eos: eos_id}
    specials = {token: ids[token] for token in head + tail}
    return processors.TemplateProcessing(single=template("A", 0), pair=template("A", 0) + template("B", 1),
                                         special_tokens=list(specials.items()))


def gguf_tokenizer_data(metadata: Mapping[str, Any]) -> GGUFTokenizerData:
    """Build the tokenizer described by a GGUF's metadata (keys as in the file)."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedModelError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    tokens = list(tokens)
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [])
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    pad_id = metadata.get("tokenizer.ggml.padding_token_id")
    if model == "gpt2":
        backend = _byte_level_tokenizer(metadata, tokens)
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    elif model == "llama":
        backend = _sentencepiece_tokenizer(metadata, tokens, _token(tokens, unk_id))
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; llmesh builds "
            f"'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE) tokenizers")
    named_ids = [i for i in (bos_id, eos_id, unk_id, pad_id) if i is not None]
    special_ids = _add_special_tokens(backend, tokens, token_types, named_ids, byte_level=model == "gpt2")
    bos, eos = _token(tokens, bos_id), _token(tokens, eos_id)
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    post = _post_processor(bos, bos_id, add_bos, eos, eos_id, add_eos)
    if post is not None:
        backend.post_processor = post
    return GGUFTokenizerData(
        backend=backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        add_bos_token=add_bos and bos is not None,
        chat_template=metadata.get("tokenizer.chat_template"),
        special_token_ids=special_ids,
        bos_token=bos,
        eos_token=eos,
    )

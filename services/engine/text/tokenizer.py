"""The engine's tokenizer: a ``tokenizers.Tokenizer`` plus the model's special-token facts.

Encoding and decoding match Hugging Face transformers' fast tokenizers on the same files
(the tests compare them): text goes through the backend without its post-processor, and
BOS/EOS are added here from ``add_bos_token`` / ``add_eos_token`` (read from a folder's
tokenizer.json post-processor or a GGUF's ``tokenizer.ggml.add_bos_token``), so both
sources follow one rule. The one deliberate difference: a BOS is not added when the text
already starts with it (a prompt that spells out ``<s>`` would otherwise get two, which
degrades output).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import tokenizers

from llmesh.engine.errors import ModelLoadError
from llmesh.engine.text.chat_template import render_chat_template

__all__ = ["Tokenizer"]


class Tokenizer:
    """Text ↔ token ids for one model, and its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos_token: bool,
        chat_template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_token_ids: set[int] | None = None,
        add_eos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.add_eos_token = add_eos_token and bool(self.eos_token_ids)
        self.chat_template = chat_template or None
        self.bos_token = bos_token if bos_token is not None else _id_to_token(backend, bos_token_id)
        eos_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token = eos_token if eos_token is not None else _id_to_token(backend, eos_id)
        if special_token_ids is None:
            special_token_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_token_ids = frozenset(special_token_ids)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        """Number of token ids the tokenizer knows (added tokens included), like len(hf_tokenizer)."""

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, path: str) -> Tokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` from a Hugging Face folder.

        Whether BOS/EOS are added comes from tokenizer.json's post-processor, as in
        transformers 5, which ignores ``add_bos_token`` in tokenizer_config.json when a
        tokenizer.json is present (Llama 2 and 3 files put their BOS there).

        The chat template comes from ``chat_template.jinja`` or ``chat_template.json`` when
        present (newer checkpoints), else from ``tokenizer_config.json``. EOS ids from
        ``generation_config.json`` are merged in, since instruct models often end turns
        with a token other than the tokenizer's ``eos_token`` (Llama 3's ``<|eot_id|>``).
        """
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise ModelLoadError(
                f"{path} has no tokenizer.json; llmesh needs the fast-tokenizer file "
                "(save it with transformers' tokenizer.save_pretrained)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise ModelLoadError(f"cannot read {file}: {e}") from e
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        bos_token = _token_content(config.get("bos_token", special_map.get("bos_token")))
        eos_token = _token_content(config.get("eos_token", special_map.get("eos_token")))
        bos_id = backend.token_to_id(bos_token) if bos_token else None
        eos_ids = [backend.token_to_id(eos_token)] if eos_token else []
        eos_ids += _as_id_list(
            _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        )
        eos_ids = [i for i in eos_ids if i is not None]
        add_bos, add_eos = _post_processor_adds(backend, bos_id, eos_ids[:1])
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            chat_template=_load_chat_template(path, config),
            bos_token=bos_token,
            eos_token=eos_token,
        )

    @classmethod
    def from_gguf_data(cls, data: Any) -> Tokenizer:
        """Build from the GGUF loader's tokenizer data (read by attribute, duck-typed)."""
        eos = data.eos_token_id
        special = getattr(data, "special_token_ids", None)
        return cls(
            data.backend,
            bos_token_id=data.bos_token_id,
            eos_token_ids=_as_id_list(eos),
            add_bos_token=bool(data.add_bos_token),
            add_eos_token=bool(getattr(data, "add_eos_token", False)),
            chat_template=data.chat_template,
            bos_token=getattr(data, "bos_token", None),
            eos_token=getattr(data, "eos_token", None),
            special_token_ids=set(special) if special is not None else None,
        )

    # ---- encode / decode ------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the tokenizer's own ``eos_token``), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token:
                ids.append(self.eos_token_ids[0])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids the tokenizer does not know (padded vocab rows) are ignored."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary strings of ``ids`` (None for an unknown id)."""
        return [self.backend.id_to_token(int(i)) for i in ids]

    # ---- chat -----------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the model's template (see ``render_chat_template``)."""
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, **kwargs,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Prompt ids of a conversation, as transformers' ``apply_chat_template(tokenize=True)``.

        The template writes every special token the model expects (BOS included), so the
        rendered text is encoded without adding any: adding BOS again would double it.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos_ids={self.eos_token_ids}, add_bos={self.add_bos_token})")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _id_to_token(backend: tokenizers.Tokenizer, token_id: int | None) -> str | None:
    return backend.id_to_token(token_id) if token_id is not None else None


def _post_processor_adds(backend: tokenizers.Tokenizer, bos_id: int | None,
                         eos_ids: list[int]) -> tuple[bool, bool]:
    """Whether the backend's own post-processor adds BOS / EOS (e.g. Llama 3's template).

    Probing it once lets encode() add the same tokens itself, under the same rule for
    folders and GGUF files.
    """
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    if full == plain:
        return False, False
    adds_bos = bos_id is not None and full[:1] == [bos_id] and plain[:1] != [bos_id]
    adds_eos = bool(eos_ids) and full[-1:] == eos_ids[:1] and plain[-1:] != eos_ids[:1]
    return adds_bos, adds_eos


def _load_chat_template(path: str, config: dict) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates (e.g. "default" and "tool_use"): chat uses the default.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None

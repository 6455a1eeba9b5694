"""Every served model's tokenizer, loaded once when the gateway starts.

The gateway tokenizes (and renders chat templates) itself so that requests reach the
router as token ids: the router hashes them for prefix-cache routing and the engine does
no text work on the hot path. Only tokenizers are read (``load_tokenizer``), never
weights, so the gateway needs neither torch nor the model files' tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.text.loading import load_tokenizer
from llmesh.engine.text.tokenizer import Tokenizer
from llmesh.models_file import ModelsFile

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Tokenized:
    """Token ids of a text and their vocabulary strings."""

    token_ids: list[int]
    tokens: list[str]


class ModelTokenizers:
    """Model name → its tokenizer."""

    def __init__(self, tokenizers: dict[str, Tokenizer], unavailable: dict[str, str] | None = None) -> None:
        self._by_model = dict(tokenizers)
        self.unavailable = dict(unavailable or {})
        """Model name → why it cannot be served here (its files are missing)."""

    @classmethod
    def load(cls, models: ModelsFile) -> ModelTokenizers:
        """Load the tokenizer of every model whose files exist; a model whose path is missing
        is reported unavailable instead (a deployment may mount only some models, as compose
        does without its "large" profile). A path that exists but does not load fails fast."""
        loaded, unavailable = {}, {}
        for spec in models.models:
            path = spec.resolved_path()
            if not os.path.exists(path):
                unavailable[spec.name] = f"model {spec.name!r} is unavailable: its files are missing at {path}"
                log.warning("model unavailable", extra={"model": spec.name, "path": path,
                                                        "reason": "files missing"})
                continue
            loaded[spec.name] = load_tokenizer(path)
            log.info("tokenizer loaded", extra={"model": spec.name, "path": path,
                                                "vocab_size": loaded[spec.name].vocab_size})
        return cls(loaded, unavailable)

    @property
    def names(self) -> list[str]:
        return list(self._by_model)

    def get(self, model: str) -> Tokenizer | None:
        return self._by_model.get(model)

    def tokenize(self, model: str, text: str = "", messages: list[dict] | None = None,
                 add_special_tokens: bool = True) -> Tokenized:
        """Tokens of ``text``, or of ``messages`` rendered with the chat template."""
        tok = self._by_model.get(model)
        if tok is None:
            raise InvalidRequestError(f"no tokenizer loaded for model {model!r}", field="model")
        ids = tok.encode_chat(messages) if messages else tok.encode(text, add_special_tokens=add_special_tokens)
        return Tokenized(ids, [t if t is not None else "" for t in tok.convert_ids_to_tokens(ids)])

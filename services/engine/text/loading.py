"""Load only a model's tokenizer (HF folder or GGUF metadata), without torch or weights.

The gateway tokenizes and renders chat templates itself; it needs the tokenizer of each
model it serves, not the model.
"""

from __future__ import annotations

import os

from llmesh.engine.errors import ModelLoadError
from llmesh.engine.text.tokenizer import Tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of the model at ``path`` (a HF folder, a .gguf file or ``random:<preset>``)."""
    if path.startswith("random:"):
        from llmesh.engine.loader.random_weights import random_tokenizer_for

        return Tokenizer.from_gguf_data(random_tokenizer_for(path))
    if os.path.isdir(path):
        return Tokenizer.from_hf_folder(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model path {path} does not exist")
    from gguf import GGUFReader

    from llmesh.engine.loader.gguf_tokenizer import gguf_tokenizer_data

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader fails with numpy errors on corrupt files
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    metadata = {key: field.contents() for key, field in reader.fields.items()
                if key.startswith("tokenizer.")}
    return Tokenizer.from_gguf_data(gguf_tokenizer_data(metadata))

"""Model loading from local files: a Hugging Face folder or a GGUF file, never a hub.

    loaded = load_model("/models/Llama-3.2-1B-Instruct")       # HF folder
    loaded = load_model(find_demo_model())                      # SmolLM2-135M GGUF
    for hf_name, tensor in loaded.weights: ...

Names load lazily so that reading a GGUF's tokenizer (``gguf_tokenizer``) does not
import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoadedModel": "load", "load_model": "load", "find_demo_model": "load", "DEMO_MODEL_FILE": "load",
    "GGUFTokenizerData": "gguf_tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmesh.engine.loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llmesh.engine.loader.{module}"), name)
    globals()[name] = value
    return value

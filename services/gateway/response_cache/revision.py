"""A model's revision: something that changes whenever the answers of a model name may.

The gateway knows each model from its models file: the name, the path of its weights and
the engine options that change outputs (dtype, quantization, ...). The revision hashes
those with the size and modification time of the files under the path (weights, config,
tokenizer), so swapping the weights behind an unchanged name, or changing the path or
the engine options, starts a fresh set of cache entries; the old ones expire by TTL. The
files are stat'ed again at most every ``refresh_s``: a handful of stat calls, cheap
enough for the event loop. Engines started outside the models file with other options
than it names are beyond what the gateway can see (docs/response-cache.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

from llmesh.models_file import ModelSpec, ModelsFile

_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model", ".txt")
"""Files of a model folder whose change may change its answers (weights, configs, tokenizers)."""
MAX_FILES = 256
"""Stat at most this many files of a folder (a folder with more is hashed by these)."""


def _stat_lines(path: str) -> list[str]:
    if os.path.isfile(path):
        paths = [path]
    else:
        try:
            paths = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(_FILES))[:MAX_FILES]
        except OSError:
            return ["unreadable"]
    lines = []
    for p in paths:
        try:
            st = os.stat(p)
            lines.append(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            lines.append(f"{os.path.basename(p)}:missing")
    return lines


def fingerprint(spec: ModelSpec, resolved_path: str) -> str:
    text = json.dumps({"name": spec.name, "path": spec.path, "resolved": resolved_path,
                       "engine": spec.engine, "files": _stat_lines(resolved_path)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ModelRevisions:
    def __init__(self, models: ModelsFile, refresh_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._specs: dict[str, tuple[ModelSpec, str]] = {}
        for spec in models.models:
            try:
                self._specs[spec.name] = (spec, spec.resolved_path())
            except Exception:  # noqa: BLE001 - a model the gateway cannot resolve is never cached
                continue
        self._refresh_s = refresh_s
        self._clock = clock
        self._known: dict[str, tuple[float, str]] = {}

    def of(self, model: str) -> str | None:
        """The model's revision; None for a model the models file does not describe."""
        entry = self._specs.get(model)
        if entry is None:
            return None
        now = self._clock()
        known = self._known.get(model)
        if known is None or now - known[0] >= self._refresh_s:
            known = self._known[model] = (now, fingerprint(*entry))
        return known[1]

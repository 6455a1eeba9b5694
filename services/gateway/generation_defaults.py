"""Per-model sampling defaults: what a request gets for the fields it leaves unset.

A model's authors publish the sampling they tuned it for in ``generation_config.json``
(temperature, top_p, top_k, repetition_penalty); the models file's ``generation``
overrides them key by key (a GGUF file carries none, so that is where its defaults go).

They are applied in the gateway, not the engine: the gateway already owns the models
file and each request's validation, so the values the request is checked, rate-limited,
logged and traced with are the ones the engine runs, and ListModels can show them
without a new engine-to-router field. ``do_sample`` is ignored (as vLLM does): a
generation_config that omits it would otherwise turn every request greedy.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

from llmesh.engine.errors import InvalidRequestError
from llmesh.models_file import GENERATION_KEYS, ModelsFile, ModelsFileError
from llmesh.sampling_proto import sampling_from_proto
from llmesh.v1 import common_pb2

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"


def read_generation_config(path: str) -> dict[str, float]:
    """The GENERATION_KEYS that a Hugging Face folder's generation_config.json sets."""
    file = os.path.join(path, GENERATION_CONFIG)
    if not os.path.isdir(path) or not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelsFileError(f"cannot read {file}: {e}") from None
    return {k: doc[k] for k in GENERATION_KEYS
            if isinstance(doc, dict) and isinstance(doc.get(k), (int, float)) and not isinstance(doc[k], bool)}


class GenerationDefaults:
    """Model name → its sampling defaults (a SamplingParams with only those fields set)."""

    def __init__(self, by_model: dict[str, dict[str, float]]) -> None:
        self._by_model = {name: _proto(values) for name, values in by_model.items()}

    @classmethod
    def load(cls, models: ModelsFile) -> GenerationDefaults:
        by_model = {}
        for spec in models.models:
            values = {**read_generation_config(spec.resolved_path()), **spec.generation}
            try:
                sampling_from_proto(_proto(values))
            except InvalidRequestError as e:
                raise ModelsFileError(f"model {spec.name!r}: generation default {e}") from None
            by_model[spec.name] = values
            if values:
                log.info("generation defaults", extra={"model": spec.name, **values})
        return cls(by_model)

    def of(self, model: str) -> common_pb2.SamplingParams:
        """The model's defaults (an empty message for a model without any)."""
        return self._by_model.get(model) or common_pb2.SamplingParams()

    def common(self, models: Iterable[str]) -> common_pb2.SamplingParams:
        """The defaults every one of ``models`` shares: what ``auto`` can apply before the
        router has chosen (a field the candidates disagree on stays unset)."""
        protos = [self.of(m) for m in models]
        out = common_pb2.SamplingParams()
        for key in GENERATION_KEYS:
            values = {getattr(p, key) if p.HasField(key) else None for p in protos}
            if len(values) == 1 and None not in values:
                setattr(out, key, values.pop())
        return out


def apply_defaults(sampling: common_pb2.SamplingParams, defaults: common_pb2.SamplingParams) -> None:
    """Set each default field that ``sampling`` leaves unset (in place)."""
    for key in GENERATION_KEYS:
        if defaults.HasField(key) and not sampling.HasField(key):
            setattr(sampling, key, getattr(defaults, key))


def _proto(values: dict[str, float]) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams()
    for key, value in values.items():
        setattr(out, key, int(value) if key == "top_k" else float(value))
    return out

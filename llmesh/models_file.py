"""The models file: which models the mesh serves, read by ``llmesh up``, the router, the
gateway and compose alike.

    default_model: smollm2-135m
    models:
      - name: smollm2-135m
        path: demo               # "demo" (the demo GGUF), a HF folder or a .gguf file
        size_class: small        # small | large: the classes of the router's "auto" policy
        replicas: 1
        addresses: []            # host:port per replica; `llmesh up` fills them in
        # discovery: dns://llmesh-engine-small.llmesh.svc.cluster.local:50061
        #                        # instead of addresses: the router resolves this name's A/AAAA
        #                        # records periodically (Kubernetes: a headless Service)
        engine:                  # engine options by name (docs/configuration.md), per model
          dtype: float32
          max_num_seqs: 32
        generation:              # sampling defaults for requests that leave them unset
          temperature: 0.2       # (over the model's generation_config.json)
          top_p: 0.9
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from llmesh.config import check_values
from llmesh.engine.config import EngineConfig

DEMO = "demo"
SIZE_CLASSES = ("small", "large")
GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
"""Sampling fields a model's generation defaults may set (as in generation_config.json)."""
SET_BY_SPEC = {"model": "it is the model's 'path'", "served_model_name": "it is the model's 'name'"}
"""Engine options a model's ``engine:`` section may not set, and why."""


class ModelsFileError(ValueError):
    """The models file is missing, unreadable or inconsistent; the message says where."""


@dataclasses.dataclass
class ModelSpec:
    name: str
    """Name clients use; also the engines' served model name and prefix-hash namespace."""
    path: str
    """``demo``, a Hugging Face folder or a .gguf file (local files only)."""
    size_class: str = "small"
    replicas: int = 1
    addresses: list[str] = dataclasses.field(default_factory=list)
    """host:port of each replica's engine."""
    discovery: str = ""
    """``dns://HOST:PORT``: the router finds the replicas as the A/AAAA records of HOST
    (re-resolved periodically), each serving on PORT; exclusive with ``addresses``."""
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)
    """EngineConfig options of this model's engines, e.g. {"dtype": "float32", "max_num_seqs": 32};
    ``model`` and ``served_model_name`` come from ``path`` and ``name``."""
    generation: dict[str, float] = dataclasses.field(default_factory=dict)
    """Sampling defaults (GENERATION_KEYS) for requests that leave them unset; they
    override the model's own generation_config.json, key by key."""

    def resolved_path(self) -> str:
        if self.path == DEMO:
            from llmesh.demo_model import find_demo_model

            return find_demo_model()
        return self.path


@dataclasses.dataclass
class ModelsFile:
    models: list[ModelSpec]
    default_model: str

    def get(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def to_dict(self) -> dict[str, Any]:
        return {"default_model": self.default_model, "models": [dataclasses.asdict(m) for m in self.models]}

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def parse_models(doc: Any, where: str = "models file") -> ModelsFile:
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
        raise ModelsFileError(f"{where}: expected a mapping with a non-empty 'models' list")
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    models: list[ModelSpec] = []
    for i, m in enumerate(doc["models"]):
        at = f"{where}: models[{i}]"
        if not isinstance(m, dict):
            raise ModelsFileError(f"{at}: expected a mapping")
        unknown = set(m) - known
        if unknown:
            raise ModelsFileError(f"{at}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        for key in ("name", "path"):
            if not isinstance(m.get(key), str) or not m[key]:
                raise ModelsFileError(f"{at}: '{key}' must be a non-empty string")
        spec = ModelSpec(**m)
        if spec.size_class not in SIZE_CLASSES:
            raise ModelsFileError(f"{at}: size_class must be one of {SIZE_CLASSES}, got {spec.size_class!r}")
        if not isinstance(spec.replicas, int) or spec.replicas < 1:
            raise ModelsFileError(f"{at}: replicas must be an integer >= 1, got {spec.replicas!r}")
        if spec.addresses and len(spec.addresses) != spec.replicas:
            raise ModelsFileError(f"{at}: {len(spec.addresses)} addresses for {spec.replicas} replicas")
        if spec.discovery:
            try:
                parse_discovery(spec.discovery)
            except ValueError as e:
                raise ModelsFileError(f"{at}: {e}") from None
            if spec.addresses:
                raise ModelsFileError(f"{at}: 'addresses' and 'discovery' exclude each other (static replicas, "
                                      "or replicas found in DNS)")
        if not isinstance(spec.engine, dict):
            raise ModelsFileError(f"{at}: 'engine' must be a mapping of engine options")
        _check_generation(spec.generation, at)
        try:
            check_values(EngineConfig, spec.engine, what=f"{at}.engine", exclude=SET_BY_SPEC)
        except TypeError as e:
            raise ModelsFileError(str(e)) from None
        if any(x.name == spec.name for x in models):
            raise ModelsFileError(f"{at}: duplicate model name {spec.name!r}")
        models.append(spec)
    default = doc.get("default_model") or models[0].name
    if default not in [m.name for m in models]:
        raise ModelsFileError(f"{where}: default_model {default!r} is not one of the models")
    return ModelsFile(models, default)


DISCOVERY_SCHEME = "dns://"


def parse_discovery(url: str) -> tuple[str, int]:
    """``dns://HOST:PORT`` as (HOST, PORT); ValueError naming what is wrong."""
    if not isinstance(url, str) or not url.startswith(DISCOVERY_SCHEME):
        raise ValueError(f"discovery must look like dns://HOST:PORT, got {url!r}")
    host, sep, port = url[len(DISCOVERY_SCHEME):].rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"discovery must look like dns://HOST:PORT with a port in [1, 65535], got {url!r}")
    return host, int(port)


def _check_generation(generation: Any, at: str) -> None:
    if not isinstance(generation, dict):
        raise ModelsFileError(f"{at}: 'generation' must be a mapping of sampling defaults")
    unknown = set(generation) - set(GENERATION_KEYS)
    if unknown:
        raise ModelsFileError(f"{at}: generation has unknown keys {sorted(unknown)} (known: {list(GENERATION_KEYS)})")
    for key, value in generation.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelsFileError(f"{at}: generation.{key} must be a number, got {value!r}")


def load_models_file(path: str | Path) -> ModelsFile:
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ModelsFileError(f"cannot read models file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ModelsFileError(f"models file {p} is not valid YAML: {e}") from None
    return parse_models(doc, where=str(p))

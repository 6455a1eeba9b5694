"""A local Hugging Face model folder: config.json plus safetensors weights (one file, or
shards listed in model.safetensors.index.json).

Weights are read lazily through ``safe_open`` (memory-mapped), one tensor at a time, so
peak memory stays near one tensor above what the model itself holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llmesh.engine.errors import ModelLoadError
from llmesh.engine.loader.progress import tensor_progress

INDEX_FILE = "model.safetensors.index.json"

_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some older checkpoints saved; llmesh computes them from the config."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"missing {path}; a Hugging Face model folder needs it")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise ModelLoadError(f"cannot read safetensors file {file}: {exc}") from exc


def _sharded_tensor_files(folder: Path) -> dict[str, str]:
    index = _read_json(folder / INDEX_FILE)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{folder / INDEX_FILE} has no 'weight_map'")
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    tensor_files: dict[str, str] = {}
    for file_name in sorted(by_file):
        file = folder / file_name
        if not file.is_file():
            raise ModelLoadError(f"missing weight shard {file} (listed in {INDEX_FILE})")
        for name in by_file[file_name]:
            tensor_files[name] = str(file)
    return tensor_files


def _single_tensor_files(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {folder}; llmesh loads safetensors only "
            f"(re-save the model with save_pretrained(..., safe_serialization=True))")
    tensor_files: dict[str, str] = {}
    for file in files:
        for name in _tensor_names(file):
            tensor_files.setdefault(name, str(file))
    return tensor_files


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The folder's parsed config.json."""
    return _read_json(Path(folder) / "config.json")


def list_tensor_files(folder: str | Path) -> dict[str, str]:
    """HF tensor name → safetensors file path, grouped by file, from headers only."""
    folder = Path(folder)
    if (folder / INDEX_FILE).exists():
        tensor_files = _sharded_tensor_files(folder)
    else:
        tensor_files = _single_tensor_files(folder)
    return {name: file for name, file in tensor_files.items() if not name.endswith(_SKIPPED_SUFFIXES)}


class SafetensorsWeights:
    """The checkpoint's tensors as (hf_name, tensor) pairs in their stored dtype.

    Re-iterable: each pass opens the files again and reads one tensor at a time.
    """

    def __init__(self, folder: str | Path) -> None:
        self._folder = str(folder)
        self._tensor_files = list_tensor_files(folder)

    def __len__(self) -> int:
        return len(self._tensor_files)

    @property
    def names(self) -> list[str]:
        """Every tensor name of the checkpoint, known before any tensor is read."""
        return list(self._tensor_files)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return tensor_progress(self._read(), len(self), self._folder)

    def _read(self) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[str, list[str]] = {}
        for name, file in self._tensor_files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            try:
                handle = safe_open(file, framework="pt")
            except Exception as exc:
                raise ModelLoadError(f"cannot read safetensors file {file}: {exc}") from exc
            with handle as f:
                for name in names:
                    yield name, f.get_tensor(name)

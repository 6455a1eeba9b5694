"""What `pip install .` (the Docker image, a wheel) ships: every package directory and every
data file the code reads at run time, as pyproject.toml declares them. An editable install
finds anything in the tree, so a file left out of the wheel breaks only an installed copy
(the CUDA sources NVRTC compiles, later their shared header, and the speculative-decoding
package were once missing)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dir(name: str, mapping: dict[str, str]) -> Path:
    """Where setuptools finds package ``name``: the longest mapped prefix, the rest as folders."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            return ROOT / mapping[prefix] / Path(*parts[cut:])
    return ROOT / Path(*parts)


def test_every_package_directory_is_declared_and_exists():
    cfg = _setuptools()
    mapping, packages = cfg["package-dir"], cfg["packages"]
    for name in packages:
        assert _package_dir(name, mapping).is_dir(), f"{name}: no folder at {_package_dir(name, mapping)}"
    for name in packages:  # every sub-folder holding Python or data is itself a declared package
        for sub in _package_dir(name, mapping).iterdir():
            if sub.is_dir() and sub.name != "__pycache__" and any(
                    p.suffix in (".py", ".cu", ".cuh", ".json") for p in sub.iterdir()):
                assert f"{name}.{sub.name}" in packages, f"{sub} is not in pyproject's packages"


def test_every_data_file_the_code_reads_is_package_data():
    cfg = _setuptools()
    mapping, data = cfg["package-dir"], cfg["package-data"]
    for name in cfg["packages"]:
        folder = _package_dir(name, mapping)
        for path in folder.iterdir():
            if path.is_file() and path.suffix in (".json", ".cu", ".cuh"):
                assert any(fnmatch.fnmatch(path.name, pat) for pat in data.get(name, [])), \
                    f"{path.relative_to(ROOT)} is not package-data of {name}: an installed llmesh lacks it"

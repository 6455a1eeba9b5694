"""Shared fixtures: tiny random-weight HF models saved once per test session."""

from __future__ import annotations

import pytest

from tests.fixtures.tiny_models import ARCHS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(str(root / arch), arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]

"""Shared fixtures: tiny random-weight HF models saved once per test session.

Without a GPU, Triton kernels run through Triton's interpreter. TRITON_INTERPRET is read
when a kernel is decorated, and other test modules (transformers, torch) may import Triton
during collection, so it is set here, in the first conftest pytest loads.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.fixtures.tiny_models import ARCHS, build_tiny_model

# Meshes started in tests keep their Redis data in a folder of this session, never in the
# user's data folder (llmesh.local_redis).
if "LLMESH_DATA_DIR" not in os.environ:
    import tempfile

    os.environ["LLMESH_DATA_DIR"] = tempfile.mkdtemp(prefix="llmesh-test-data-")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(str(root / arch), arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]

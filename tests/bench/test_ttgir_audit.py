"""bench/ttgir_audit.py compiles a kernel for sm90 on the CPU and reports its K loop's loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmesh.kernels.compile_check import nvidia_backend

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not nvidia_backend(), reason="this Triton build has no NVIDIA backend")
def test_audit_reports_pipelined_and_waited_loads(tmp_path):
    out = tmp_path / "audit.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the script must drop it itself
    proc = subprocess.run([sys.executable, "bench/ttgir_audit.py", "--only", "moe_int4_decode,w8a16_grouped_factored",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reports = json.loads(out.read_text())
    moe = reports["moe_int4_decode"]
    # the activation halves and the gate and up code tiles are cp.async copies; the scale and
    # min rows are carried a step ahead, nothing is waited on inside the K loop
    assert moe["async_copies"] >= 12 and moe["waited_loads"][0] == [] and len(moe["carried_loads"][0]) == 8
    # a grouped factored W8A16 step waits on its scale row (not pipelined: it feeds arithmetic)
    assert reports["w8a16_grouped_factored"]["waited_loads"][0] == ["tensor<64x!tt.ptr<f16>"]
    assert "moe_int4_decode" in proc.stdout


def test_unknown_case_is_refused():
    proc = subprocess.run([sys.executable, "bench/ttgir_audit.py", "--only", "nope"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown cases" in proc.stderr

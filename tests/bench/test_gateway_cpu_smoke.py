"""bench/gateway_cpu.py in SMOKE mode: a real mesh (Redis, index, the demo model's engine,
router, gateway with API keys on) and the bare grpc.aio relay, each measured; the result file
carries every figure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gateway_cpu_smoke(tmp_path):
    if shutil.which(os.environ.get("LLMESH_REDIS_SERVER") or "redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server): the mesh needs it")
    proc = subprocess.run([sys.executable, "bench/gateway_cpu.py", "--smoke", "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gateway_cpu_cpu.json").read_text())
    m = doc["metrics"]
    assert doc["workload"]["smoke"] is True and doc["workload"]["streams"] == 4
    assert m["gateway_cpu_per_message_us"] > 0 and m["bare_relay_cpu_per_message_us"] > 0
    assert m["gateway_over_bare_x"] == pytest.approx(m["gateway_cpu_per_message_us"]
                                                     / m["bare_relay_cpu_per_message_us"])
    assert m["mesh_message_interval_ms"] > 0

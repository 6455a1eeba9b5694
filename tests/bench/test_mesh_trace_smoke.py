"""bench/mesh_trace.py in SMOKE mode on the CPU: a real mesh whose services print their spans,
one-token requests through the gateway and to the engine, the spans read back from the logs
and lined up per request."""

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
@pytest.mark.timeout(240)
@pytest.mark.parametrize("reuse_ms", [0, 1000])
def test_mesh_trace_lines_up_each_requests_spans(tmp_path, reuse_ms):
    if shutil.which(os.environ.get("LLMESH_REDIS_SERVER") or "redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server): the mesh needs it")
    proc = subprocess.run([sys.executable, "bench/mesh_trace.py", "--smoke", "--requests", "8",
                           "--route-reuse-ms", str(reuse_ms), "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "mesh_trace_cpu.json").read_text())
    m = doc["metrics"]
    assert doc["workload"]["router_decision_reuse_ms"] == str(reuse_ms)
    assert m["trace_requests_traced_n"] == 8  # every request after the warm-up, none of the warm-up's
    assert m["trace_mesh_added_ttft_p50_ms"] == pytest.approx(
        m["trace_mesh_ttft_p50_ms"] - m["trace_direct_ttft_p50_ms"])
    for k in ("trace_gateway_pre_engine_p50_ms", "trace_engine_hop_p50_ms", "trace_gateway_end_lag_p50_ms"):
        assert 0 < m[k] < 1000, k
    assert 0 < m["trace_gateway_ttft_p50_ms"] < m["trace_mesh_ttft_p50_ms"]
    if reuse_ms:  # one request a few ms after another: the grant holds, the router is not asked
        assert m["trace_route_called_frac"] < 0.5
    else:
        assert m["trace_route_called_frac"] == 1.0
        assert 0 < m["trace_router_handler_p50_ms"] < m["trace_route_rtt_p50_ms"] < m["trace_gateway_pre_engine_p50_ms"]

"""The serve stage of bench/run_gpu.sh (bench/serve_gpu.py) in SMOKE mode on the CPU: a real
mesh (Redis, index, engine with random:tiny-llama3, router, gateway) measured against the
engine's own port, with a second gateway of two workers behind a second router that grants
no reused routes (COMPARE_GATEWAY_WORKERS=2, COMPARE_ROUTE_REUSE_MS=0) beside the first; the
result file carries both headline figures per gateway and the sweep's raw ones."""

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
def test_run_gpu_serve_stage_smoke(tmp_path):
    if shutil.which(os.environ.get("LLMESH_REDIS_SERVER") or "redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server): the mesh needs it")
    env = {**os.environ, "SMOKE": "1", "STAGES": "serve", "RESULTS_DIR": str(tmp_path), "PYTHON": sys.executable,
           "SERVE_TIMEOUT": "240", "COMPARE_GATEWAY_WORKERS": "2",
           "COMPARE_ROUTE_REUSE_MS": "0"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "bench/run_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "serve_gpu_cpu.json").read_text())
    assert {"device", "commit", "command", "date", "workload", "metrics"} <= set(doc)
    m, w = doc["metrics"], doc["workload"]
    assert w["points"] == ["r16", "c8"] and w["skipped"] == []
    assert 0 < m["gpu_mesh_throughput_ratio_frac"] < 2
    assert m["gpu_mesh_added_ttft_p50_ms"] == pytest.approx(
        m["gateway_r16_ttft_p50_ms"] - m["engine_r16_ttft_p50_ms"])
    assert m["gpu_mesh_throughput_ratio_frac"] == pytest.approx(
        m["gateway_c8_out_tok_s"] / m["engine_c8_out_tok_s"])
    assert w["compare_gateway_workers"] == 2 and w["compare_route_reuse_ms"] == 0
    assert w["gateway_workers"] == 1 and w["gateway_connections"] == 8
    assert m["w2_reuse0_gpu_mesh_added_ttft_p50_ms"] == pytest.approx(
        m["gateway_w2_reuse0_r16_ttft_p50_ms"] - m["engine_r16_ttft_p50_ms"])
    assert m["w2_reuse0_gpu_mesh_throughput_ratio_frac"] == pytest.approx(
        m["gateway_w2_reuse0_c8_out_tok_s"] / m["engine_c8_out_tok_s"])
    assert "w2_reuse0_mesh_idle_added_ttft_p50_ms" in m
    assert m["w2_reuse0_route_reused_frac"] == 0  # the second router grants no reuse ...
    assert m["route_reused_frac"] > 0.5  # ... where the mesh's router (default 1000 ms) does
    # each gateway's process tree is watched apart: the second one did the work of its own runs
    assert m["gateway_w2_reuse0_c8_gateway_w2_reuse0_cpu_frac"] > 0 and m["gateway_c8_gateway_cpu_frac"] > 0
    for target in ("engine", "gateway", "gateway_w2_reuse0"):
        for point, n in w["requests_per_point"].items():
            assert m[f"{target}_{point}_completed_n"] == n and m[f"{target}_{point}_failed_n"] == 0
            for k in ("ttft", "tpot", "itl"):
                assert 0 < m[f"{target}_{point}_{k}_p50_ms"] <= m[f"{target}_{point}_{k}_p99_ms"]
            assert m[f"{target}_{point}_out_tok_s"] > 0
    assert "serve_gpu_cpu.json" in proc.stdout  # the closing summary lists this run's file

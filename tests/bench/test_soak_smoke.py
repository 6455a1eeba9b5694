"""CI smoke run of bench/soak.py: about a minute of mixed traffic on the tiny model with the
smoke fault schedule (SIGSTOP of the engine, kill -9 of the engine, kill -9 of Redis), as a
real subprocess writing its result to a temporary folder. It checks the run completes,
recovers through the launcher's own restarts (no KV block leaked, every service alive, the
tenants' keys still valid after Redis's kill -9, traffic succeeding again at the end) and
writes a well-formed result; no assertion on speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_soak_smoke_recovers_from_every_fault_and_leaks_no_kv_block(tiny_llama, tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"default_model": "tiny", "models": [{
        "name": "tiny", "path": tiny_llama, "size_class": "small", "replicas": 1,
        "engine": {"dtype": "float32", "num_kv_blocks": 128, "max_model_len": 256}}]}))
    proc = subprocess.run([sys.executable, str(SOAK), "--smoke", "--models-file", str(models), "--concurrency", "4",
                           "--progress-s", "20", "--results-dir", str(tmp_path / "results"),
                           "--run-dir", str(tmp_path / "run")],
                          check=False, capture_output=True, text=True, timeout=420, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "requests" in proc.stdout and "fault: kill -9 engine-tiny-0" in proc.stdout, proc.stdout
    doc = json.loads((tmp_path / "results" / "soak_cpu.json").read_text())
    assert {"device", "commit", "command", "date", "workload", "metrics"} <= set(doc)
    m = doc["metrics"]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values())
    assert m["leaked_kv_blocks_n"] == 0 and m["dead_services_n"] == 0
    assert m["fault_engine_kill9_n"] == 1 and m["fault_redis_kill9_n"] == 1 and m["fault_engine_sigstop_n"] == 1
    assert m["ok_n"] > 20 and m["out_tok_s"] > 0 and m["invalid_wrong_answer_n"] == 0 and m["invalid_refused_n"] > 0
    assert m["recovery_after_traffic_s"] >= 0
    assert m["rss_gateway_start_mb"] > 0 and m["latency_p50_ms"] > 0
    # Every restart is the launcher's; Redis persisted the keys through its kill -9.
    assert doc["workload"]["engine_restarts"] == "launcher"
    assert m["launcher_restarts_engine_tiny_0_n"] == 1 and m["launcher_restarts_redis_n"] == 1
    assert m["launcher_restarts_gateway_n"] == 0 and m["engine_restart_max_s"] > 0 and m["redis_restart_max_s"] > 0
    assert m["keys_lost_after_redis_restart_n"] == 0 and m["auth_errors_after_redis_restart_n"] == 0

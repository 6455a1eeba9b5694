"""The GPU benchmark scripts' --smoke mode on the CPU (tiny random model, Triton's
interpreter): every part runs and writes its metrics, so a device session is not spent
finding a script error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quant_gpu_smoke_writes_every_part(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "bench/quant_gpu.py", "--smoke", "--parts", "gemm,engine",
                           "--formats", "none,int4", "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "quant_cpu.json").read_text())
    m = doc["metrics"]
    for key in ("copy_tb_s", "w4a16_m1_speedup_x", "w8a16_m1_speedup_x", "decode_b1_int4_tok_s",
                "offline_int4_out_tok_s", "int4_offline_vs_bf16_x", "weight_gib_int4"):
        assert key in m, key
    assert m["weight_gib_int4"] < m["weight_gib_none"]
    assert doc["workload"]["gemm_configs"]

"""bench/gemm_sweep.py --smoke on the CPU (tiny shapes, Triton's interpreter): every (shape, M)
runs, every config passes its check against F.linear, the JSON carries the headline metrics
and the printed TUNED literal is valid Python of the table's form."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from llmesh.kernels.skinny_gemm_config import SkinnyConfig, check_config

ROOT = Path(__file__).resolve().parents[2]


def test_gemm_sweep_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "bench/gemm_sweep.py", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gemm_sweep_cpu.json").read_text())
    m, w = doc["metrics"], doc["workload"]
    assert m["copy_tb_s"] > 0
    for shape in w["shapes_n_k"]:
        for mm in w["m"]:
            for key in ("bw_frac", "speedup_x"):
                assert m[f"skinny_gemm_m{mm}_{key}_{shape}"] > 0, (shape, mm, key)
            assert m[f"flinear_m{mm}_bw_frac_{shape}"] > 0
    assert not w["wrong"] and not w["errors"] and not w["skipped"]
    assert any(" dot " in k for k in w["configs"]) and any(" fma " in k for k in w["configs"])
    literal = w["tuned_literal"]
    assert literal in proc.stdout and literal.startswith("TUNED['cpu'] = ")
    table = ast.literal_eval(literal.split(" = ", 1)[1])
    for (n, k, bucket), fields in table.items():
        check_config(SkinnyConfig(*fields))


def test_table_takes_only_clear_winners_at_bucket_sizes(monkeypatch):
    """report(): a config enters TUNED only when it beats F.linear by MIN_SPEEDUP, at an M that
    is a bucket; the fastest config of a cell is the one recorded."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gemm_sweep as gs

    fast, slow = SkinnyConfig(1, 8, 512, 1, 4, 1, False), SkinnyConfig(16, 32, 128, 2, 4, 4, True)
    shapes = {"a": (4096, 4096), "b": (6144, 4096)}
    cells = [gs.Cell("a", 1, 0.010, [(0.012, slow), (0.008, fast)]),  # 1.25x: in
             gs.Cell("a", 2, 0.010, [(0.0099, fast)]),                 # 1.01x: a tie, stays cuBLAS
             gs.Cell("b", 3, 0.010, [(0.005, fast)]),                  # not a bucket size
             gs.Cell("b", 16, 0.010, [])]                              # nothing ran
    metrics, tuned = gs.report(cells, 4.0, shapes)
    assert tuned == {(4096, 4096, 1): (1, 8, 512, 1, 4, 1, False)}
    assert metrics["skinny_gemm_m1_speedup_x_a"] == 0.010 / 0.008
    assert abs(metrics["skinny_gemm_m1_bw_frac_a"] - 4096 * 4096 * 2 / 8e-6 / 4e12) < 1e-9
    assert "skinny_gemm_m16_speedup_x_b" not in metrics and "flinear_m16_bw_frac_b" in metrics


def test_the_cuda_gemv_enters_dense_faster_only_past_both_by_min_speedup(monkeypatch):
    """report(): the CUDA GEMV's metrics against the faster of F.linear and the skinny kernel's
    best, and its fastest config recorded where it beats both by MIN_SPEEDUP."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gemm_sweep as gs
    from llmesh.kernels.moe_gemv import GemvConfig

    cfg = SkinnyConfig(1, 8, 512, 1, 4, 1, False)
    shapes = {"a": (4096, 4096), "b": (128, 2048)}
    cells = [gs.Cell("a", 1, 0.010, [(0.008, cfg)], [(0.0079, GemvConfig(1, 8))]),  # 1.01x the skinny: a tie
             gs.Cell("b", 1, 0.005, [(0.0022, cfg)], [(0.0017, GemvConfig(2, 8)), (0.0016, GemvConfig(1, 4))])]
    faster: dict = {}
    metrics, _ = gs.report(cells, 4.0, shapes, faster)
    assert faster == {(128, 2048): GemvConfig(1, 4)}
    assert metrics["cuda_gemv_m1_vs_best_x_b"] == 0.0022 / 0.0016
    assert metrics["cuda_gemv_m1_vs_best_x_a"] == 0.008 / 0.0079 and metrics["cuda_gemv_m1_us_a"] == 7.9
    assert "cuda_gemv_m1_us_c" not in metrics


def test_the_printed_table_is_the_devices_whole_table(monkeypatch):
    """complete_table(): the cells a sweep timed are re-decided (a winner replaces the entry, a
    cell cuBLAS won loses it), the cells it did not time keep the module's entries."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gemm_sweep as gs

    old, new = (1, 8, 512, 1, 4, 1, False), (1, 4, 1024, 1, 4, 1, False)
    current = {(4096, 4096, 1): old, (4096, 4096, 2): old, (6144, 4096, 1): old}
    swept = {(4096, 4096, 1), (4096, 4096, 2), (128, 2048, 1)}
    measured = {(4096, 4096, 1): new, (128, 2048, 1): new}  # at M = 2 cuBLAS won this time
    assert gs.complete_table(current, measured, swept) == {
        (128, 2048, 1): new, (4096, 4096, 1): new, (6144, 4096, 1): old}
    assert list(gs.complete_table(current, measured, swept)) == sorted(gs.complete_table(current, measured, swept))


def test_ab_fused_smoke_times_each_pair_and_prints_the_fused_slower_set(tmp_path):
    """--ab-fused --smoke: each fused prologue against its two kernels, bit-equal outputs, and the
    FUSED_SLOWER literal (the device's whole set) that bench/paste_tables.py takes."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "bench/gemm_sweep.py", "--ab-fused", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gemm_fused_ab_cpu.json").read_text())
    m, w = doc["metrics"], doc["workload"]
    assert all(w["bit_equal"].values()) and not w["wrong"]
    for name in ("qkv", "gate_up", "down", "moe_qkv"):
        assert m[f"unfused_us_{name}"] > 0 and m[f"fused_us_{name}"] > 0
    literal = w["fused_slower_literal"]
    assert literal in proc.stdout and literal.startswith("FUSED_SLOWER['cpu'] = ")
    slower = ast.literal_eval(literal.split(" = ", 1)[1].replace("set()", "[]"))
    assert all(len(key) == 3 and key[2] == 1 for key in slower)

"""bench/moe_gpu.py --smoke on the CPU (tiny shapes, Triton's interpreter): the kernel,
autotune and engine parts run and write their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _moe_smoke(tmp_path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """bench/moe_gpu.py --smoke with these arguments, through Triton's interpreter; it must succeed."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "bench/moe_gpu.py", "--smoke", *args, "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_moe_gpu_smoke_writes_every_metric(tmp_path):
    proc = _moe_smoke(tmp_path, "--autotune", timeout=600)
    doc = json.loads((tmp_path / "moe_cpu.json").read_text())
    m = doc["metrics"]
    for key in ("moe_gemm_frac", "moe_gemm_frac_decode64", "moe_gemm_frac_prefill4k", "moe_decode64_ref_ms",
                "moe_prefill4k_int8_ms", "moe_decode64_fp8_ms", "moe_decode64_fp8block_ms",
                "moe_decode_b1_roofline_frac",
                "moe_prefill4k_token_sum_ms", "moe_prefill4k_moe_sum_ms", "moe_decode64_token_sum_vs_moe_sum_x",
                "moe_prefill4k_table_tiles_ms", "moe_prefill4k_sorted_ms", "moe_prefill4k_warp_spec_vs_table_x",
                "moe_decode64_warp_spec_ms", "moe_prefill4k_persistent_vs_table_x",
                "moe_offline_out_tok_s", "moe_offline_jit_specializations", "moe_offline_jit_s",
                "moe_align_t1_kernel_us", "moe_layer_t4_align_torch_ms", "moe_decode1_ms", "moe_decode1_tile_ms",
                "moe_decode1_gemv_ms", "moe_decode1_frac", "moe_decode1_int4_gemv_ms", "moe_decode1_int4_vs_bf16_x",
                "moe_norm_router_t1_fused_us", "moe_norm_router_t16_unfused_us",
                "moe_norm_router_t4_fused_vs_unfused_x"):
        assert key in m, key
    assert m["moe_gemm_frac"] == min(m["moe_gemm_frac_decode64"], m["moe_gemm_frac_prefill4k"])
    assert m["moe_norm_router_t1_same_experts_frac"] == 1.0  # random logits: no ties to choose apart
    assert any("MoEConfig(" in line for line in doc["workload"]["autotune"])
    tuned = json.loads((tmp_path / "fused_moe_tuned_smoke.json").read_text())["cpu"]
    # the five tile fields and split_k, then group_m ... persistent up to the last that is not 0
    assert tuned and all(len(fields) == 6 or (len(fields) <= 11 and fields[-1] >= 1) for fields in tuned.values())
    assert "up group_m=1:" in proc.stdout and "down group_m=16:" in proc.stdout  # the orders tried at prefill
    assert "up weight_tma=1:" in proc.stdout and "down weight_tma=1:" in proc.stdout  # TMA tried on the winners
    assert "down a_tma=1,weight_tma=1:" in proc.stdout and "up a_tma=1" not in proc.stdout  # the down GEMM's alone
    assert "down a_tma=1,weight_tma=1,warp_spec=1,num_warps=4,split_k=1:" in proc.stdout
    assert "down a_tma=1,weight_tma=1,warp_spec=1,num_warps=4,split_k=1,persistent=1:" in proc.stdout


def test_gemv_only_sweep_and_the_batch1_part(tmp_path):
    """--tune-gemv-only weighs each GEMM's GEMV candidates against its table entry (the smoke pool
    has one GEMV config: two candidates a GEMM); --parts decode1 writes the batch-1 layer alone."""
    _moe_smoke(tmp_path, "--parts", "decode1", "--autotune", "--tune-gemv-only", "--tune-m", "1",
               "--tune-weights", "dense,int4")
    doc = json.loads((tmp_path / "moe_cpu.json").read_text())
    lines = doc["workload"]["autotune"]
    assert [line.split(" ")[0] for line in lines] == ["dense", "dense", "int4", "int4"]
    assert all("(2 candidates)" in line for line in lines if "# gate/up" in line)
    m = doc["metrics"]
    for key in ("moe_decode1_ms", "moe_decode1_tile_ms", "moe_decode1_gemv_ms", "moe_decode1_frac",
                "moe_decode1_int4_ms", "moe_decode1_int4_gemv_ms", "moe_decode1_int4_vs_bf16_x"):
        assert m[key] > 0, key
    assert "moe_gemm_frac" not in m  # the kernel part did not run


def _autotune_module():
    """bench/moe_autotune.py (bench/ is a scripts folder, not a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import moe_autotune
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return moe_autotune


def _refine_and_config():
    """bench/moe_autotune.py's _refine and MoEConfig."""
    from llmesh.kernels.fused_moe_config import MoEConfig

    return _autotune_module()._refine, MoEConfig


def test_refine_skips_a_combination_the_config_refuses():
    """The H100's batch-1 sweep (f7ea4ff) crashed here: its GEMV winner's K step of 512 with
    weight_tma is a TMA box MoEConfig refuses, raised while the candidate was built. That
    candidate is skipped like one that cannot run; the other GEMM's is still tried."""
    _refine, MoEConfig = _refine_and_config()

    up, down = MoEConfig(1, 16, 512, 4, 1), MoEConfig(1, 32, 256, 8, 1)
    timed = []

    def run(u, d):  # a TMA down tile measures faster: the refinement keeps it
        timed.append((u, d))
        return 1.0 if d.weight_tma else 2.0

    best_up, best_down, best_ms = _refine(run, [{"weight_tma": 1}], up, down, 2.0, "test")
    assert best_up == up and best_down.weight_tma == 1 and best_ms == 1.0
    assert timed == [(up, best_down)]  # the refused up candidate never ran


def test_refine_past_its_deadline_runs_nothing(capsys):
    _refine, MoEConfig = _refine_and_config()

    up, down = MoEConfig(16, 64, 64, 4, 3), MoEConfig(16, 64, 64, 4, 3)
    timed = []
    got = _refine(lambda u, d: timed.append((u, d)) or 1.0, [{"group_m": 2}, {"group_m": 4}], up, down, 2.0,
                  "test", budget=_autotune_module().Budget(0.0), retime=True)
    assert got == (up, down, 2.0) and timed == []  # not even the baseline's retiming ran
    out = capsys.readouterr().out
    assert "autotune budget spent at 0s" in out and "test group_m=2 skipped" in out


def test_budget_leaves_room_for_its_longest_stage_and_refine_keeps_each_winner(capsys):
    """A change is begun only while the longest stage so far still fits: after a 0.3 s stage, a
    budget with 0.2 s left begins nothing more. Each winner is handed to keep as it is found, so a
    call cut inside a later change (an H100's was, at 533 s of a 240 s budget) keeps it."""
    at = _autotune_module()
    _refine, MoEConfig = _refine_and_config()
    up, down = MoEConfig(16, 64, 64, 4, 3), MoEConfig(16, 64, 64, 4, 3)
    budget = at.Budget(0.5)
    kept = []

    def run(u, d):  # the first change is slow and faster; the second must not begin
        time.sleep(0.3)
        return 1.0 if d.group_m == 2 else 2.0

    got = _refine(run, [{"group_m": 2}, {"group_m": 4}], up, down, 2.0, "test", ("down",), budget,
                  keep=lambda u, d: kept.append((u, d)))
    assert got[1].group_m == 2 and got[2] == 1.0
    assert kept == [(up, got[1])]
    assert budget.longest >= 0.3
    assert "test group_m=4 skipped" in capsys.readouterr().out


def test_spent_budget_keeps_the_best_so_far_and_writes_it(tmp_path):
    """--tune-budget-s 0: each GEMM's first candidate runs (a size needs a winner), the rest and the
    refinements are skipped, and the winners still reach the tuned file."""
    proc = _moe_smoke(tmp_path, "--parts", "decode1", "--autotune", "--tune-gemv-only", "--tune-m", "1",
                      "--tune-budget-s", "0")
    assert "dense T=1: 1 gate/up candidates skipped" in proc.stdout and "autotune budget spent at" in proc.stdout
    assert "split_k=2:" not in proc.stdout  # no refinement ran
    tuned = json.loads((tmp_path / "fused_moe_tuned_smoke.json").read_text())["cpu"]
    assert len(tuned) == 2  # the gate/up and down winners at batch 1

"""The GPU benchmark scripts' --smoke mode on the CPU (tiny random model, Triton's
interpreter): every part runs and writes its metrics, so a device session is not spent
finding a script error."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _smoke(script: str, *args: str) -> subprocess.CompletedProcess:
    """``bench/<script> --smoke *args`` through Triton's interpreter; fails the test with its output
    unless it exits 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, f"bench/{script}", "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_quant_gpu_smoke_writes_every_part(tmp_path):
    _smoke("quant_gpu.py", "--parts", "gemm,engine", "--formats", "none,int4", "--gemm-sweep-kinds",
           "w4a16,w8a16,w4a16+silu_mul,w8a16+rmsnorm", "--results-dir", str(tmp_path))
    doc = json.loads((tmp_path / "quant_cpu.json").read_text())
    m = doc["metrics"]
    for key in ("copy_tb_s", "w4a16_m1_speedup_x", "w8a16_m1_speedup_x", "decode_b1_int4_tok_s",
                "offline_int4_out_tok_s", "int4_offline_vs_bf16_x", "weight_gib_int4"):
        assert key in m, key
    assert m["weight_gib_int4"] < m["weight_gib_none"]
    configs = doc["workload"]["gemm_configs"]
    # the down projection (K > N) fed [gate | up], the widening projections (K < N) the hidden state
    # before its norm: the unfused pair is always timed (the fused kernel is CUDA only), each fused
    # kind only where the engine asks for it
    assert configs["w4a16+silu_mul_128x64_m1"]["all"][0][0] == "unfused"
    assert m["gemm_w4a16+silu_mul_128x64_m1_unfused_ms"] > 0
    assert configs["w8a16+rmsnorm_64x128_m4"]["all"][0][0] == "unfused"
    assert "w4a16+silu_mul_64x128_m1" not in configs and "w8a16+rmsnorm_128x64_m1" not in configs
    tried = [name for cell in configs.values() if isinstance(cell, dict) and "all" in cell and "unfused_ms" not in cell
             for name, _ in cell["all"]]
    assert any(name.startswith("words ") for name in tried) and any("gemv-words" in name for name in tried), tried
    assert not configs.get("errors"), configs.get("errors")


def test_quant_gpu_seeded_sweep_times_the_default_and_the_tables_configs_only(tmp_path):
    """--gemm-sweep-seeded: the candidates are the default config and those the table holds for the
    kind on another device (a GEMV tile and a swapped-operand config here); the winners are
    written under this device's tag, each one of those."""
    table = tmp_path / "tuned.json"
    seeds = {"w4a16 4096x4096 m16": ["gemv", [16, 32, 1, 1, 1, False]],
             "w4a16 14336x4096 m1": ["swapped", ["16,64,16,2,4,2"]],
             "w8a16 4096x4096 m1": ["gemv", [16, 16, 1, 1, 2, False]]}  # another kind's: not a candidate
    table.write_text(json.dumps({"h200": seeds}))
    _smoke("quant_gpu.py", "--parts", "gemm", "--formats", "none", "--gemm-sweep-kinds", "w4a16",
           "--gemm-sweep-seeded", "--tuned-file", str(table), "--results-dir", str(tmp_path))
    configs = json.loads((tmp_path / "quant_cpu.json").read_text())["workload"]["gemm_configs"]
    assert configs["seeds"] == {"w4a16": 2, "w8a16": 1}
    assert [name for name, _ in configs["w4a16_64x128_m1"]["all"]] == [
        "m16 n32 k32 s1 w1 st1", "gemv n16 k32 s1 w1 st1", "swapped 16,64,16,2,4,2"]
    written = json.loads(table.read_text())
    assert written["h200"] == seeds
    cells = {f"w4a16 {n}x{k} m{m}": configs[f"w4a16_{k}x{n}_m{m}"] for k, n in ((64, 128), (128, 64)) for m in (1, 4)}
    assert {key for key in written["cpu"] if key.startswith("w4a16")} == set(cells)
    for key, cell in cells.items():  # each cell's winner: its default config or a seed
        assert written["cpu"][key] in [["dot", list(cell["default"].values())], *seeds.values()], (key, cell)
    assert not configs.get("errors"), configs.get("errors")


def test_quant_gpu_smoke_fp8_sweep_times_pointer_and_tma_tiles(tmp_path):
    """--gemm-sweep-kinds fp8: each of our candidate tiles with pointer loads and through TMA
    descriptors (Fp8GemmConfig.tma), every one checked against the first's output."""
    _smoke("quant_gpu.py", "--parts", "gemm", "--formats", "none,fp8", "--gemm-sweep-kinds", "fp8",
           "--results-dir", str(tmp_path))
    configs = json.loads((tmp_path / "quant_cpu.json").read_text())["workload"]["gemm_configs"]
    names = [name for key, cell in configs.items() if key.startswith("fp8_") for name, _ in cell["all"]]
    assert any(name.endswith(" tma") for name in names) and any(not name.endswith(" tma") for name in names)
    assert not configs.get("errors"), configs.get("errors")


def test_kernels_gpu_smoke_writes_attention_metrics(tmp_path):
    _smoke("kernels_gpu.py", "--parts", "causal,unified,rope_kv", "--results-dir", str(tmp_path))
    doc = json.loads((tmp_path / "kernels_cpu.json").read_text())
    m = doc["metrics"]
    # the mixed-length case and the dense path's forced Triton launch; the table literal from them
    assert doc["workload"]["dense_causal_table"].startswith("DENSE_CAUSAL_BACKEND['cpu'] = {16: 'triton'")
    assert doc["workload"]["extend_table"] == "EXTEND_BACKEND['cpu'] = {8: 'triton', 24: 'triton'}"
    assert m["extend_attn_gemm_frac_ours_x32_8"] > 0 and m["extend_attn_ms_dispatched_x40_24"] > 0
    assert m["extend_attn_ms_ours_x40_24_fp8"] > 0  # the FP8 pool's case
    for key in ("prefill_attn_gemm_frac", "prefill_attn_gemm_frac_ours", "prefill_attn_gemm_frac_ours_c64",
                "prefill_attn_gemm_frac_triton_mixed", "prefill_attn_gemm_frac_dispatched_mixed",
                "unified_mix_gb_s", "unified_mix_vs_split_x", "unified_decode_vs_paged_decode_x",
                "unified_mix_short_vs_split_x", "unified_decode_short_vs_paged_decode_x",
                "rope_kv_write_vs_two_x"):
        assert key in m, key


def test_attn_sweep_smoke_checks_and_picks_configs(tmp_path):
    _smoke("attn_sweep.py", "--out-dir", str(tmp_path))
    doc = json.loads((tmp_path / "attn_sweep_cpu.json").read_text())
    assert doc["workload"]["wrong"] == 0
    assert set(doc["workload"]["winners"]) == {"prefill", "decode"}
    assert any("PrefillConfig(" in line for line in doc["workload"]["paste"])


def test_attn_sweep_smoke_mixed_part_times_the_long_query_tile(tmp_path):
    """--parts mixed: the whole unified call at a mixed shape per candidate long-query tile,
    checked against the reference, beside the chunk alone and the decodes alone."""
    _smoke("attn_sweep.py", "--parts", "mixed", "--out-dir", str(tmp_path))
    # a file of its own, so a mixed-only sweep leaves the tile sweep's record alone
    assert not (tmp_path / "attn_sweep_cpu.json").exists()
    doc = json.loads((tmp_path / "attn_sweep_cpu_mixed.json").read_text())
    rows = doc["workload"]["rows"]
    assert doc["workload"]["wrong"] == 0 and set(doc["workload"]["winners"]) == {"mixed"}
    assert {r["shape"] for r in rows if r["kind"] == "mixed_part"} == {"3d+24p chunk only", "3d+24p decodes only"}
    assert any(r["kind"] == "mixed" and r["max_err"] is not None for r in rows)  # a candidate, checked
    assert any(line.startswith("    UNIFIED_LONG[") for line in doc["workload"]["paste"])


def test_the_cuda_benchmarks_sources_compile():
    """read_floor.py and w4a16_mma_ablation.py build their kernels from llmesh/kernels/cuda/w4a16_mma.cu's
    text (its helpers; its body with parts replaced): NVRTC compiles what they would launch, so a
    change to the kernel that breaks them shows here rather than on the device."""
    import importlib.util

    import pytest

    from llmesh.kernels import cuda_rtc
    from llmesh.kernels.w4a16_mma import MmaConfig, plan_launch

    try:
        cuda_rtc.nvrtc()
    except cuda_rtc.RtcError as e:
        pytest.skip(str(e))
    sys.path.insert(0, str(ROOT / "bench"))
    modules = {}
    for name in ("read_floor", "w4a16_mma_ablation"):
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    floor = modules["read_floor"].source()
    instances = {v[1] for v in modules["read_floor"].variants(132)}
    assert {"read_grid<4>", "read_blocked<4>", "read_ring<4>", "read_ring<8>", "read_bulk<4096, 2, 8>"} <= instances
    for name in sorted(instances):
        assert cuda_rtc.compile_cubin(floor, name, "sm_90")[1], name
    # the ring variants run in the INT4 kernel's grids at 4096 x 14336 (224 strips) and one or two an SM
    rings = {(v[2], v[3]) for v in modules["read_floor"].variants(132) if v[1] == "read_ring<4>"}
    assert rings == {(112, 512), (224, 256), (132, 512), (264, 256)}
    ablation = modules["w4a16_mma_ablation"]
    # the register path and the forms the table picks at M = 1 (bulk copies, x loaded with the
    # codes) and at 16 rows (two n8 tiles; bulk copies, registers)
    shapes = {1: (MmaConfig(1, 8, 4, 1), MmaConfig(1, 8, 2, 1, 8), MmaConfig(2, 8, 4, 4, 0, 0, 1)),
              16: (MmaConfig(2, 8, 2, 4, 4), MmaConfig(4, 4, 4, 1))}
    variants = ablation.variants(cuda_rtc.source("w4a16_mma.cu"))
    assert "no_xstage" in variants
    for m, cfgs in shapes.items():
        assert set(cfgs) <= set(ablation.CONFIGS[m])
        for cfg in cfgs:
            plan = plan_launch(cfg, m, 14336, 4096, 128)
            for variant, text in variants.items():
                assert cuda_rtc.compile_cubin(text, plan.name, "sm_90")[1], (variant, cfg)


def test_kv_fp8_gpu_smoke_times_both_pools():
    proc = _smoke("kv_fp8_gpu.py")
    line = proc.stdout.strip().splitlines()[-1]
    m = ast.literal_eval(line)  # the script's printed dict of floats
    assert m["kv_fp8_decode_attn_ms"] > 0 and m["kv_bf16_decode_attn_ms"] > 0
    assert m["kv_fp8_decode_attn_rel_err"] < 0.1 and 1.9 < m["kv_fp8_tokens_capacity_x"] < 2.0


def test_decode_tile_sweep_smoke_over_an_fp8_pool(tmp_path):
    _smoke("decode_tile_sweep.py", "--kv-dtype", "fp8", "--results-dir", str(tmp_path))
    doc = json.loads((tmp_path / "decode_tile_cpu_fp8.json").read_text())
    assert doc["workload"]["kv_dtype"] == "fp8" and not doc["workload"]["wrong"]
    assert "PAGED_DECODE_TILE['cpu:fp8']" in doc["workload"]["literal"]


def test_kernel_profile_smoke_decode_and_mixed_steps(tmp_path):
    """Decode-only steps, then --chunk: every profiled step also prefills a fresh prompt (a mixed
    step), tagged _c<N>; then decode steps over an FP8 KV pool, tagged _kv8."""
    for extra, tag in (([], "profile_smoke_tiny_b2"), (["--chunk", "24"], "profile_smoke_tiny_b2_c24"),
                       (["--kv-cache-dtype", "fp8"], "profile_smoke_tiny_kv8_b2")):
        _smoke("kernel_profile.py", "--batch", "2", *extra, "--results-dir", str(tmp_path))
        doc = json.loads((tmp_path / "kernel_profile_cpu.json").read_text())
        tags = {k.rsplit("_step_ms", 1)[0] for k in doc["metrics"] if k.endswith("_step_ms")}
        assert tags == {tag}, tags
        assert doc["workload"]["chunk_tokens"] == (24 if "--chunk" in extra else 0)
        assert doc["workload"]["kv_cache_dtype"] == ("fp8" if "--kv-cache-dtype" in extra else "auto")
        # what LLMESH_L2_PREFETCH resolved to: off on the CPU whatever the environment asks
        assert [m["l2_prefetch"] for m in doc["workload"]["models"].values()] == [{"mode": 0, "bytes_per_step": 0}]


def test_kernel_profile_families_name_the_unified_attention_kernels():
    """The unified kernel's two launches count as attention (the long-query one's name,
    _prefill_kernel, holds "fill", which the copy family matches)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from kernel_profile import family

    assert family("_short_query_kernel") == "attention"
    assert family("_prefill_kernel") == "attention"
    assert family("_decode_partition_kernel") == "attention"
    assert family("Memset (Device)") == "copy"
    assert family("_silu_and_mul_fp8_kernel") == "activation"
    # moe_gemv.cu's down kernels are the MoE layer's; its dense one-row GEMV has an entry point of its own
    assert family("void moe_gemv_down<1, 8, 3, 1, 0>(unsigned short const*, ...)") == "moe"
    assert family("void moe_gemv_down<1, 1, 24, 0, 1>(unsigned short const*, ...)") == "moe"  # top-1
    assert family("void moe_gemv_down_early<1, 8, 3, 1, 0, 168>(unsigned short const*, ...)") == "moe"
    assert family("void dense_gemv<1, 8, 0>(unsigned short const*, ...)") == "gemm"
    assert family("void dense_gemv<2, 12, 1>(unsigned short const*, ...)") == "gemm"


def test_block_fp8_gpu_smoke(tmp_path):
    """Every tile's output checked against the reference; the literal for the tile table printed."""
    _smoke("block_fp8_gpu.py", "--results-dir", str(tmp_path))
    doc = json.loads((tmp_path / "block_fp8_cpu.json").read_text())
    assert not doc["workload"]["wrong"] and "BLOCK_FP8_TILE['cpu']" in doc["workload"]["literal"]
    m = doc["metrics"]
    assert m["block_fp8_64x96_m1_linear_us"] > 0 and m["block_fp8_64x96_m5_linear_vs_rowwise_x"] > 0


def test_warp_spec_probe_reports_each_loop():
    """bench/warp_spec_probe.py compiles its two loops at 4 and 8 warps for sm90 here (a compiler
    probe: no --smoke, no GPU) and says for each what the pass made of it."""
    import pytest

    from llmesh.kernels.compile_check import nvidia_backend

    if not nvidia_backend():
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/warp_spec_probe.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line.split(":", 1) for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert [name.split()[0] + name.split()[1] for name, _ in lines] == ["tma4", "tma8", "gather4", "gather8"]
    assert all(outcome.strip().startswith(("partitioned", "declined", "compile failed")) for _, outcome in lines)


CPU_ONLY_KERNEL_TESTS = {"test_hopper_compile.py"}
"""Kernel test files with nothing for a GPU to run (sm90 compiles on the CPU)."""


def test_gpu_tests_sh_runs_every_kernel_test_file():
    """bench/gpu_tests.sh lists its groups by file: a kernel test file added without a group never
    runs on the device (test_extend_attention.py's FA3 cases and test_quant_dequant.py were missing)."""
    script = (ROOT / "bench" / "gpu_tests.sh").read_text()
    files = {p.name for p in (ROOT / "tests" / "kernels").glob("test_*.py")}
    missing = sorted(f for f in files - CPU_ONLY_KERNEL_TESTS if f"tests/kernels/{f}" not in script)
    assert not missing, f"kernel test files in no group of bench/gpu_tests.sh: {missing}"

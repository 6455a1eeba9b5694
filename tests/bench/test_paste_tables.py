"""bench/paste_tables.py on copies of the real kernel modules: a measured table literal goes in
after its declaration's docstring, replaces the same device's entry (one line or several), and
the module still compiles and holds exactly the measured values."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from paste_tables import TABLES, literals, paste, wrapped  # noqa: E402


def _entries(source: str, name: str) -> dict:
    """{device tag: the entry's source} for every NAME[tag] = ... in a module."""
    out = {}
    for stmt in ast.parse(source).body:
        if (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Subscript)
                and isinstance(stmt.targets[0].value, ast.Name) and stmt.targets[0].value.id == name):
            out[stmt.targets[0].slice.value] = ast.unparse(stmt.value)
    return out


@pytest.fixture
def repo(tmp_path):
    for module in set(TABLES.values()):
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / module, tmp_path / module)
    return tmp_path


def test_a_new_device_entry_goes_after_the_tables_docstring(repo):
    path = repo / "llmesh/kernels/dense_causal_attention.py"
    before = path.read_text()
    after = paste(before, "DENSE_CAUSAL_BACKEND['h999'] = {512: 'fa3', 1024: 'cudnn', 8192: 'fa3'}")
    compile(after, str(path), "exec")
    assert _entries(after, "DENSE_CAUSAL_BACKEND")["h999"] == "{512: 'fa3', 1024: 'cudnn', 8192: 'fa3'}"
    lines = after.splitlines()
    # the benchmarks print repr's single quotes; the module gets its own double ones
    at = lines.index('DENSE_CAUSAL_BACKEND["h999"] = {512: "fa3", 1024: "cudnn", 8192: "fa3"}')
    assert lines[at - 1].endswith('"""')  # right after the docstring, which stays with its declaration
    assert after.replace(lines[at] + "\n", "", 1) == before  # nothing else moved


def test_a_measured_entry_replaces_the_same_devices_multiline_one(repo):
    path = repo / "llmesh/kernels/block_fp8_gemm.py"
    before = path.read_text()
    old = _entries(before, "BLOCK_FP8_TILE")
    assert "h200" in old  # the module ships a measured multi-line entry
    new = "BLOCK_FP8_TILE['h200'] = {1: BlockFp8Config(16, 64, num_warps=4, num_stages=6)}"
    after = paste(before, new)
    compile(after, str(path), "exec")
    got = _entries(after, "BLOCK_FP8_TILE")
    assert got["h200"] == "{1: BlockFp8Config(16, 64, num_warps=4, num_stages=6)}"
    assert {k: v for k, v in got.items() if k != "h200"} == {k: v for k, v in old.items() if k != "h200"}
    assert paste(after, new) == after  # pasting the same measurement again changes nothing
    respaced = "BLOCK_FP8_TILE['h200'] = {1:BlockFp8Config(16,64,num_warps=4,num_stages=6)}"
    assert paste(after, respaced) == after  # nor does the same table laid out otherwise


def test_long_literals_are_wrapped_one_entry_a_line():
    statement = "EXTEND_BACKEND['h200'] = {" + ", ".join(f"{2 ** i}: 'fa3'" for i in range(4, 20)) + "}"
    out = wrapped(statement)
    assert max(map(len, out.splitlines())) <= 120 and out.count("\n") == 17
    assert ast.literal_eval(out.split(" = ", 1)[1]) == ast.literal_eval(statement.split(" = ", 1)[1])


def test_refusals_name_what_is_wrong(repo):
    source = (repo / "llmesh/kernels/extend_attention.py").read_text()
    with pytest.raises(ValueError, match="not a table entry"):
        paste(source, "EXTEND_BACKEND = {}")
    with pytest.raises(ValueError, match="NOT_A_TABLE is not declared"):
        paste(source, "NOT_A_TABLE['h200'] = {1: 'fa3'}")
    with pytest.raises(ValueError, match="not an entry of a known table"):
        literals({"workload": {"literal": "NOT_A_TABLE['h200'] = {}"}})


def test_each_table_goes_to_its_module():
    doc = {"workload": {"literal": "BLOCK_FP8_TILE['h9'] = {}\nBLOCK_FP8_LIBRARY['h9'] = {1: 'triton'}",
                        "extend_table": "EXTEND_BACKEND['h9'] = {}"}}
    assert [m for m, _ in literals(doc)] == ["llmesh/kernels/extend_attention.py",
                                             "llmesh/kernels/block_fp8_gemm.py", "llmesh/kernels/block_fp8_gemm.py"]
    key = literals({"workload": {"literal": "PAGED_DECODE_TILE[('h9', 'fp8')] = {}"}})  # a tuple key too
    assert key == [("llmesh/kernels/attention_config.py", "PAGED_DECODE_TILE[('h9', 'fp8')] = {}")]


def test_the_skinny_tables_of_a_gemm_sweep_go_into_their_module(repo):
    """gemm_sweep.py's two literals (the device's whole TUNED table, and with --ab-fused its
    FUSED_SLOWER set): a new device's entries are added, the same device's replaced, and the
    module then dispatches by them."""
    import importlib.util

    doc = {"workload": {"tuned_literal": "TUNED['h200'] = {(128, 2048, 1): (1, 4, 1024, 1, 4, 1, False)}",
                        "fused_slower_literal": "FUSED_SLOWER['h999'] = {(5120, 2048, 1)}"}}
    path = repo / "llmesh/kernels/skinny_gemm_config.py"
    source = path.read_text()
    for module, statement in literals(doc):
        assert module == "llmesh/kernels/skinny_gemm_config.py"
        source = paste(source, statement)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pasted_skinny_gemm_config", path)
    pasted = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pasted  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(pasted)
    finally:
        del sys.modules[spec.name]
    assert pasted.TUNED["h200"] == {(128, 2048, 1): (1, 4, 1024, 1, 4, 1, False)}  # the one statement replaced
    assert pasted.FUSED_SLOWER["h999"] == {(5120, 2048, 1)}
    assert pasted.FUSED_SLOWER["h200"]  # the other device's set kept


def test_the_cli_pastes_every_literal_of_a_result_file(repo, tmp_path):
    result = tmp_path / "kernels_h999_fa3.json"
    result.write_text(json.dumps({"metrics": {}, "workload": {
        "dense_causal_table": "DENSE_CAUSAL_BACKEND['h999'] = {512: 'triton', 8192: 'fa3'}",
        "extend_table": "EXTEND_BACKEND['h999'] = {256: 'fa3', 4096: 'triton'}"}}))
    cmd = [sys.executable, "bench/paste_tables.py", str(result), "--root", str(repo)]
    check = subprocess.run(cmd + ["--check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "h999" not in (repo / "llmesh/kernels/extend_attention.py").read_text()  # --check writes nothing
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _entries((repo / "llmesh/kernels/dense_causal_attention.py").read_text(),
                    "DENSE_CAUSAL_BACKEND")["h999"] == "{512: 'triton', 8192: 'fa3'}"
    assert _entries((repo / "llmesh/kernels/extend_attention.py").read_text(),
                    "EXTEND_BACKEND")["h999"] == "{256: 'fa3', 4096: 'triton'}"
    empty = tmp_path / "none.json"
    empty.write_text(json.dumps({"metrics": {}, "workload": {"dense_causal_table": None}}))
    none = subprocess.run([sys.executable, "bench/paste_tables.py", str(empty), "--root", str(repo)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert none.returncode == 1 and "no table literals" in none.stderr


@pytest.mark.timeout(300)
def test_run_gpu_causal_tables_stage_smoke(tmp_path):
    """SMOKE=1 STAGES=causal-tables: the measuring run, the paste (--check on the CPU: the modules
    stay as they are), the headline rerun marked +tables, the two modules copied to $OUT."""
    modules = [ROOT / "llmesh/kernels/dense_causal_attention.py", ROOT / "llmesh/kernels/extend_attention.py"]
    before = [m.read_text() for m in modules]
    env = {**os.environ, "SMOKE": "1", "STAGES": "causal-tables", "RESULTS_DIR": str(tmp_path / "r"),
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "LLMESH_COMMIT": "abc123"}
    proc = subprocess.run(["bash", "bench/run_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "[paste] llmesh/kernels/dense_causal_attention.py: DENSE_CAUSAL_BACKEND['cpu']" in proc.stdout
    measured = json.loads((tmp_path / "r/kernels_cpu_tables.json").read_text())
    headline = json.loads((tmp_path / "r/kernels_cpu.json").read_text())
    assert measured["commit"] == "abc123" and measured["workload"]["parts"] == ["causal"]
    assert headline["commit"] == "abc123+tables" and headline["workload"]["parts"] == ["causal", "unified", "rope_kv"]
    assert "prefill_attn_gemm_frac" in headline["metrics"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dense_causal_attention.py", "extend_attention.py", "kernels_cpu.json", "kernels_cpu_tables.json"]
    assert [m.read_text() for m in modules] == before


@pytest.mark.timeout(300)
def test_run_gpu_skinny_tables_stage_smoke(tmp_path):
    """SMOKE=1 STAGES=skinny-tables: the sweep, its paste (--check on the CPU: the module stays as
    it is), the fused-prologue A/B and its paste, the module copied to $OUT with both results."""
    module = ROOT / "llmesh/kernels/skinny_gemm_config.py"
    before = module.read_text()
    env = {**os.environ, "SMOKE": "1", "STAGES": "skinny-tables", "RESULTS_DIR": str(tmp_path / "r"),
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/run_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "[paste] llmesh/kernels/skinny_gemm_config.py: TUNED['cpu']" in proc.stdout
    assert "[paste] llmesh/kernels/skinny_gemm_config.py: FUSED_SLOWER['cpu']" in proc.stdout
    assert proc.stdout.index("TUNED['cpu']\n") < proc.stdout.index("skinny-ab:")  # the A/B after the paste
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gemm_fused_ab_cpu.json", "gemm_sweep_cpu.json", "skinny_gemm_config.py"]
    assert module.read_text() == before


def test_string_literals_are_double_quoted_where_that_changes_nothing_else():
    from paste_tables import double_quoted

    assert double_quoted("T['h1'] = {1: 'fa3', 2: Cfg(name='x')}") == 'T["h1"] = {1: "fa3", 2: Cfg(name="x")}'
    kept = "T['h1'] = {1: 'it\\'s', 2: \"say 'a'\", 3: b'raw'}"  # escapes, quotes inside, prefixes
    assert double_quoted(kept) == kept.replace("T['h1']", 'T["h1"]')
    assert ast.literal_eval(double_quoted(kept).split(" = ", 1)[1]) == ast.literal_eval(kept.split(" = ", 1)[1])

"""llmesh.bench_results.write_result: the record every benchmark writes (DESIGN.md's format)."""

from __future__ import annotations

import json
import math

import pytest

from llmesh.bench_results import write_result


def test_a_record_names_its_command_device_and_metrics(tmp_path):
    path = write_result("probe", {"n": 1}, {"x_ms": 1.5}, results_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert set(doc) == {"device", "commit", "command", "date", "workload", "metrics"}
    assert doc["metrics"] == {"x_ms": 1.5} and doc["workload"] == {"n": 1}
    assert "pytest" in doc["command"]  # this process's own command line


def test_a_script_records_the_command_its_caller_ran(tmp_path):
    """bench/gpu_tests.sh records through a child python: the record names the script's command."""
    path = write_result("probe", {}, {"n": 2}, results_dir=tmp_path, command="bash bench/gpu_tests.sh 400")
    assert json.loads(path.read_text())["command"] == "bash bench/gpu_tests.sh 400"


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1"])
def test_a_metric_that_is_not_a_finite_number_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="finite number"):
        write_result("probe", {}, {"x": bad}, results_dir=tmp_path)
    assert not (tmp_path / "probe.json").exists()

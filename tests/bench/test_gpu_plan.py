"""bench/gpu_plan.sh, the runner of a device call's steps, on the CPU (SMOKE=1): the steps for
this device in order, the budget's skips and timeout, each step's log and results packed after
it, and the plan the open issues' runs are kept in."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAN = ROOT / "bench/plans/open_goals.plan"


def _run(plan: Path, tmp_path: Path, *args: str, script: Path = ROOT / "bench/gpu_plan.sh", **env: str):
    inherited = {k: v for k, v in os.environ.items() if k not in ("STEPS", "DRY_RUN", "DEVICE_KEY", "RESERVE_S")}
    full = {**inherited, "SMOKE": "1", "RESULTS_DIR": str(tmp_path / "r"), "OUT": str(tmp_path / "out"),
            "LLMESH_COMMIT": "abc123", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(script), str(plan), *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


def _packed(tmp_path: Path) -> dict[str, str]:
    with tarfile.open(tmp_path / "out/plan.tgz") as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_steps_run_in_order_for_this_device_and_everything_comes_back(tmp_path):
    plan = tmp_path / "p.plan"
    plan.write_text("""# a comment | 1 | x | echo never
cpu | 5 | first | echo one; echo '{"metrics": {}}' > "$RESULTS_DIR/a_cpu.json"
h200 | 5 | other-device | echo never
* | 5 | fails | echo two; exit 3

* | 9999 | too-long | echo never
cpu,h100 | 5 | env | echo "out=${OUT:-unset} smoke=$SMOKE commit=$LLMESH_COMMIT"
""")
    proc = _run(plan, tmp_path, "100")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one step failed
    out = proc.stdout
    assert "never" not in out.replace("echo never", "")
    assert out.index("one\n") < out.index("two\n") < out.index("out=unset smoke=1 commit=abc123")
    assert "skip too-long: expects 9999s" in out and "fails: failed rc=3" in out and "env: ok" in out
    packed = _packed(tmp_path)
    logs = {Path(name).name: text for name, text in packed.items() if "/logs/" in f"/{name}"}
    assert set(logs) == {"01-first.log", "02-fails.log", "04-env.log"}  # 03 was skipped
    assert logs["02-fails.log"] == "two\n"
    results = [name for name in packed if name.endswith("a_cpu.json")]
    assert len(results) == 1 and packed[results[0]] == '{"metrics": {}}\n'


def test_steps_names_only_those_and_dry_run_runs_none(tmp_path):
    plan = tmp_path / "p.plan"
    plan.write_text("* | 5 | a | echo ran-a\n* | 5 | b | echo ran-b\n* | 5 | c | echo ran-c\n")
    proc = _run(plan, tmp_path, STEPS="c,a")
    assert proc.returncode == 0, proc.stderr
    assert "ran-a" in proc.stdout and "ran-c" in proc.stdout and "ran-b" not in proc.stdout
    dry = _run(plan, tmp_path, "14", DRY_RUN="1", RESERVE_S="2")
    assert dry.returncode == 0, dry.stderr
    assert "ran-" not in dry.stdout.replace("echo ran-", "")
    # the dry run counts each listed step's estimate as spent, not the clock: 12 s hold a and b, not c
    assert "would run a (5s of 12s left)" in dry.stdout and "would run b (5s of 7s left)" in dry.stdout
    assert "skip c: expects 5s, 2s left" in dry.stdout
    unknown = _run(plan, tmp_path, STEPS="a,d")
    assert unknown.returncode == 2 and "STEPS names 'd'" in unknown.stderr and "ran-a" not in unknown.stdout
    plan.write_text("* | 5 | a | echo ran-a\n* | 5 | last | echo ran-last")  # no newline at the end
    assert "ran-last" in _run(plan, tmp_path).stdout


@pytest.mark.timeout(60)
def test_the_budget_stops_a_running_step_and_everything_it_started(tmp_path):
    """The step's own `timeout` puts its sleep in a process group of its own, out of reach of a
    signal to the step's group; the step's session takes it along all the same."""
    plan = tmp_path / "p.plan"
    marker = "91.25"  # far past the 6 s the budget leaves it, so a loaded machine's slow start cannot blur the two
    plan.write_text(f"* | 1 | sleeper | echo start; timeout 100 sleep {marker}\n* | 1 | after | echo after\n")
    t0 = time.monotonic()
    proc = _run(plan, tmp_path, "8", RESERVE_S="2")
    assert time.monotonic() - t0 < 60, proc.stdout  # not the 91 s sleep
    assert proc.returncode == 1
    assert "sleeper: timed out" in proc.stdout and "skip after" in proc.stdout
    assert "after\n" not in proc.stdout.replace("skip after", "")
    assert _packed(tmp_path)["logs/01-sleeper.log"] == "start\n"  # packed after the cut step
    assert not _running(f"sleep\0{marker}"), "the step's sleep outlived it"


def _running(cmdline_part: str) -> bool:
    """Whether a process whose NUL-separated command line holds cmdline_part runs (read from /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline_part in cmdline.read_bytes().decode(errors="replace"):
                return True
        except OSError:  # gone meanwhile
            continue
    return False


def test_a_tree_without_git_needs_llmesh_commit_and_bad_lines_stop_the_plan(tmp_path):
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench/gpu_plan.sh", tree / "bench/gpu_plan.sh")
    plan = tmp_path / "p.plan"
    plan.write_text("* | 5 | a | echo ran-a\n")
    env = {k: v for k, v in os.environ.items() if k != "LLMESH_COMMIT"}
    proc = subprocess.run(["bash", str(tree / "bench/gpu_plan.sh"), str(plan)], cwd=tree,
                          env={**env, "SMOKE": "1", "GIT_CEILING_DIRECTORIES": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "LLMESH_COMMIT is unset" in proc.stderr and "ran-a" not in proc.stdout
    plan.write_text("* | soon | a | echo ran-a\n")
    bad = _run(plan, tmp_path)
    assert bad.returncode == 2 and "malformed line for step 'a'" in bad.stderr and "ran-a" not in bad.stdout


def _steps(plan: Path) -> list[tuple[str, int, str, str]]:
    steps = []
    for line in plan.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        devices, seconds, name, command = (part.strip() for part in line.split("|", 3))
        steps.append((devices, int(seconds), name, command))
    return steps


SETUP_S = 60
"""What a fresh machine's setup (carried wheels installed, llmesh imported) may take of a call."""


def test_the_open_goals_plan_names_real_scripts_and_fits_its_calls(tmp_path):
    steps = _steps(PLAN)
    names = [name for _, _, name, _ in steps]
    assert len(set(names)) == len(names)
    for _, _, name, command in steps:
        for script in re.findall(r"bench/[\w/]+\.(?:sh|py)", command):
            assert (ROOT / script).is_file(), (name, script)
        stages = re.search(r"STAGES=(\S+)", command)
        if stages:  # every stage a run_gpu.sh stage
            for stage in stages.group(1).split(","):
                assert f"want {stage}" in (ROOT / "bench/run_gpu.sh").read_text(), (name, stage)
    calls = dict(re.findall(r"^# calls (\w+): (.+)$", PLAN.read_text(), re.M))
    assert set(calls) == {"h200", "h100"}
    for device, line in calls.items():
        listed = [call.strip() for call in line.split("|")]
        mine = [name for devices, _, name, _ in steps if devices == "*" or device in devices.split(",")]
        assert sorted(n for call in listed for n in call.split(",")) == sorted(mine), device  # each step once
        for call in listed:
            # each call runs whole within the default budget on its device, with room for the setup
            proc = _run(PLAN, tmp_path, str(560 - SETUP_S), DRY_RUN="1", DEVICE_KEY=device, STEPS=call)
            assert proc.returncode == 0, proc.stderr
            assert "skip" not in proc.stdout, (device, call, proc.stdout)
            ran = re.findall(r"would run (\S+)", proc.stdout)
            assert ran == [name for name in mine if name in call.split(",")], (device, call, proc.stdout)

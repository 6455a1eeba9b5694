"""The README's run command: `llmesh up` starts the mesh with the demo model, streams a
sensible answer through the gateway, serves `llmesh generate`, and Ctrl-C leaves no
process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.mesh_helpers import free_ports

pytestmark = pytest.mark.slow
LLMESH = [sys.executable, "-m", "llmesh.cli"]


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_llmesh_up_answers_and_stops_cleanly(tmp_path):
    names = ("gateway", "router", "prefix-cache", "engine-base", "redis")
    ports = dict(zip(names, free_ports(len(names))))
    args = [*LLMESH, "up", "--device", "cpu", "--metrics-base-port", "0", "--run-dir", str(tmp_path),
            "--prompt", "What is the capital of France?",
            *[x for k, v in ports.items() for x in (f"--{k}-port", str(v))]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("LLMESH_API_KEY", None)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while "tok/s" not in "".join(out):
            assert proc.poll() is None, "".join(out)
            assert time.monotonic() < deadline, "".join(out)
            time.sleep(0.2)
        text = "".join(out)
        assert "llmesh is up" in text and "Paris" in text, text

        gen = subprocess.run([*LLMESH, "generate", "--address", f"127.0.0.1:{ports['gateway']}",
                              "--max-tokens", "8", "--temperature", "0", "Name a primary color:"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.strip() and "TTFT" in gen.stderr and "tok/s" in gen.stderr

        children = _children(proc.pid)
        assert len(children) >= 5  # redis, index, engine, router, gateway
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    time.sleep(0.5)
    assert proc.returncode == 0, "".join(out)
    assert not [p for p in children if _alive(p)], "processes left behind after Ctrl-C"


def test_llmesh_up_runs_the_redis_server_it_is_given(tmp_path):
    """--redis-server (or LLMESH_REDIS_SERVER) picks the program; a wrong one fails at once, by name."""
    from llmesh.launcher import UpConfig, plan_mesh
    from llmesh.models_file import parse_models

    models = parse_models({"models": [{"name": "m", "path": "random:tiny-llama3"}]})
    cfg = UpConfig(redis_server="/opt/redisroot/redis-server.sh")
    assert plan_mesh(cfg, models, tmp_path)[0][0].argv[0] == "/opt/redisroot/redis-server.sh"
    env = {**os.environ, "LLMESH_REDIS_SERVER": str(tmp_path / "no-redis-here"), "XDG_CONFIG_HOME": str(tmp_path),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    for extra, env_ in (([], env), (["--redis-server", str(tmp_path / "nor-here")],
                                    {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")})):
        proc = subprocess.run([*LLMESH, "up", "--device", "cpu", "--metrics-base-port", "0", "--run-dir",
                               str(tmp_path), *extra], capture_output=True, text=True, timeout=60, env=env_)
        assert proc.returncode == 1 and "redis" in proc.stderr and "LLMESH_REDIS_SERVER" in proc.stderr, proc.stderr
        assert ("no-redis-here" if not extra else "nor-here") in proc.stderr

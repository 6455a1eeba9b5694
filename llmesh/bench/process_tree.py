"""A service's processes as a tree, from Linux ``/proc``: CPU time and resident memory.

A gateway with ``--workers`` is a supervisor and its workers, an engine is its gRPC process
and its engine-core child: benchmarks read each as a process tree (elsewhere than Linux the
tree is empty and the figures 0).
"""

from __future__ import annotations

import os


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
            for task in tasks:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # gone meanwhile, or no /proc
        out.append(p)
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its live descendants, in MB."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            continue
    return total / 1024


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu_s(pid) for name, pid in pids.items()}


def cpu_fracs(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """``<name>_cpu_frac``: cores busy on average over ``wall_s`` (1.0 = one core)."""
    return {f"{name}_cpu_frac": (after[name] - before[name]) / max(wall_s, 1e-9) for name in before}

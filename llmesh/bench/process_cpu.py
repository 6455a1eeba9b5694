"""CPU time of a service's processes, to tell which one a load point saturates.

A gateway with ``--workers`` is a supervisor and its workers, an engine is its gRPC process
and its engine-core child: each is read as a process tree (Linux ``/proc``; elsewhere 0).
"""

from __future__ import annotations

import os


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # gone meanwhile, or no /proc
    return total


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu_s(pid) for name, pid in pids.items()}


def cpu_fracs(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """``<name>_cpu_frac``: cores busy on average over ``wall_s`` (1.0 = one core)."""
    return {f"{name}_cpu_frac": (after[name] - before[name]) / max(wall_s, 1e-9) for name in before}

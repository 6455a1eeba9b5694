"""Benchmark result files in the format of DESIGN.md ("Benchmark results").

One JSON object per file in bench/results/: device, commit, command, date, workload
(the parameters) and metrics (flat name → number, snake_case with a unit suffix).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"


def git_commit() -> str:
    """HEAD (with -dirty for uncommitted changes); LLMESH_COMMIT overrides it, for copies of the
    tree whose .git is not the one the code came from (the GPU machine's)."""
    import os

    if os.environ.get("LLMESH_COMMIT"):
        return os.environ["LLMESH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_tag(device) -> str:
    """Short name for result files: h100, h200, else the sanitized device name (cpu on the CPU)."""
    import re

    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for tag in ("H100", "H200"):
        if tag in name:
            return tag.lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def describe_device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    return f"cpu ({os.cpu_count()} cores, {cpu})"


def write_result(name: str, workload: dict[str, Any], metrics: dict[str, float], *,
                 device: str | None = None, results_dir: Path | None = None, command: str | None = None) -> Path:
    """Write ``<results_dir>/<name>.json``; metrics must be finite numbers. ``command``: the command
    that measured them, where it is not this process's own (a script that records for its caller)."""
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"metric {k} is not a finite number: {v!r}")
    doc = {
        "device": device or describe_device(),
        "commit": git_commit(),
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "workload": workload,
        "metrics": metrics,
    }
    out_dir = Path(results_dir) if results_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path

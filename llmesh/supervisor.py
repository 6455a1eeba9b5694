"""Supervision of ``llmesh up``'s children: one ``Child`` per process, restarted with backoff.

A child that exits on its own is started again after ``backoff_s``, doubling per failure
up to ``backoff_max_s``. A run that lasted ``quick_s`` or longer proves the child can
work, so it resets the count; ``max_quick_failures`` quick failures in a row mean it
cannot start at all, and the launcher gives up with a message naming it and its log.

Each child's stdout and stderr both land in its log file: stdout is read by a thread that
watches for the ready line (``LLMESH_READY``) and copies every line to the log, so
nothing waits on a pipe nobody reads.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from pathlib import Path

READY_PREFIX = b"LLMESH_READY "


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 0.5
    """Delay before the first restart; doubled per quick failure in a row."""
    backoff_max_s: float = 30.0
    quick_s: float = 60.0
    """A child that ran shorter than this before exiting failed "quickly"."""
    max_quick_failures: int = 5
    """Give up after this many quick failures in a row (0: never give up)."""

    def __post_init__(self) -> None:
        if self.backoff_s <= 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(f"restart backoff must satisfy 0 < backoff_s <= backoff_max_s, got "
                             f"{self.backoff_s} and {self.backoff_max_s}")
        if self.max_quick_failures < 0:
            raise ValueError(f"max_quick_failures must be >= 0, got {self.max_quick_failures}")


class RestartTracker:
    """One child's failures: how long to wait before its next start, or None to give up."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.quick_failures = 0
        self.restarts = 0

    def on_exit(self, ran_s: float) -> float | None:
        if ran_s >= self.policy.quick_s:
            self.quick_failures = 0
        self.quick_failures += 1
        if self.policy.max_quick_failures and self.quick_failures >= self.policy.max_quick_failures:
            return None
        self.restarts += 1
        return min(self.policy.backoff_max_s, self.policy.backoff_s * 2 ** (self.quick_failures - 1))


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Child:
    """One running (or waiting to restart) process of the mesh."""

    def __init__(self, name: str, log_path: Path, policy: RestartPolicy) -> None:
        self.name = name
        self.log_path = log_path
        self.tracker = RestartTracker(policy)
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.started_at = 0.0
        self.restart_at: float | None = None
        """When a pending restart is due (monotonic); None when none is pending."""
        self.announce_ready = False
        """After a restart: tell the user once the child is ready again."""

    def spawn(self, argv: list[str], env: dict[str, str], stdout_has_ready_line: bool) -> None:
        """Start the process, appending its output to the log. Call from the main thread:
        the children's parent-death signal fires when the spawning thread exits."""
        self.ready = threading.Event()
        with open(self.log_path, "ab") as log:
            if stdout_has_ready_line:
                self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log,
                                             stdin=subprocess.DEVNULL)
                threading.Thread(target=_copy_stdout, args=(self.proc, self.ready, self.log_path),
                                 name=f"{self.name}-stdout", daemon=True).start()
            else:
                self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, n_bytes: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def _copy_stdout(proc: subprocess.Popen, ready: threading.Event, log_path: Path) -> None:
    """Set ``ready`` at the child's ready line; copy every line to the log (and so never
    let the child block on a full pipe)."""
    assert proc.stdout is not None
    with open(log_path, "ab", buffering=0) as log:
        for raw in proc.stdout:
            if not ready.is_set() and raw.startswith(READY_PREFIX):
                ready.set()
            log.write(raw)

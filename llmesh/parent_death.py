"""Never outlive the launcher: the parent-death signal, for services and for Redis.

``llmesh up`` sets ``LLMESH_DIE_WITH_PARENT=1``; each llmesh service then arms
PR_SET_PDEATHSIG itself (``arm_from_env``). Redis cannot, so the launcher starts it as
``python -m llmesh.parent_death redis-server ...``: this arms the signal, then execs the
program (the signal survives exec), so a SIGKILLed launcher takes its Redis with it.

The signal fires when the *thread* that forked the child exits, so the launcher spawns
every child from its main thread.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "LLMESH_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def arm(sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when the parent dies; if it already died, get it now (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)


def arm_from_env() -> None:
    """Under `llmesh up` (``LLMESH_DIE_WITH_PARENT=1``): get SIGTERM when the launcher dies."""
    if os.environ.get(ENV) == "1":
        arm()


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m llmesh.parent_death PROGRAM [ARGS...]")
    arm()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        sys.exit(f"llmesh.parent_death: cannot run {argv[0]!r}: {e.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])

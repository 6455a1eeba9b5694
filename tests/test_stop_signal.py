"""StopFlag: a SIGTERM always stops a process whose main thread waits on it.

Each case starts a real child process whose main thread spins on ``wait(0)`` (so it is
almost always inside the wait, where ``threading.Event`` holds its lock), sends it SIGTERM,
and bounds the wait for its exit. The Event control shows the cases can fail: it hangs in
about half of the runs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

RUNS = 20
EXIT_WITHIN_S = 2.0

CHILD = textwrap.dedent("""
    import signal, sys, threading
    from llmesh.stop_signal import StopFlag
    if sys.argv[1] == "event":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    else:
        stop = StopFlag()
        stop.on_signals(signal.SIGTERM)
    print("ready", flush=True)
    while not stop.wait(0):
        pass
    if sys.argv[1] == "flag":
        assert stop.signal == signal.SIGTERM
""")


def hung_runs(kind: str) -> int:
    hung = 0
    for _ in range(RUNS):
        p = subprocess.Popen([sys.executable, "-c", CHILD, kind], stdout=subprocess.PIPE)
        try:
            assert p.stdout.readline() == b"ready\n"
            time.sleep(0.02)  # into the loop
            p.send_signal(signal.SIGTERM)
            try:
                assert p.wait(EXIT_WITHIN_S) == 0
            except subprocess.TimeoutExpired:
                hung += 1
        finally:
            p.kill()
            p.wait(10)
            p.stdout.close()
    return hung


def test_sigterm_always_stops_a_stop_flag_wait():
    assert hung_runs("flag") == 0


def test_an_event_set_from_the_handler_can_hang_the_process():
    """The control: the same child with threading.Event (what the supervisors used)."""
    if hung_runs("event") == 0:
        pytest.fail(f"threading.Event never hung in {RUNS} runs: this test no longer shows the deadlock")


def test_wait_times_out_and_returns_once_set():
    from llmesh.stop_signal import StopFlag

    flag = StopFlag()
    t0 = time.monotonic()
    assert flag.wait(0.12) is False
    assert 0.1 <= time.monotonic() - t0 < 2.0
    flag.set()
    assert flag.is_set() and flag.wait(5) is True

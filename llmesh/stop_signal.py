"""A stop request that a signal handler may raise: for the processes that supervise others
(``llmesh up``, the gateway's ``--workers`` supervisor).

A Python signal handler runs in the main thread between two bytecodes, so it can interrupt
that thread while it holds a lock. ``threading.Event.set()`` takes the Event's lock; if the
main thread was inside ``Event.wait()`` on the same Event at that moment (it holds the lock
briefly on every wake-up), the handler waits for a lock its own thread holds and the
process hangs with SIGTERM "delivered". That happened to the gateway supervisor once in
a full test run: it never stopped its workers, which outlived it for an hour and a half.
Here the handler only stores a flag, and ``wait`` polls it between short sleeps.
"""

from __future__ import annotations

import signal
import time

POLL_S = 0.05


class StopFlag:
    """``set``/``is_set``/``wait`` like ``threading.Event``, but safe to set from a handler."""

    def __init__(self) -> None:
        self._set = False
        self.signal: int | None = None
        """The signal that set it (None: not set, or set by ``set()``)."""

    def set(self) -> None:
        self._set = True  # one store: no lock, so nothing a handler can deadlock on

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep until set or ``timeout`` seconds passed; whether it is set."""
        deadline = time.monotonic() + timeout
        while not self._set:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, POLL_S))
        return True

    def on_signals(self, *signals: int) -> None:
        """Set this flag when any of ``signals`` arrives (call from the main thread)."""
        def handler(signum: int, _frame) -> None:
            self.signal = signum
            self._set = True

        for sig in signals:
            signal.signal(sig, handler)

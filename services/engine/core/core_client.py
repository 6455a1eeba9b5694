"""The front end's handle on an engine-core process: start it, send commands, read results.

Two one-way ``multiprocessing`` pipes (pickle over a socketpair). A reader thread blocks
on the results pipe and hands each message to ``on_message``; when the pipe ends (the
process died) or the core reports a failed step, ``on_death`` is called once with a
sentence saying what happened.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import signal
import threading
import weakref
from collections.abc import Callable

from llmesh.engine.config import EngineConfig
from llmesh.engine.core.core_proc import CoreFaults, run_core
from llmesh.engine.core.messages import CoreFailed, CoreReady, EngineCoreOutputs, Shutdown
from llmesh.engine.errors import EngineDeadError, EngineError

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[CoreClient] = weakref.WeakSet()


class CoreClient:
    def __init__(self, config: EngineConfig, *, on_message: Callable[[EngineCoreOutputs], None],
                 on_death: Callable[[str], None], faults: CoreFaults = CoreFaults(),
                 log_level: str = "info") -> None:
        self._on_message, self._on_death = on_message, on_death
        ctx = mp.get_context("spawn")  # fork would copy gRPC's and CUDA's threads and locks
        commands_r, self._commands = ctx.Pipe(duplex=False)
        self._results, results_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=run_core, args=(config, commands_r, results_w, faults, log_level),
                                name="llmesh-engine-core")
        self.proc.start()
        # Only the child holds these ends now, so its death reads as EOF here.
        commands_r.close()
        results_w.close()
        self._send_lock = threading.Lock()
        self._closing = False
        self._dead = False
        _LIVE.add(self)
        self.ready = self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="llmesh-core-results", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self) -> CoreReady:
        """Block until the model is loaded (no time limit: a big model loads for minutes),
        raising if the process fails or dies first."""
        while True:
            try:
                if self._results.poll(1.0):
                    msg = self._results.recv()
                    if isinstance(msg, CoreReady):
                        return msg
                    if isinstance(msg, CoreFailed):
                        self.shutdown(timeout=5)
                        raise EngineError(msg.message)
                    continue
            except EOFError:
                pass  # the child closed its end: it died while loading; the check below says how
            if not self.proc.is_alive():
                self.proc.join(1)
                self.shutdown(timeout=1)
                raise EngineDeadError(f"the engine core process {_describe_exit(self.proc.exitcode)} "
                                      "while loading the model")

    def send(self, msg) -> None:
        """Queue a command for the core; EngineDeadError when the core is gone."""
        if self._dead:
            raise EngineDeadError("the engine core is not running")
        try:
            with self._send_lock:
                self._commands.send(msg)
        except (OSError, ValueError) as e:  # broken pipe, or closed by shutdown
            raise EngineDeadError(f"the engine core is not running ({type(e).__name__})") from e

    def _read(self) -> None:
        reason = None
        while True:
            try:
                msg = self._results.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, CoreFailed):
                reason = msg.message
                self._die(reason)
                continue
            if not self._dead:
                try:
                    self._on_message(msg)
                except Exception as e:  # a front-end bug: fail loudly (streams end, core restarts), never hang
                    log.exception("handling the engine core's output failed")
                    self._die(f"the engine front end failed to handle the core's output "
                              f"({type(e).__name__}: {e})")
        self.proc.join(2)
        self._die(reason or f"the engine core process {_describe_exit(self.proc.exitcode)}")

    def _die(self, reason: str) -> None:
        if self._dead:
            return
        self._dead = True
        if self._closing:
            return
        log.error("engine core is gone: %s", reason)
        self._on_death(reason)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the core (it finishes its current step), killing it after ``timeout``."""
        self._closing = True
        if self.proc.is_alive():
            try:
                with self._send_lock:
                    self._commands.send(Shutdown())
            except (OSError, ValueError):
                pass  # the pipe is already closed: the child is gone or going, and is joined below
            self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("engine core did not stop within %.1fs: killing it", timeout)
            self.proc.kill()
            self.proc.join(5)
        self._dead = True
        self._commands.close()
        _LIVE.discard(self)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@atexit.register
def _stop_live_cores() -> None:
    """A front end that exits without shutdown() still takes its core with it (runs before
    multiprocessing's own exit hook, which would wait for the child forever)."""
    for client in list(_LIVE):
        client.shutdown(timeout=2)

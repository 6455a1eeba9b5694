"""The engine core's process: load the model, then loop — take commands, step while there
is work, send outputs and stats.

Three threads, so pickling and pipe I/O overlap the device's work: one reads commands
into a queue, the main one steps, one writes results. The process never outlives the
front end: the command pipe's EOF (the front end closed it or died) ends it at once, and
SIGINT/SIGTERM are ignored because the front end owns the shutdown (a signal to the
whole process group must not kill the core while the gRPC server drains).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from llmesh.engine.config import EngineConfig
from llmesh.engine.core.engine_core import EngineCore
from llmesh.engine.core.messages import (
    AbortRequests,
    CoreFailed,
    CoreReady,
    EngineCoreOutputs,
    EngineCoreRequest,
    RejectedRequest,
    Shutdown,
    UtilityCall,
    UtilityResult,
)
from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.kv_cache.events import KVEventBatch

log = logging.getLogger(__name__)

IDLE_TICK_S = 0.25
"""While idle the core still reports this often: the front end's proof that it is alive."""


@dataclass(frozen=True)
class CoreFaults:
    """Fault injection for tests of health, deadlines and failure containment."""

    step_delay_s: float = 0.0
    """Sleep this long before every step."""
    fail_at_step: int = 0
    """The core's N-th step raises (0: never)."""
    fail_admission: bool = False
    """Admitting any request raises (the request fails with an internal error; the core goes on)."""


class _ForwardingPublisher:
    """KV event batches published during a step ride to the front end with its outputs."""

    def __init__(self) -> None:
        self._batches: list[KVEventBatch] = []

    def publish(self, batch: KVEventBatch) -> None:
        self._batches.append(batch)

    def take(self) -> list[KVEventBatch]:
        batches, self._batches = self._batches, []
        return batches


_STOP = object()


class EngineCoreProc:
    def __init__(self, config: EngineConfig, commands: Connection, results: Connection, faults: CoreFaults) -> None:
        self.faults = faults
        self._commands, self._results = commands, results
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._publisher = _ForwardingPublisher()
        self._reader_started = False
        self.core = EngineCore(config, publisher=self._publisher, on_worker_death=self._worker_died)
        self._reader = threading.Thread(target=self._read_commands, name="core-commands", daemon=True)
        self._writer = threading.Thread(target=self._write_results, name="core-results", daemon=True)
        self._progress = time.monotonic()
        self._steps_run = 0

    def ready(self) -> CoreReady:
        core = self.core
        return CoreReady(num_kv_blocks=core.kv.num_total_blocks, max_model_len=core.max_model_len,
                         device=str(core.device), dtype=str(core.dtype).removeprefix("torch."),
                         quantization=core.quantization.name, pid=os.getpid())

    # ---- I/O threads ------------------------------------------------------------------------
    def _read_commands(self) -> None:
        while True:
            try:
                msg = self._commands.recv()
            except (EOFError, OSError):
                os._exit(0)  # the front end is gone: never outlive it
            self._inbox.put(msg)
            if isinstance(msg, Shutdown):
                return

    def _write_results(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is _STOP:
                return
            try:
                self._results.send(msg)
            except (OSError, EOFError):
                os._exit(0)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until Shutdown; returns the exit code (1 after a failed step)."""
        self._reader.start()
        self._writer.start()
        self._reader_started = True
        self._outbox.put(self.ready())
        last_sent = time.monotonic()
        code = 0
        try:
            while True:
                report = EngineCoreOutputs()
                if self._take_commands(report):
                    break
                if self.core.has_unfinished_requests():
                    report.outputs = self._step()
                    report.step_tokens = self.core.last_step_tokens
                self._progress = time.monotonic()
                report.kv_events = self._publisher.take()
                now = time.monotonic()
                if (report.outputs or report.step_tokens or report.rejected or report.utility_results
                        or report.kv_events or now - last_sent >= IDLE_TICK_S):
                    report.stats, report.progress_time = self.core.stats(), self._progress
                    self._outbox.put(report)
                    last_sent = now
        except Exception as e:  # the core's state is unknown now: stop, and say why
            log.error("engine core step failed: %s\n%s", e, traceback.format_exc())
            dead = self.core.tp.failure() if self.core.tp is not None else None
            cause = f"{dead}" if dead else f"{type(e).__name__}: {e}"
            self._outbox.put(CoreFailed(f"the engine core's step failed ({cause}); the core process stopped",
                                        traceback.format_exc()))
            code = 1
        self._outbox.put(_STOP)
        self._writer.join(10)
        self.core.shutdown()
        return code

    def _worker_died(self, reason: str) -> None:
        """A tensor-parallel worker exited (watcher thread): the core cannot step any more and
        may be blocked in a collective, so it reports why and ends its process from here."""
        failed = CoreFailed(f"the engine core stopped: {reason}", "")
        if self._reader_started:
            self._outbox.put(failed)
            self._outbox.put(_STOP)
            self._writer.join(5)
        else:  # still loading: the writer thread is not running yet
            try:
                self._results.send(failed)
            except (OSError, EOFError):
                pass
        _exit(1)

    def _take_commands(self, report: EngineCoreOutputs) -> bool:
        """Apply every queued command (waiting for one while idle); True on Shutdown."""
        idle = not self.core.has_unfinished_requests()
        try:
            msg = self._inbox.get(timeout=IDLE_TICK_S) if idle else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            if isinstance(msg, Shutdown):
                return True
            self._apply(msg, report)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return False

    def _apply(self, msg, report: EngineCoreOutputs) -> None:
        if isinstance(msg, EngineCoreRequest):
            try:
                if self.faults.fail_admission:
                    raise RuntimeError("fault injection: admission fails")
                self.core.add_request(msg)
            except InvalidRequestError as e:
                report.rejected.append(RejectedRequest(msg.request_id, str(e), e.field))
            except Exception as e:  # noqa: BLE001  (a bug: this request fails, the core goes on)
                log.error("admitting %s failed: %s\n%s", msg.request_id, e, traceback.format_exc())
                report.rejected.append(RejectedRequest(msg.request_id, f"{type(e).__name__}: {e}", invalid=False))
        elif isinstance(msg, AbortRequests):
            for request_id in msg.request_ids:
                self.core.finish_request(request_id, msg.reason)
        elif isinstance(msg, UtilityCall):
            report.utility_results.append(self._call(msg))
        else:
            raise TypeError(f"the engine core got an unknown command {type(msg).__name__}")

    def _call(self, msg: UtilityCall) -> UtilityResult:
        try:
            fn, args = pickle.loads(msg.payload)
            return UtilityResult(msg.call_id, result=fn(self.core, *args))
        except Exception as e:  # noqa: BLE001  (handed to the caller)
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                e = RuntimeError(f"{type(e).__name__}: {e}")
            return UtilityResult(msg.call_id, error=e)

    def _step(self):
        if self.faults.step_delay_s:
            time.sleep(self.faults.step_delay_s)
        self._steps_run += 1
        if self.faults.fail_at_step and self._steps_run == self.faults.fail_at_step:
            raise RuntimeError(f"fault injection: step {self._steps_run} fails")
        return self.core.step()


def run_core(config: EngineConfig, commands: Connection, results: Connection, faults: CoreFaults,
             log_level: str) -> None:
    """The core process's entry point (multiprocessing spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from tqdm import tqdm

    from llmesh.logs import setup_logging

    setup_logging("engine-core", log_level)
    # tqdm's default lock is a named semaphore, which _exit's skipped teardown would leak.
    tqdm.set_lock(threading.RLock())
    try:
        proc = EngineCoreProc(config, commands, results, faults)
    except BaseException as e:  # noqa: BLE001  (reported to the front end, which raises it)
        results.send(CoreFailed(f"the engine core could not start ({type(e).__name__}: {e})",
                                traceback.format_exc()))
        _exit(1)
    _exit(proc.run())


def _exit(code: int) -> None:
    """Exit without the interpreter's teardown: the core keeps nothing on disk, and tearing
    down torch took seconds of a graceful shutdown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

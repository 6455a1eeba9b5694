"""Tensor parallelism's processes, seen from rank 0 (the engine core's process).

Rank 0 starts one worker process per other rank (tp_worker.py), joins them in one
torch.distributed group (NCCL on CUDA, gloo on the CPU) and, every step, sends each worker
the staged step over its pipe (tp_messages.py) before running the same forward pass itself;
decode inputs still on rank 0's device (async scheduling) follow by a broadcast. Only rank 0
schedules and samples. A thread watches the workers: one that exits ends the engine core
the way a failed step does (``on_death``).

Why a pipe plus a broadcast: the step must reach a worker whenever it is scheduled, however
long the engine was idle before, and a collective left waiting (for the next step) would hit
the group's timeout; a pipe read waits without one and ends at EOF when the core dies. The
message is one packed int64 buffer, sent while rank 0's device still runs the previous step:
bench/tp_gpu.py measured a batch-1 decode step's (648 bytes) at ~60 µs one way and a batch of
256 at 1024 tokens of context (148 KB, mostly block tables) at ~110 µs on a busy 2-core CPU.
The tokens that exist only on rank 0's device go by a broadcast queued in stream order, so
the host never waits for them.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait

import torch

from llmesh.engine.config import EngineConfig
from llmesh.engine.core.tp_messages import STOP_MESSAGE, pack_step
from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.shard import ShardSpec
from llmesh.engine.quant.config import QuantSpec
from llmesh.engine.step_inputs import HostStep
from llmesh.ports import free_port

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 600
"""Bound on any collective of the group. The first one (agreeing on the KV pool size) waits
for the slowest rank to load its shard, so it covers a large model's load skew."""

WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
"""Set in every rank's environment: NVLink multicast (NVLS, symmetric memory) stays off."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard exactly as rank 0 builds its own."""

    config: EngineConfig
    model_config: ModelConfig
    quantization: QuantSpec
    max_model_len: int
    device: str
    """Rank 0's device; rank r takes the r-th next GPU."""
    dtype: torch.dtype
    rank: int
    world_size: int
    init_method: str
    log_level: str


def rank_device(base: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after rank 0's; the CPU stays the CPU."""
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def group_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(rank: int, world_size: int, device: torch.device, init_method: str,
               expert_parallel: bool = False) -> ShardSpec:
    """Join the tensor-parallel process group; the returned ShardSpec carries it."""
    os.environ.update(WORKER_ENV)
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    torch.distributed.init_process_group(group_backend(device), init_method=init_method, rank=rank,
                                         world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                                         **kwargs)
    return ShardSpec(rank, world_size, torch.distributed.group.WORLD, expert_parallel=expert_parallel)


_LIVE: weakref.WeakSet[TensorParallelGroup] = weakref.WeakSet()


@atexit.register
def _stop_live_groups() -> None:
    """A process that exits without shutting its group down still stops its workers (before
    multiprocessing's exit hook, which would wait for them: they ignore SIGTERM)."""
    for group in list(_LIVE):
        group.shutdown(timeout=2)


_LEFT_BEHIND = threading.Event()
"""Set when a teardown thread (destroy or abort) outlived its bound: it may still act on
torch.distributed's default group, so this process starts no new group."""


def _bounded(target: Callable[[], None], name: str, timeout: float) -> bool:
    """Run ``target`` on a daemon thread for at most ``timeout`` seconds; False (and the
    thread left behind, `_LEFT_BEHIND` set) when it did not return in time. An interpreter
    that is exiting refuses new threads (Python 3.12 at atexit): then ``target`` is skipped,
    not run unbounded, since the process ends anyway and its workers die with it."""
    done = threading.Event()

    def run() -> None:
        try:
            target()
        finally:
            done.set()

    try:
        threading.Thread(target=run, name=name, daemon=True).start()
    except RuntimeError:  # interpreter shutdown: no new threads
        log.warning("tensor-parallel group: %s skipped (the interpreter is exiting)", name)
        _LEFT_BEHIND.set()
        return False
    if done.wait(timeout):
        return True
    _LEFT_BEHIND.set()
    return False


def _abort_group(timeout: float) -> None:
    """Drop the default group without the collective teardown (a peer is gone or stuck),
    bounded: the abort can hang too (on the H200 it did, after a destroy that hung), and an
    engine that is shutting down must not hang with it. A stuck abort is left behind on its
    daemon thread; this process's NCCL state is then unusable until it exits."""

    def abort() -> None:
        try:
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        except Exception:  # noqa: BLE001  (a torch without it, or a group already gone)
            log.warning("tensor-parallel group: abort failed", exc_info=True)

    if not _bounded(abort, "tp-group-abort", timeout):
        log.error("tensor-parallel group: the abort did not return in %.0f s; left behind", timeout)


class TensorParallelGroup:
    """Rank 0's side: the worker processes, the group, each step's message, the watch."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, quantization: QuantSpec, *,
                 max_model_len: int, device: torch.device, dtype: torch.dtype,
                 on_death: Callable[[str], None] | None = None, log_level: str = "info") -> None:
        self.world_size = config.tensor_parallel_size
        if torch.distributed.is_initialized():
            raise RuntimeError("tensor parallelism: this process already runs a tensor-parallel engine (one "
                               "torch.distributed group per process); shut that engine down first")
        if _LEFT_BEHIND.is_set():
            raise RuntimeError("tensor parallelism: an earlier group's teardown did not finish in this process "
                               "(its NCCL state is unusable); start the engine in a fresh process")
        if device.type == "cuda":
            available = torch.cuda.device_count() - (device.index or 0)
            if available < self.world_size:
                raise RuntimeError(f"tensor parallelism: tensor_parallel_size={self.world_size} needs that many "
                                   f"GPUs from {device}, and {available} are visible")
        self.on_death = on_death
        self.before_leave: Callable[[], None] | None = None
        """Rank 0's runner drops its CUDA graphs here before the group is torn down (see
        `_leave_group`); the engine core sets it once the runner exists."""
        self._closing = False
        self._dead: str | None = None
        os.environ.update(WORKER_ENV)  # inherited by the spawned workers
        init_method = f"tcp://127.0.0.1:{free_port()}"
        from llmesh.engine.core.tp_worker import run_worker

        ctx = mp.get_context("spawn")  # fork would copy CUDA's and the core's threads
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        for rank in range(1, self.world_size):
            mine, theirs = ctx.Pipe(duplex=True)
            spec = WorkerSpec(config, model_config, quantization, max_model_len, str(device), dtype, rank,
                              self.world_size, init_method, log_level)
            proc = ctx.Process(target=run_worker, args=(spec, theirs), name=f"llmesh-tp-worker-{rank}", daemon=True)
            proc.start()
            theirs.close()  # only the child holds it now: its death reads as EOF here
            self.procs.append(proc)
            self.conns.append(mine)
        _LIVE.add(self)
        self._watch = threading.Thread(target=self._watch_workers, name="tp-worker-watch", daemon=True)
        self._watch.start()
        self.shard = init_group(0, self.world_size, rank_device(device, 0), init_method,
                                expert_parallel=config.enable_expert_parallel)
        log.info("tensor-parallel group up", extra={"world_size": self.world_size, "device": str(device),
                                                    "backend": group_backend(device),
                                                    "worker_pids": [p.pid for p in self.procs]})

    # ---- each step --------------------------------------------------------------------
    def send_step(self, host: HostStep, feed) -> None:
        """Hand the staged step to every worker; then broadcast the input ids that exist only
        on this rank's device (``feed``: last step's sampled ids)."""
        if self._dead:
            raise RuntimeError(self._dead)
        buf = pack_step(host)
        for conn in self.conns:
            conn.send_bytes(buf)
        if host.pending_index:
            values = feed.values(host.pending_requests).contiguous()  # [P] int64
            torch.distributed.broadcast(values, src=0, group=self.shard.group)

    # ---- failure ------------------------------------------------------------------------
    def failure(self) -> str | None:
        """Why a worker is gone (None while all run)."""
        if self._dead is None:
            for rank, proc in enumerate(self.procs, start=1):
                if not proc.is_alive():
                    self._dead = self._describe(rank, proc)
        return self._dead

    def _describe(self, rank: int, proc) -> str:
        from llmesh.engine.core.core_client import _describe_exit

        proc.join(1)
        why = ""
        conn = self.conns[rank - 1]
        try:
            while conn.poll(0):
                msg = conn.recv()
                if isinstance(msg, tuple) and msg and msg[0] == "failed":
                    why = f": {msg[1]}"
        except (EOFError, OSError):
            pass
        return f"tensor-parallel worker rank {rank} (pid {proc.pid}) {_describe_exit(proc.exitcode)}{why}"

    def _watch_workers(self) -> None:
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, start=1)}
        ready = wait(list(sentinels))
        if self._closing:
            return
        rank, proc = sentinels[ready[0]]
        self._dead = self._describe(rank, proc)
        log.error("tensor-parallel worker died", extra={"rank": rank, "reason": self._dead})
        if self.on_death is not None:
            self.on_death(self._dead)

    # ---- shutdown -----------------------------------------------------------------------
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the workers and leave the group together with them.

        NCCL tears a communicator down collectively: a rank that destroys it waits for its
        peers to do the same. So the stop message goes out first, this rank destroys its side
        at once while the workers destroy theirs (bounded: a thread), and only then are the
        workers joined. A group with a dead worker cannot be torn down collectively; it is
        aborted instead."""
        if self._closing:
            return
        self._closing = True
        for conn in self.conns:
            try:
                conn.send_bytes(STOP_MESSAGE)
            except (OSError, ValueError):
                pass  # already gone
        self._leave_group(collective=self.failure() is None, timeout=timeout, before=self.before_leave)
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        _LIVE.discard(self)

    @staticmethod
    def _leave_group(collective: bool, timeout: float, before: Callable[[], None] | None = None) -> None:
        """Once collectives were captured in CUDA graphs, destroying the group can hang in
        ncclCommDestroy (on the H200 it did, and the abort after it too): the graphs go first
        (`before`), inside the bounded thread, since their release synchronizes with the
        device. Not on the abort path: a dead peer can leave a collective that never ends."""
        if not torch.distributed.is_initialized():
            return
        if collective:
            abandoned = threading.Event()

            def destroy() -> None:
                if before is not None:
                    try:
                        before()
                    except Exception:  # noqa: BLE001  (the peers destroy anyway: so does this rank)
                        log.warning("tensor-parallel group: releasing the CUDA graphs failed", exc_info=True)
                if abandoned.is_set():  # the caller aborted meanwhile: the group may be another's now
                    return
                try:
                    torch.distributed.destroy_process_group()
                except Exception:  # noqa: BLE001  (aborted below)
                    log.warning("tensor-parallel group: destroy failed", exc_info=True)

            if _bounded(destroy, "tp-group-destroy", timeout) and not torch.distributed.is_initialized():
                return
            abandoned.set()
            log.warning("tensor-parallel group: the collective teardown did not finish in %.0f s; aborting",
                        timeout)
        _abort_group(timeout)

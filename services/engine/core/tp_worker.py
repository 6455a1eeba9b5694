"""A tensor-parallel worker process (ranks 1..N-1): load this rank's shard, then run every
step rank 0 sends, until the stop message or until rank 0's process is gone.

The worker holds no scheduler and samples nothing: it reads a staged step from its pipe
(tp_messages.py), runs the same forward pass as rank 0 (its heads, its columns, its
vocabulary range; the collectives pair up with rank 0's) and joins the LM head's gather.
Its pipe's EOF (the engine core exited or was killed) ends it at once, and SIGINT/SIGTERM
are ignored because the engine core owns the shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection

import torch

from llmesh.engine.core.tp_executor import WorkerSpec, init_group, rank_device
from llmesh.engine.core.tp_messages import unpack_step

log = logging.getLogger(__name__)


def _load(spec: WorkerSpec, device: torch.device):
    from llmesh.engine.loader import LoadedModel, load_model
    from llmesh.engine.loader.random_weights import PREFIX, RandomWeights

    if spec.config.model.startswith(PREFIX):
        # Rank 0's config, not a preset looked up again: a benchmark may have registered
        # its own shape in its process, and every rank draws the same seeded weights.
        return LoadedModel(config=spec.model_config, weights=RandomWeights(spec.model_config, device=device),
                           tokenizer_source="", source_format="random")
    return load_model(spec.config.model, name=spec.model_config.name)


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """The worker's entry point (multiprocessing spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    import threading

    from tqdm import tqdm

    from llmesh.logs import setup_logging

    setup_logging(f"engine-tp-worker-{spec.rank}", spec.log_level)
    # tqdm's default lock is a named semaphore, which _exit's skipped teardown would leak.
    tqdm.set_lock(threading.RLock())
    try:
        from llmesh.engine.core.runner_factory import build_runner
        from llmesh.engine.model_runner import BroadcastTokenFeed

        device = rank_device(torch.device(spec.device), spec.rank)
        if device.type == "cpu":  # the ranks share the host's cores: no oversubscription
            torch.set_num_threads(max(1, torch.get_num_threads() // spec.world_size))
        shard = init_group(spec.rank, spec.world_size, device, spec.init_method,
                           expert_parallel=spec.config.enable_expert_parallel)
        weights = _load(spec, device).weights_for(spec.quantization)
        runner = build_runner(spec.config, spec.model_config, weights, device=device, dtype=spec.dtype,
                              max_model_len=spec.max_model_len, linear_method=spec.quantization.linear_method,
                              shard=shard)
        runner.feed = BroadcastTokenFeed(shard)
        conn.send(("ready", runner.num_blocks))
    except BaseException as e:  # noqa: BLE001  (rank 0 reports it with the worker's exit)
        _fail(conn, f"could not start ({type(e).__name__}: {e})")
    while True:
        try:
            buf = conn.recv_bytes()
        except (EOFError, OSError):
            _exit(0)  # the engine core is gone: never outlive it
        host = unpack_step(buf)
        if host is None:  # rank 0 leaves the group now too: tear it down together (NCCL
            _leave_group(runner)  # can block a rank that destroys its communicator alone)
            _exit(0)
        try:
            runner.run_host_step(host)
        except BaseException as e:  # noqa: BLE001
            _fail(conn, f"step failed ({type(e).__name__}: {e})")


def _die_with_parent() -> None:
    """SIGKILL when the engine core dies: a worker blocked in a collective or on the device
    never reads the pipe's EOF, and would hold its GPU until NCCL's watchdog fired. Linux
    sends it when the *thread* that started the worker ends: the served core builds its group
    on its main thread; an offline ``LLM`` must be built on a thread that outlives it."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the core died before the call took effect
        _exit(0)


def _leave_group(runner) -> None:
    """The runner's CUDA graphs first: a group whose collectives were captured in graphs can
    hang on destroy (see TensorParallelGroup._leave_group)."""
    release = getattr(runner, "release_graphs", None)
    if release is not None:
        try:
            release()
        except Exception:  # noqa: BLE001  (rank 0 destroys anyway: so does this rank)
            log.warning("tensor-parallel worker: releasing the CUDA graphs failed", exc_info=True)
    try:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001  (exiting anyway)
        log.warning("tensor-parallel worker: leaving the process group failed", exc_info=True)


def _fail(conn: Connection, message: str) -> None:
    log.error("tensor-parallel worker %s\n%s", message, traceback.format_exc())
    try:
        conn.send(("failed", message))
    except (OSError, ValueError):
        pass
    _exit(1)


def _exit(code: int) -> None:
    """Exit without the interpreter's teardown (as the engine core does)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

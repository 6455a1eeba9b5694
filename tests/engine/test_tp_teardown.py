"""Tensor parallelism's teardown is bounded: a group abort that never returns (NCCL's can hang
once collectives were captured in CUDA graphs) is left behind after the timeout, and the graph
release runs before the collective destroy, inside the bounded thread."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
import torch.distributed.distributed_c10d as c10d

from llmesh.engine.config import EngineConfig
from llmesh.engine.core import tp_executor


def test_a_hanging_abort_is_left_behind_after_the_timeout(monkeypatch, caplog):
    """...and the process starts no new group while it may still act on the default one."""
    release = threading.Event()
    monkeypatch.setattr(tp_executor, "_LEFT_BEHIND", threading.Event())  # this test's flag only
    monkeypatch.setattr(c10d, "_abort_process_group", lambda *a, **k: release.wait(30))  # a stuck abort
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger=tp_executor.log.name):
        tp_executor._abort_group(0.2)
    assert time.monotonic() - t0 < 5
    assert "did not return" in caplog.text
    assert tp_executor._LEFT_BEHIND.is_set()
    config = EngineConfig(model="unused", tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match="teardown did not finish in this process"):
        tp_executor.TensorParallelGroup(config, None, None, max_model_len=64, device=torch.device("cpu"),
                                        dtype=torch.float32)
    release.set()


def test_an_abort_that_returns_is_waited_for(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(tp_executor, "_LEFT_BEHIND", threading.Event())
    monkeypatch.setattr(c10d, "_abort_process_group", lambda *a, **k: calls.append(1))
    with caplog.at_level(logging.ERROR, logger=tp_executor.log.name):
        tp_executor._abort_group(5)
    assert calls == [1] and "did not return" not in caplog.text
    assert not tp_executor._LEFT_BEHIND.is_set()


@pytest.fixture
def gloo_group(tmp_path):
    """A real one-rank gloo group in this process, destroyed afterwards if a test left it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_graphs_are_released_before_the_collective_destroy(gloo_group):
    import torch.distributed as dist

    seen = []
    tp_executor.TensorParallelGroup._leave_group(True, 5, before=lambda: seen.append(dist.is_initialized()))
    assert seen == [True]  # released while the group still stood
    assert not dist.is_initialized()


def test_a_failing_release_still_destroys_the_group(gloo_group):
    """The peers destroy their side whatever this rank's graphs did: so does this rank."""
    import torch.distributed as dist

    def fail() -> None:
        raise RuntimeError("a sticky CUDA error")

    tp_executor.TensorParallelGroup._leave_group(True, 5, before=fail)
    assert not dist.is_initialized()


def test_no_graph_release_on_the_abort_path(gloo_group):
    """A dead peer can leave a collective that never ends: releasing graphs would synchronize
    with it, so the abort path skips the release."""
    calls = []
    tp_executor.TensorParallelGroup._leave_group(False, 5, before=lambda: calls.append(1))
    assert calls == []

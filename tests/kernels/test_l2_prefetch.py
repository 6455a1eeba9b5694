"""The L2 prefetch kernel (llmesh/kernels/l2_prefetch.py): the chunks its programs ask for are
the reference plan's, over a byte range that covers the tensor inside its storage, and nothing a
prefetch touches changes. Under Triton's interpreter (no inline assembly) the kernel records its
chunks without prefetching; the sm90 compile shows the bulk prefetch it issues on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.compile_check import nvidia_backend  # noqa: E402
from llmesh.kernels.l2_prefetch import BLOCK, CHUNK, byte_span, chunk_plan, l2_prefetch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _tensors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40_000, generator=g).to(torch.bfloat16)
    big = torch.randint(0, 255, (BLOCK * CHUNK + 3 * CHUNK + 40,), dtype=torch.uint8, generator=g)  # two programs
    return {
        "whole": base,
        "offset view": base[3:39_001],
        "odd storage": torch.randint(0, 255, (5, 7777), dtype=torch.uint8, generator=g),
        "row slice": base.view(200, 200)[1:],
        "two programs": big,
        "one element": base[7:8],
    }


@pytest.mark.parametrize("case", list(_tensors()))
def test_byte_span_covers_the_tensor_inside_its_storage(case):
    t = _tensors()[case]
    lo, n = byte_span(t)
    first = t.storage_offset() * t.element_size()
    end = first + t.numel() * t.element_size()
    assert lo % 16 == 0 and n % 16 == 0
    assert lo <= first and lo + n <= t.untyped_storage().nbytes()
    assert lo + n >= min(end, t.untyped_storage().nbytes() - t.untyped_storage().nbytes() % 16) or n == 0
    assert first - lo < 16


@pytest.mark.skipif(not RUNS, reason="the kernel runs on a CUDA device or under TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", list(_tensors()))
def test_the_kernels_chunks_are_the_plan_and_values_stay(case):
    t = _tensors()[case].to(DEVICE)
    before = t.clone()
    lo, n = byte_span(t)
    plan = chunk_plan(n)
    record = torch.full((2 * len(plan) + 2,), -7, dtype=torch.int64, device=DEVICE)
    assert l2_prefetch(t, record=record) == n
    got = [tuple(pair) for pair in record.view(-1, 2).tolist()]
    assert got[: len(plan)] == plan and got[len(plan):] == [(-7, -7)]  # nothing past the last chunk
    assert all(size % 16 == 0 and 0 < size <= CHUNK for _, size in plan)
    assert torch.equal(t, before)
    assert l2_prefetch(t) == n  # without a record: the guarded store is never taken
    assert torch.equal(t, before)
    lead = torch.full_like(record, -7)
    assert l2_prefetch(t, max_bytes=n // 3 + 5, record=lead) == (n // 3 + 5) // 16 * 16  # a leading share
    head = chunk_plan((n // 3 + 5) // 16 * 16)
    assert [tuple(pair) for pair in lead.view(-1, 2).tolist()][: len(head) + 1] == head + [(-7, -7)]


def test_refusals_and_the_cpu_noop(monkeypatch):
    t = torch.zeros(4, CHUNK // 4)  # four chunks of float32
    with pytest.raises(ValueError, match="contiguous"):
        byte_span(t.t())
    if RUNS:
        with pytest.raises(ValueError, match="8 needed for 4 chunks"):
            l2_prefetch(t.to(DEVICE), record=torch.zeros(6, dtype=torch.int64, device=DEVICE))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert l2_prefetch(t) == 0  # a CPU tensor without the interpreter: nothing to ask, no launch


_COMPILE = r"""
from llmesh.kernels.compile_check import compile_sm90
from llmesh.kernels.l2_prefetch import _l2_prefetch_kernel
k = compile_sm90(_l2_prefetch_kernel, {"base_ptr": "u8", "record_ptr": "u8"},  # the engine's launch
                 dict(CHUNK=4096, BLOCK=32, RECORD=False, INTERPRET=False), num_warps=1, num_stages=1)
ptx = k.asm["ptx"]
print(ptx.count("cp.async.bulk.prefetch.L2.global"), len(k.asm["cubin"]) > 0)
"""


@pytest.mark.skipif(not nvidia_backend(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_compiles_for_sm90_to_one_bulk_prefetch_a_thread():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, cubin = proc.stdout.split()
    assert int(count) == 1 and cubin == "True"  # one instruction in the code, issued by every thread

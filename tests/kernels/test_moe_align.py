"""The Triton align steps (moe_align.py: the one-program kernel, the chunked kernels, the chunked
kernels with a sort) give exactly the torch reference's sorted pairs, block experts and padded length: ids of another
rank (-1), experts never hit, pairs spanning several chunks (ranks carried across chunks),
the size cut-over between the paths."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.moe_align import (  # noqa: E402
    ALIGN_KERNEL_MAX_PAIRS, CHUNK_PAIRS, moe_align_block_size, moe_align_block_size_ref)


def _ids(t, e, k, gen, held_elsewhere=0.0, skew=False):
    """[T, k] distinct experts per token; a share of them -1 (an expert another rank holds)."""
    logits = torch.randn(t, e, generator=gen)
    if skew:
        logits[:, : max(1, e // 4)] += 3.0  # a few hot experts, some never hit
    ids = logits.topk(k, dim=-1).indices
    if held_elsewhere:
        ids = torch.where(torch.rand(t, k, generator=gen) < held_elsewhere, -1, ids)
    return ids


@pytest.mark.parametrize("t,e,k,block_m,held,skew", [
    (1, 128, 8, 16, 0.0, False),    # batch 1 of Qwen3-30B-A3B's routing: 8 pairs, 120 experts idle
    (37, 6, 2, 16, 0.0, True),      # 74 pairs in 3 chunks, hot experts
    (64, 8, 2, 32, 0.4, False),     # expert parallelism: -1 pairs run last, as -1 blocks
    (100, 128, 8, 64, 0.1, True),   # 800 pairs, 25 chunks
    (5, 3, 3, 16, 1.0, False),      # every pair held elsewhere
    (CHUNK_PAIRS // 2 + 3, 16, 2, 16, 0.2, True),  # chunked: a second chunk of 6 pairs
    (3 * CHUNK_PAIRS // 8, 128, 8, 32, 0.0, True),  # chunked: 3 full chunks, many buckets
])
@pytest.mark.parametrize("path", ["program", "chunks", "sorted"])
def test_kernel_equals_reference(device, t, e, k, block_m, held, skew, path):
    gen = torch.Generator().manual_seed(t * 31 + e + block_m)
    ids = _ids(t, e, k, gen, held, skew)
    ref = moe_align_block_size_ref(ids, block_m, e)
    for dtype in (torch.int64, torch.int32):  # select_experts' ids, and a caller's int32 ones
        got = moe_align_block_size(ids.to(dtype).to(device), block_m, e, path=path)
        for name, a, b in zip(("sorted_ids", "expert_ids", "num_tokens_post_padded"), got, ref):
            assert a.dtype == b.dtype == torch.int32, name
            assert torch.equal(a.cpu(), b), (name, dtype, a.cpu().tolist()[:40], b.tolist()[:40])


def test_unknown_path_is_refused(device):
    with pytest.raises(ValueError, match="path must be one of"):
        moe_align_block_size(torch.zeros(2, 2, dtype=torch.int64, device=device), 16, 4, path="fast")


def test_default_path_picks_by_size(device, monkeypatch):
    """Up to ALIGN_KERNEL_MAX_PAIRS pairs the one-program kernel aligns (under the interpreter,
    and on CUDA with ALIGN_KERNEL_ON_CUDA), past it the chunked kernels; on CUDA with
    ALIGN_SORTED_ON_CUDA the sorted path takes every size past ALIGN_PROGRAM_MAX_PAIRS_SORTED.
    Spies on the kernels say which ran, and either way the output is the reference's."""
    import llmesh.kernels.moe_align as moe_align

    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(moe_align, "_moe_align_kernel", Spy("program", moe_align._moe_align_kernel))
    monkeypatch.setattr(moe_align, "_chunk_place_kernel", Spy("chunks", moe_align._chunk_place_kernel))
    monkeypatch.setattr(moe_align, "_sorted_place_kernel", Spy("sorted", moe_align._sorted_place_kernel))
    gen = torch.Generator().manual_seed(3)
    on_cuda = device.type == "cuda" and not moe_align.interpreting()
    sort = on_cuda and moe_align.ALIGN_SORTED_ON_CUDA
    program = "program" if not on_cuda or moe_align.ALIGN_KERNEL_ON_CUDA else "torch"
    cases = (  # (tokens at top-2, the path that must run)
        (4, program),
        (moe_align.ALIGN_PROGRAM_MAX_PAIRS_SORTED // 2 + 1, "sorted" if sort else program),
        (ALIGN_KERNEL_MAX_PAIRS // 2 + 1, "sorted" if sort else "chunks"),  # two pairs past the cut-over
    )
    for tokens, path in cases:
        ids = _ids(tokens, 16, 2, gen).to(device)
        launched.clear()
        got = moe_align_block_size(ids, 16, 16)
        assert launched == ([] if path == "torch" else [path]), (tokens, path, launched)
        assert moe_align.default_align_path(ids) == path
        for a, b in zip(got, moe_align_block_size_ref(ids.cpu(), 16, 16)):
            assert torch.equal(a.cpu(), b)

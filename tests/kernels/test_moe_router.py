"""The MoE router's one-program top-k softmax (llmesh/kernels/moe_router.py) against its torch reference
on random logits: the same experts in the same order, weights to float32 rounding (the
reductions' order differs), renormalised or not, every weights dtype the models use."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels import moe_router  # noqa: E402
from llmesh.kernels.moe_router import select_experts, topk_softmax, topk_softmax_ref  # noqa: E402


@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (5, 60, 4), (3, 128, 8), (2, 6, 6), (4, 200, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(device, t, e, k, renormalize, weights_dtype):
    gen = torch.Generator().manual_seed(t * 1000 + e + k)
    logits = (torch.randn(t, e, generator=gen) * 3).to(torch.bfloat16)
    want_w, want_ids = topk_softmax_ref(logits.float(), k, renormalize, weights_dtype)
    got_w, got_ids = topk_softmax(logits.to(device), k, renormalize, weights_dtype)
    assert got_ids.dtype == torch.int64 and got_w.dtype == weights_dtype
    assert got_ids.cpu().tolist() == want_ids.tolist()
    if weights_dtype == torch.float32:
        torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-6, atol=1e-6)
    else:  # the float32 values agree to 1e-6, so their bfloat16 roundings agree but at a tie
        torch.testing.assert_close(got_w.cpu().float(), want_w.float(), rtol=2 ** -8, atol=0)
    if renormalize:
        torch.testing.assert_close(got_w.float().sum(-1).cpu(), torch.ones(t), rtol=2e-2, atol=2e-2)


def test_ties_go_to_the_lower_expert(device):
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0, 2.0]], device=device)
    _, ids = topk_softmax(logits, 3, False, torch.float32)
    assert ids.cpu().tolist() == [[1, 2, 4]]
    _, ids = topk_softmax(logits, 4, False, torch.float32)
    assert ids.cpu().tolist() == [[1, 2, 4, 3]]


def test_nan_and_empty_rows_name_distinct_real_experts(device):
    """A NaN logit (or a row of -inf) makes the row's probabilities NaN; the ids must still be k
    distinct experts in [0, E), so the expert counts and the MoE GEMMs index nothing outside."""
    logits = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 0.5, 1.5],
                           [float("-inf")] * 6,
                           [0.0, 3.0, 1.0, 2.0, 0.5, 1.5]], device=device)
    w, ids = topk_softmax(logits, 3, True, torch.float32)
    for row in ids.cpu().tolist():
        assert len(set(row)) == 3 and all(0 <= i < 6 for i in row)
    assert ids[2].cpu().tolist() == [1, 3, 5] and torch.isfinite(w[2]).all()
    assert torch.isnan(w[:2]).all()  # as the reference: NaN in, NaN weights out


def test_strided_logits_and_no_tokens(device):
    base = torch.randn(4, 20, generator=torch.Generator().manual_seed(3))
    view = base[:, ::2]  # [4, 10], stride 2 along the experts
    got_w, got_ids = topk_softmax(view.to(device), 3, True, torch.float32)
    want_w, want_ids = topk_softmax_ref(view, 3, True, torch.float32)
    assert got_ids.cpu().tolist() == want_ids.tolist()
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-6, atol=1e-6)
    w, ids = topk_softmax(torch.empty(0, 10, device=device), 2, True, torch.bfloat16)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_rejects_bad_arguments(device):
    logits = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="top_k"):
        topk_softmax(logits, 9, True, torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        topk_softmax(logits, 0, True, torch.float32)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        topk_softmax(logits[0], 2, True, torch.float32)
    with pytest.raises(ValueError, match="exceed"):
        topk_softmax(torch.randn(1, moe_router.MAX_EXPERTS + 1, device=device), 2, True, torch.float32)


def test_dispatch_follows_the_measured_flag(device, forbid, monkeypatch):
    """select_experts runs the kernel on a GPU where ROUTER_KERNEL_ON_CUDA is set (its GPU timing
    decided it) and the torch ops everywhere else, unless a path is forced."""
    logits = torch.randn(3, 16, device=device)
    if logits.is_cuda and moe_router.ROUTER_KERNEL_ON_CUDA:
        def refuse(*args, **kwargs):
            raise AssertionError("the torch ops ran where the kernel should have")
        monkeypatch.setattr(moe_router, "topk_softmax_ref", refuse)
    else:
        forbid(moe_router, "_topk_softmax_kernel")
    w, ids = select_experts(logits, 2, True, torch.float32)
    want_w, want_ids = topk_softmax_ref(logits, 2, True, torch.float32)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", [False, True])
def test_counts_each_chosen_expert_per_counted_token(device, kernel):
    """The load-balance counts: every chosen expert of a counted token (1) grows by one, padding
    tokens (0) add nothing, counts accumulate across calls; kernel and torch ops agree."""
    gen = torch.Generator().manual_seed(11)
    t, e, k = 9, 40, 4
    logits = torch.randn(t, e, generator=gen).to(device)
    counted = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.int64, device=device)
    counts = torch.full((e,), 5, dtype=torch.int64, device=device)
    _, ids = select_experts(logits, k, True, torch.float32, counts, counted, kernel=kernel)
    _, ids2 = select_experts(logits, k, True, torch.float32, counts, counted, kernel=kernel)
    assert torch.equal(ids, ids2)
    want = torch.full((e,), 5, dtype=torch.int64)
    for row, c in zip(ids.cpu().tolist(), counted.cpu().tolist()):
        for i in row:
            want[i] += 2 * c
    assert counts.cpu().tolist() == want.tolist()


def test_counts_arguments_are_checked(device):
    logits = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="together"):
        topk_softmax(logits, 2, True, torch.float32, torch.zeros(8, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="counts must be"):
        topk_softmax(logits, 2, True, torch.float32, torch.zeros(7, dtype=torch.int64, device=device),
                     torch.ones(2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="counted must be"):
        topk_softmax(logits, 2, True, torch.float32, torch.zeros(8, dtype=torch.int64, device=device),
                     torch.ones(3, dtype=torch.int64, device=device))

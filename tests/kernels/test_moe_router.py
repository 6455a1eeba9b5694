"""The MoE router's one-program top-k softmax (llmesh/kernels/moe_router.py) against its torch reference
on random logits: the same experts in the same order, weights to float32 rounding (the
reductions' order differs), renormalised or not, every weights dtype the models use."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels import moe_router  # noqa: E402
from llmesh.kernels.moe_router import route, route_ref, select_experts, topk_softmax, topk_softmax_ref  # noqa: E402


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


def _exact_inputs(t: int, e: int, h: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and gate with few significant bits: every product and partial sum is exact in float32,
    so the logits are the same whatever order a kernel sums in (and round the same way)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (t, h), generator=gen).to(dtype) / 4
    gate = torch.randint(-4, 5, (e, h), generator=gen).to(dtype) / 64
    return x, gate


@pytest.mark.parametrize("t,e,h,k,slice_e", [
    (1, 128, 2048, 8, 4),   # Qwen3-30B-A3B's router at batch 1
    (3, 8, 64, 2, 4),       # Mixtral's 8 experts, two slices
    (2, 60, 100, 4, 8),     # E not a multiple of the slice, H not a power of two
    (5, 128, 3000, 8, 8),   # H past one chunk: 1024-wide chunks, the last one short
    (4, 6, 32, 6, 1),       # k = E, a program per expert
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_equals_projection_then_topk_kernel(device, t, e, h, k, slice_e, dtype):
    """route (one launch) picks what the router GEMV then topk_softmax pick, weights bit for bit
    and the same expert counts, and leaves its arrival counters ready: a second call agrees."""
    x, gate = _exact_inputs(t, e, h, dtype, seed=t * 100 + e + h)
    x, gate = x.to(device), gate.to(device)
    counted = torch.ones(t, dtype=torch.int64, device=device)
    counted[0] = 0  # a padding row: chosen, not counted
    counts, want_counts = (torch.zeros(e, dtype=torch.int64, device=device) for _ in range(2))
    for weights_dtype in (torch.float32, dtype):
        want_w, want_ids = topk_softmax(torch.nn.functional.linear(x.float(), gate.float()).to(dtype), k, True,
                                        weights_dtype, want_counts, counted)
        for _ in range(2):
            got_w, got_ids = route(x, gate, k, True, weights_dtype, counts, counted, slice_e=slice_e)
            assert got_ids.cpu().tolist() == want_ids.cpu().tolist()
            assert torch.equal(got_w.cpu(), want_w.cpu()) and got_w.dtype == weights_dtype
    assert torch.equal(counts.cpu(), 2 * want_counts.cpu())


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_reference_on_random_weights(device, renormalize):
    """Random bfloat16 weights, so the logits' sums round in another order than nn.Linear's:
    the chosen probabilities agree with the reference's to bfloat16 rounding (ties between
    experts may be named in another order, so the comparison is of the sorted weights)."""
    gen = torch.Generator().manual_seed(7)
    t, e, h, k = 4, 128, 512, 8
    x = torch.randn(t, h, generator=gen).bfloat16()
    gate = (torch.randn(e, h, generator=gen) * 0.05).bfloat16()
    want_w, want_ids = route_ref(x, gate, k, renormalize, torch.float32)
    got_w, got_ids = route(x.to(device), gate.to(device), k, renormalize, torch.float32)
    torch.testing.assert_close(got_w.cpu().sort(-1).values, want_w.sort(-1).values, rtol=2e-2, atol=1e-3)
    overlap = [len(set(a) & set(b)) for a, b in zip(got_ids.cpu().tolist(), want_ids.tolist())]
    assert min(overlap) >= k - 2, overlap  # only near-ties at the k-th place can differ


def test_route_rejects_bad_arguments(device):
    x = torch.randn(2, 32, device=device).bfloat16()
    gate = torch.randn(8, 32, device=device).bfloat16()
    with pytest.raises(ValueError, match=r"x \[T, H\] and gate \[E, H\]"):
        route(x, gate[:, :16], 2, True, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        route(x, gate.float(), 2, True, torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        route(x, gate, 9, True, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        route(x, gate, 2, True, torch.float32, slice_e=3)
    w, ids = route(x[:0], gate, 2, True, torch.float32)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_route_fusable_only_where_measured(device):
    """The triton table fuses at decode sizes (ROUTE_MAX_TOKENS) for a plain 16-bit gate in x's
    dtype; float32 models, larger batches and other gate forms take the GEMV and top-k."""
    gate = torch.zeros(8, 32, dtype=torch.bfloat16, device=device)
    x = torch.zeros(moe_router.ROUTE_MAX_TOKENS, 32, dtype=torch.bfloat16, device=device)
    on = device.type == "cuda" or moe_router.interpreting()
    assert moe_router.route_fusable(x, gate) == on
    assert not moe_router.route_fusable(torch.zeros(moe_router.ROUTE_MAX_TOKENS + 1, 32, dtype=torch.bfloat16,
                                                    device=device), gate)
    assert not moe_router.route_fusable(x.float(), gate.float())
    assert not moe_router.route_fusable(x, gate.half())
    assert not moe_router.route_fusable(x, [gate])

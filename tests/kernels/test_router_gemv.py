"""The one-token MoE router in one CUDA C++ launch (llmesh/kernels/router_gemv.py): on the CPU the
instances it launches, what it refuses, when the op table takes it, and that NVRTC compiles them
with no local memory, the early form's weight loads before its PDL wait and the logits read back
from L2 after the arrival; on a GPU, its choice against moe_router's reference (Qwen-MoE's 128
experts, top-8, renormalised bf16 weights; Mixtral's 8, top-2, float32; odd sizes), the expert
counts, and CUDA-graph replays (the arrival counter resets itself). The reference's logits are
gemv's with the same config, which the kernel's rows are bit for bit (gemv is tested against
F.linear in test_moe_gemv.py), and its ties go to the lower expert id, as moe_router's kernel's do."""

from __future__ import annotations

import pytest
import torch

from llmesh.kernels import moe_gemv as mg
from llmesh.kernels import router_gemv as rg
from tests.kernels.nvrtc_check import compiled_report, global_loads, machine_code, weight_loads_before_wait

GPU = torch.cuda.is_available()


def test_instances_name_the_gemv_form_and_the_choice():
    # Qwen3-30B-A3B: 128 experts over H 2048 (8 slices a lane), 4 experts a lane of the choosing warp
    qwen = rg.instance(128, 2048, True, False, True, mg.GemvConfig(1, 4, True))
    assert qwen == "router_gemv<1, 8, 1, 4, 16, 1, 0, 1>"
    # Mixtral: 8 experts over H 4096 (16 slices), float32 weights, no renormalisation, no counts
    assert rg.instance(8, 4096, False, True, False, mg.GemvConfig()) == "router_gemv<1, 16, 0, 1, 16, 0, 1, 0>"
    assert rg.instance(60, 200, True, True, True, mg.GemvConfig(2)) == "router_gemv<2, 1, 0, 2, 16, 1, 1, 1>"


def test_refusals_say_why():
    x, w = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    assert rg.unsupported(x, w, 2, torch.bfloat16) == "a CUDA kernel"
    assert not rg.chosen(x, w, 2, torch.bfloat16)  # a CPU tensor is never taken
    with pytest.raises(ValueError, match="router: a CUDA kernel"):
        rg.router(x, w, 2, True, torch.bfloat16)


def test_nvrtc_compiles_the_instances_without_local_memory(tmp_path):
    shapes = ((128, 2048, 1), (8, 4096, 1), (256, 512, 2), (60, 200, 1), (16, 40, 2))
    names = {rg.instance(e, k, renorm, w32, count, mg.GemvConfig(rows, early=early))
             for e, k, rows in shapes for early in (False, True) for renorm, w32, count in ((1, 0, 1), (0, 1, 0))}
    for name in sorted(names):
        cubin, lowered, report = compiled_report("moe_gemv.cu", name, tmp_path)
        assert lowered.startswith("_Z") and len(cubin) > 4_000
        assert report["LOCAL"] == 0 and report["STACK"] == 0, (name, report)
        listing = machine_code(cubin, tmp_path)
        loads = global_loads(listing)
        # the read-only path for the router's weights alone; x by coherent loads, the logits other
        # blocks stored from L2 (.cg: STRONG.GPU), only after this block's arrival (the atomic)
        assert all(".NA." in op for op in loads if op.endswith(".CONSTANT")), (name, loads)
        assert "LDG.E.U16.STRONG.GPU" in loads, (name, loads)
        assert listing.index("ATOMG.E.ADD.STRONG.GPU") < listing.index("LDG.E.U16.STRONG.GPU"), name
        rows, slices, early = (int(v) for v in name[name.index("<") + 1:].split(", ")[:3])
        if early:  # the whole first pass before the wait (a branch on its values holds it there)
            assert weight_loads_before_wait(listing) >= rows * slices, name


def _expected(logits: torch.Tensor, k: int, renorm: bool, wdt: torch.dtype, counted: int = 1, counts=None):
    """moe_router.topk_softmax_ref's choice from these logits [1, E] with its ties to the lower expert id made
    explicit (torch.topk leaves their order open; bf16 logits of a few hundred experts do tie)."""
    row = logits.float().cpu()[0]
    ids = sorted(range(row.numel()), key=lambda i: (-float(row[i]), i))[:k]
    probs = torch.softmax(row, dim=-1)[ids]
    weights = probs / probs.sum() if renorm else probs
    if counts is not None:
        counts[ids] += counted
    return weights[None].to(wdt), torch.tensor([ids])


def _case(seed, e, h, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, h, generator=gen).bfloat16().to(device)
    w = (torch.randn(e, h, generator=gen) * 0.05).bfloat16().to(device)
    return x, w


@pytest.mark.skipif(not GPU, reason="a CUDA kernel: needs a GPU")
@pytest.mark.parametrize("e,h,k,renorm,wdt,rows,early", [
    (128, 2048, 8, True, torch.bfloat16, 1, True),     # Qwen3-30B-A3B
    (8, 4096, 2, False, torch.float32, 1, False),      # Mixtral: float32 weights, no renormalisation
    (60, 200, 4, True, torch.float32, 2, True),        # part passes, experts past a lane's share
    (256, 512, 16, True, torch.bfloat16, 2, False),    # the most experts and pairs it holds
])
def test_the_choice_matches_the_reference_on_gpu(e, h, k, renorm, wdt, rows, early):
    config = mg.GemvConfig(rows, early=early)
    for seed in range(4):
        x, w = _case(seed, e, h)
        counts = torch.zeros(e, dtype=torch.int64, device="cuda")
        counted = torch.ones(1, dtype=torch.int64, device="cuda")
        weights, ids = rg.router(x, w, k, renorm, wdt, counts, counted, config=config)
        # the logits as the kernel rounds them: its rows are gemv's with the same config, bit for bit
        ref_counts = torch.zeros(e, dtype=torch.int64)
        ref_w, ref_ids = _expected(mg.gemv(x, w, config=config), k, renorm, wdt, 1, ref_counts)
        assert torch.equal(ids.cpu(), ref_ids), (seed, ids, ref_ids)
        torch.testing.assert_close(weights.float().cpu(), ref_w.float(),
                                   rtol=2 ** -8 if wdt == torch.bfloat16 else 1e-5, atol=1e-6)
        assert torch.equal(counts.cpu(), ref_counts)
        assert weights.dtype == wdt and ids.dtype == torch.int64 and ids.shape == (1, k)
    # padding (counted 0) chooses the same and counts nothing
    counts.zero_()
    rg.router(x, w, k, renorm, wdt, counts, torch.zeros(1, dtype=torch.int64, device="cuda"), config=config)
    assert not counts.any()


@pytest.mark.skipif(not GPU, reason="a CUDA kernel: needs a GPU")
def test_cuda_graph_replays_choose_for_new_inputs():
    x, w = _case(0, 128, 2048)
    counts = torch.zeros(128, dtype=torch.int64, device="cuda")
    counted = torch.ones(1, dtype=torch.int64, device="cuda")
    rg.router(x, w, 8, True, torch.bfloat16, counts, counted)  # compiled and the counter made outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = rg.router(x, w, 8, True, torch.bfloat16, counts, counted)
    counts.zero_()
    for seed in range(1, 4):
        x.copy_(_case(seed, 128, 2048)[0])
        graph.replay()
        ref_w, ref_ids = _expected(mg.gemv(x, w), 8, True, torch.bfloat16)
        assert torch.equal(ids.cpu(), ref_ids), seed
        torch.testing.assert_close(weights.float().cpu(), ref_w.float(), rtol=2 ** -8, atol=1e-6)
    assert int(counts.sum()) == 3 * 8


@pytest.mark.skipif(not GPU, reason="a CUDA kernel: needs a GPU")
def test_bad_arguments_are_named_on_gpu():
    x, w = _case(0, 300, 64)
    with pytest.raises(ValueError, match="at most 256 experts"):
        rg.router(x, w, 2, True, torch.bfloat16)
    x, w = _case(0, 8, 64)
    with pytest.raises(ValueError, match="1 to 8 experts a token"):
        rg.router(x, w, 9, True, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 or float32 routing weights"):
        rg.router(x, w, 2, True, torch.float16)
    with pytest.raises(ValueError, match="counts and counted come together"):
        rg.router(x, w, 2, True, torch.bfloat16, torch.zeros(8, dtype=torch.int64, device="cuda"))

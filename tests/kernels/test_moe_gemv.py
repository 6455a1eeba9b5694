"""The one-token MoE layer in CUDA C++ (llmesh/kernels/moe_gemv.py): on the CPU which instances a
layer launches, what it refuses and when fused_moe takes it, and that NVRTC compiles those
instances with no local memory; on a GPU, the layer against the torch reference on random
inputs (Qwen-MoE's bf16 routing weights and Mixtral's float32 ones, int32 / int64 ids, another
rank's experts, widths that are not multiples of a pass) and fused_moe's dispatch to it, inside
a CUDA graph too. The down kernel's dense instance (``gemv``, one pair, no routing) likewise: its
instances and refusals on the CPU, against F.linear and through linear() on a GPU."""

from __future__ import annotations

import pytest
import torch

from llmesh.kernels import moe_gemv as mg
from llmesh.kernels.fused_moe import fused_moe
from llmesh.kernels.fused_moe_ref import fused_moe_ref
from tests.kernels.nvrtc_check import compiled_report, global_loads, machine_code, weight_loads_before_wait
from tests.kernels.test_fused_moe import _experts, _routing

GPU = torch.cuda.is_available()


def test_instances_hold_the_layer_in_one_pass_where_registers_allow():
    cfg = mg.MoeGemvConfig()
    # Qwen3-30B-A3B: H 2048 (8 slices a lane, one pass), I 768 (3), 8 pairs, bf16 weights, int64 ids
    assert mg.instances(2048, 768, 8, True, False, cfg) == ("moe_gemv_up<1, 8, 1>", "moe_gemv_down<1, 8, 3, 1, 0>")
    # Mixtral: H 4096 in two passes of 8, I 14336 in passes of 12 slices (24 loads over 2 pairs)
    assert mg.instances(4096, 14336, 2, False, True, mg.MoeGemvConfig(2)) == (
        "moe_gemv_up<2, 8, 0>", "moe_gemv_down<1, 2, 12, 0, 1>")
    assert mg.instances(200, 40, 6, True, False, cfg)[1] == "moe_gemv_down<1, 8, 1, 1, 0>"  # 6 pairs: 8 slots
    assert mg.instances(64, 64, 16, True, False, mg.MoeGemvConfig(early_regs=128))[1] == (
        "moe_gemv_down_early<1, 16, 1, 1, 0, 128>")
    with pytest.raises(ValueError, match="up_rows"):
        mg.MoeGemvConfig(3)
    with pytest.raises(ValueError, match="early_regs"):
        mg.MoeGemvConfig(early_regs=64)


def test_what_it_refuses_and_when_fused_moe_takes_it(monkeypatch):
    x = torch.randn(1, 64).bfloat16()
    w13, w2 = _experts(4, 64, 32, torch.bfloat16, torch.Generator().manual_seed(0))
    weights, ids = _routing(1, 4, 2, torch.Generator().manual_seed(1))
    assert mg.unsupported(x, w13, w2, weights, ids) == "a CUDA kernel"
    monkeypatch.setenv(mg.ENV, "1")
    assert not mg.chosen(x, w13, w2, weights, ids)  # forced on, still only on a GPU
    if not GPU:  # fused_moe runs CPU tensors through Triton's interpreter only on a machine without a GPU
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids),
                                   atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="moe_gemv: a CUDA kernel"):
        mg.moe_gemv(x, w13, w2, weights, ids)


def test_default_configs_follow_the_tables_and_the_early_switch(monkeypatch):
    monkeypatch.delenv(mg.EARLY_ENV, raising=False)
    assert mg.layer_config("h100") == mg.CONFIGS["h100"] and mg.layer_config("none") == mg.MoeGemvConfig()
    assert mg.dense_config("h100", 128, 2048) == mg.DENSE_FASTER["h100"][(128, 2048)]
    assert (6144, 4096) not in mg.DENSE_FASTER["h100"]
    assert mg.dense_config("h100", 6144, 4096) == mg.DENSE_STEP["h100"]  # the step's default for other shapes
    assert mg.dense_config("none", 6144, 4096) == mg.GemvConfig()
    monkeypatch.setenv(mg.EARLY_ENV, "168")
    assert mg.layer_config("h100") == mg.MoeGemvConfig(mg.CONFIGS["h100"].up_rows, mg.CONFIGS["h100"].warps, 168)
    assert mg.dense_config("h100", 128, 2048).early and mg.dense_config("none", 64, 64) == mg.GemvConfig(early=True)
    monkeypatch.setenv(mg.EARLY_ENV, "100")
    with pytest.raises(ValueError, match="early_regs"):
        mg.layer_config("h100")


def test_nvrtc_compiles_the_instances_without_local_memory(tmp_path):
    names = {n for shape in ((2048, 768, 8), (4096, 14336, 2), (200, 40, 6), (64, 64, 16))
             for rows in (1, 2) for n in mg.instances(*shape, True, False, mg.MoeGemvConfig(rows))}
    dense = {mg.dense_instance(k, mg.GemvConfig(rows, early=early))
             for k in (2048, 4096, 14336, 40) for rows in (1, 2) for early in (False, True)}
    early = {mg.instances(2048, 768, 8, True, False, mg.MoeGemvConfig(early_regs=r))[1] for r in mg.EARLY_REGS}
    capped = {n for n in early if not n.endswith(", 255>")}
    for name in sorted(names | dense | early | {"moe_gemv_down<1, 8, 3, 0, 1>", "moe_gemv_up<1, 8, 0>"}):
        cubin, lowered, report = compiled_report("moe_gemv.cu", name, tmp_path)
        assert lowered.startswith("_Z") and len(cubin) > 4_000
        # the read-only path for the weights alone (L1::no_allocate: NA); the activations, ids and
        # routing weights the kernels before wrote come by coherent loads (cuda/common.cuh, ld_act)
        listing = machine_code(cubin, tmp_path)
        loads = global_loads(listing)
        assert all(".NA." in op for op in loads if op.endswith(".CONSTANT")), (name, loads)
        assert any(not op.endswith(".CONSTANT") for op in loads), (name, loads)
        # an early form's first pass of weight loads goes out before its PDL wait: R x KMAX x U of them
        # at least (moe_gemv_down_early<R, KMAX, U, ...>, dense_gemv<R, U, 1>; a loop's later passes may
        # be laid out before it too)
        args = [int(v) for v in name[name.index("<") + 1:-1].split(", ")]
        if name.startswith("moe_gemv_down_early"):
            assert weight_loads_before_wait(listing) >= args[0] * args[1] * args[2], name
        elif name.startswith("dense_gemv") and args[2] == 1 and args[1] >= 3:  # K = 40: ptxas sinks one of two
            assert weight_loads_before_wait(listing) >= args[0] * args[1], name
        if name in capped:  # a capped down kernel spills a few words to the stack, never to local arrays
            assert report["LOCAL"] == 0 and report["REG"] <= int(name.rsplit(", ", 1)[1][:-1]), (name, report)
            assert report["STACK"] <= 256, (name, report)
            continue
        # registers enough for every load of a pass in flight, and no spills
        assert report["LOCAL"] == 0 and report["STACK"] == 0, (name, report)


def _layer(seed, h, inter, e, k, weights_dtype, ids_dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, h, generator=gen).bfloat16()
    w13, w2 = _experts(e, h, inter, torch.bfloat16, gen)
    weights, ids = _routing(1, e, k, gen)
    return x, w13, w2, weights.to(weights_dtype), ids.to(ids_dtype)


@pytest.mark.skipif(not GPU, reason="a CUDA kernel: needs a GPU")
@pytest.mark.parametrize("h,inter,e,k,wdt,idt,rows", [
    (2048, 768, 16, 8, torch.bfloat16, torch.int64, 1),    # Qwen3-30B-A3B's widths
    (512, 1792, 8, 2, torch.float32, torch.int32, 2),      # Mixtral-like: float32 weights, a long down row
    (200, 40, 12, 6, torch.bfloat16, torch.int64, 1),      # part passes; 6 pairs in 8 slots
    (4096, 64, 20, 16, torch.bfloat16, torch.int32, 2),    # two passes of the gate/up rows; 16 pairs
])
def test_the_layer_matches_the_reference_on_gpu(h, inter, e, k, wdt, idt, rows):
    x, w13, w2, weights, ids = (t.cuda() for t in _layer(h + k, h, inter, e, k, wdt, idt))
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    for _ in range(2):
        got = mg.moe_gemv(x, w13, w2, weights, ids, config=mg.MoeGemvConfig(rows))
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
        got = mg.moe_gemv(x, w13, w2, weights, ids, config=mg.MoeGemvConfig(rows, early_regs=mg.EARLY_REGS[rows]))
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    foreign = ids.clone()
    foreign[0, ::2] = -1  # every other pair's expert is another rank's: it adds nothing
    torch.testing.assert_close(mg.moe_gemv(x, w13, w2, weights, foreign).float(),
                               fused_moe_ref(x, w13, w2, weights, foreign).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not GPU, reason="a CUDA kernel: needs a GPU")
def test_fused_moe_dispatches_to_it_and_a_cuda_graph_replays_it(monkeypatch):
    x, w13, w2, weights, ids = (t.cuda() for t in _layer(3, 1024, 256, 16, 8, torch.bfloat16, torch.int64))
    direct = mg.moe_gemv(x, w13, w2, weights, ids)
    monkeypatch.setenv(mg.ENV, "1")
    assert mg.chosen(x, w13, w2, weights, ids)
    assert torch.equal(fused_moe(x, w13, w2, weights, ids), direct)
    assert not mg.chosen(x.float(), w13.float(), w2.float(), weights, ids)  # bf16 only
    fused_moe(x, w13, w2, weights, ids)  # compiled and loaded before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, mg.moe_gemv(x, w13, w2, weights, ids))
    monkeypatch.setenv(mg.ENV, "0")
    assert not mg.chosen(x, w13, w2, weights, ids)


@pytest.mark.skipif(not GPU, reason="a CUDA kernel: needs a GPU")
def test_bad_arguments_are_named():
    x, w13, w2, weights, ids = (t.cuda() for t in _layer(5, 256, 64, 8, 4, torch.bfloat16, torch.int64))
    with pytest.raises(ValueError, match="one token only"):
        mg.moe_gemv(x.expand(2, -1), w13, w2, weights.expand(2, -1), ids.expand(2, -1))
    with pytest.raises(ValueError, match="bf16"):
        mg.moe_gemv(x.half(), w13.half(), w2.half(), weights, ids)
    with pytest.raises(ValueError, match="1 to 16 experts a token"):  # none: the early kernel's trap
        mg.moe_gemv(x, w13, w2, weights[:, :0], ids[:, :0])
    with pytest.raises(ValueError, match="1 to 16 experts a token"):
        mg.moe_gemv(x, w13, w2, weights.repeat(1, 5), ids.repeat(1, 5))
    with pytest.raises(ValueError, match="multiples of 8"):
        mg.moe_gemv(x[:, :252], w13[:, :, :252].contiguous(), w2[:, :252].contiguous(), weights, ids)


def test_dense_instances_and_refusals_on_the_cpu(monkeypatch):
    # K 2048: 8 slices a lane, the row in one pass; K 14336 in passes of 24 loads (12 a row at 2 rows)
    assert mg.dense_instance(2048, mg.GemvConfig()) == "dense_gemv<1, 8, 0>"
    assert mg.dense_instance(14336, mg.GemvConfig(2, 4, early=True)) == "dense_gemv<2, 12, 1>"
    with pytest.raises(ValueError, match="rows"):
        mg.GemvConfig(4)
    x, w = torch.randn(1, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    assert mg.dense_unsupported(x, w) == "a CUDA kernel"
    monkeypatch.setenv(mg.DENSE_ENV, "1")
    assert not mg.dense_chosen(x, w)
    with pytest.raises(ValueError, match="gemv: a CUDA kernel"):
        mg.gemv(x, w)


@pytest.mark.skipif(not GPU, reason="a CUDA kernel: needs a GPU")
@pytest.mark.parametrize("n,k,rows,warps", [(5120, 2048, 1, 8), (2048, 4096, 2, 4), (128, 2048, 1, 2),
                                            (301, 14336, 2, 8), (37, 40, 1, 4)])
def test_gemv_matches_f_linear_on_gpu(n, k, rows, warps):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, 1, k, generator=gen).bfloat16().cuda()  # [B, T, K] with one row, as a decode step
    w = (0.05 * torch.randn(n, k, generator=gen)).bfloat16().cuda()
    ref = x.float() @ w.float().t()
    for early in (False, True):
        got = mg.gemv(x, w, config=mg.GemvConfig(rows, warps, early))
        assert got.shape == (1, 1, n)
        torch.testing.assert_close(got.float(), ref, atol=2e-2 * float(ref.abs().max()), rtol=1e-2)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w), atol=2e-2 * float(ref.abs().max()), rtol=1e-2)
    with pytest.raises(ValueError, match="one row only"):
        mg.gemv(x.expand(2, 1, k), w)
    with pytest.raises(ValueError, match="bf16"):
        mg.gemv(x.half(), w.half())


@pytest.mark.skipif(not GPU, reason="a CUDA kernel: needs a GPU")
def test_linear_dispatches_to_gemv_and_a_cuda_graph_replays_it(monkeypatch):
    from llmesh.engine.quant.linear import linear

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2048, generator=gen).bfloat16().cuda()
    w = (0.05 * torch.randn(5120, 2048, generator=gen)).bfloat16().cuda()
    direct = mg.gemv(x, w)
    monkeypatch.setenv(mg.DENSE_ENV, "1")
    assert mg.dense_chosen(x, w) and torch.equal(linear(x, w), direct)
    assert not mg.dense_chosen(x.expand(2, -1), w)  # one row only
    linear(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, mg.gemv(x, w))
    monkeypatch.setenv(mg.DENSE_ENV, "0")
    assert not mg.dense_chosen(x, w)

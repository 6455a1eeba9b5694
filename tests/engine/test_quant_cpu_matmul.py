"""PyTorch's packed CPU GEMMs (quant/cpu_matmul.py) against the dequantizing reference on
random weights: per-channel INT8, INT4 of every CPU group size (K padded to 2G, act-order),
GGUF Q4_0/Q4_1 blocks, grouped INT8; formats without a CPU kernel fall back."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine.quant import cpu_matmul
from llmesh.engine.quant.cpu_matmul import cpu_dense_matmul, cpu_layout, cpu_packed_matmul
from llmesh.engine.quant.linear import linear
from llmesh.engine.quant.packed import Int4Weight, Int8Weight
from llmesh.engine.quant.quantize import quantize_int4, quantize_int8


def _check(x: torch.Tensor, w, tol: float = 1e-2) -> None:
    """bfloat16 activations: within bfloat16 rounding of the exact product; float32: the bits
    of the model dequantized to float32 at load (its dense linear on cpu_layout's storage of
    the same W), and the reference's values within float32 summation order."""
    got = cpu_packed_matmul(x, w)
    assert got is not None, "this format has a CPU path"
    if x.dtype == torch.float32:
        dense = cpu_layout(w.dequantize().t().contiguous())  # [N, K], as a float32 model loads it
        assert torch.equal(got, linear(x, dense, kernels=False, cpu_kernels=True))
        want = linear(x, w, kernels=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        x = x.to(torch.bfloat16)
        got = cpu_packed_matmul(x, w)
    ref = x.float() @ w.dequantize()
    scale = ref.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got.float() / scale, ref / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("m", [1, 3, 17])
def test_int8_per_channel(m):
    gen = torch.Generator().manual_seed(m)
    w = quantize_int8(torch.randn(72, 160, generator=gen))
    _check(torch.randn(m, 160, generator=gen), w)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("k", [256, 200])  # 200: K padded to 2G, the padding rows must add nothing
@pytest.mark.parametrize("m", [1, 5])
def test_int4_groups(group, k, m):
    gen = torch.Generator().manual_seed(group + k + m)
    w = quantize_int4(torch.randn(64, k, generator=gen), group_size=group)
    _check(torch.randn(m, k, generator=gen), w)


def test_int4_act_order():
    gen = torch.Generator().manual_seed(3)
    base = quantize_int4(torch.randn(48, 160, generator=gen), group_size=32)
    w = Int4Weight(base.qweight, base.scales, base.mins, 32, 160, perm=torch.randperm(160, generator=gen))
    _check(torch.randn(4, 160, generator=gen), w)


def test_bfloat16_activations():
    gen = torch.Generator().manual_seed(5)
    w = quantize_int4(torch.randn(64, 256, generator=gen), group_size=64)
    _check(torch.randn(2, 256, generator=gen).to(torch.bfloat16), w)


def test_grouped_int8_is_expanded_once():
    gen = torch.Generator().manual_seed(8)
    base = quantize_int8(torch.randn(40, 64, generator=gen))
    q8_0 = Int8Weight(base.qweight, base.scales.expand(2, -1).contiguous(), 32, "q8_0")  # two groups of 32
    _check(torch.randn(3, 64, generator=gen), q8_0)


def test_formats_without_a_cpu_kernel_fall_back_to_the_reference():
    gen = torch.Generator().manual_seed(7)
    dense = torch.randn(40, 64, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    int4 = quantize_int4(dense, group_size=16)  # below the CPU kernel's smallest group
    assert cpu_packed_matmul(x.to(torch.bfloat16), int4) is None
    torch.testing.assert_close(linear(x, int4, kernels=False, cpu_kernels=True), linear(x, int4, kernels=False))
    assert cpu_packed_matmul(x.half(), quantize_int8(dense)) is None  # float16: no CPU kernel


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_4bit_blocks(qtype):
    from llmesh.engine.quant.gguf_blocks import quantize_rows, rows_to_weight

    gen = torch.Generator().manual_seed(11)
    w = rows_to_weight(quantize_rows(torch.randn(64, 96, generator=gen), qtype), qtype, 96)
    assert isinstance(w, Int4Weight) and w.group_size == 32
    _check(torch.randn(3, 96, generator=gen), w)


def test_expanded_copies_stay_within_their_memory_budget(monkeypatch):
    import llmesh.engine.quant.cpu_matmul as cm

    gen = torch.Generator().manual_seed(12)
    w = quantize_int4(torch.randn(64, 256, generator=gen), group_size=32)
    x = torch.randn(2, 256, generator=gen)
    monkeypatch.setattr(cm, "EXPAND_BUDGET_FRAC", 0.0)  # nothing may be expanded
    assert cpu_packed_matmul(x, w) is None  # float32: the per-step reference instead
    assert torch.equal(linear(x, w, kernels=False, cpu_kernels=True), linear(x, w, kernels=False))
    assert cpu_packed_matmul(x.to(torch.bfloat16), w) is not None  # the int4 kernel expands nothing


# ---- dense float32 / bfloat16 weights ------------------------------------------------------
def test_cpu_layout_keeps_shape_and_values_and_stores_wide_weights_k_major():
    wide, tall = torch.randn(96, 32), torch.randn(32, 96)  # [N, K]: N >= K, and N < K
    got = cpu_layout(wide)
    assert got.shape == wide.shape and torch.equal(got, wide) and got.stride() == (1, 96)
    assert cpu_layout(tall) is tall  # the down projection's shape reads faster as stored
    assert cpu_layout(wide.bfloat16()).stride() == (32, 1)  # bfloat16's one-row GEMV wants [N, K]
    x = torch.randn(1, 32)
    assert torch.equal(torch.nn.functional.linear(x, got), x @ got.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5, 40])
def test_cpu_dense_matmul_from_two_rows_equals_f_linear(dtype, m):
    gen = torch.Generator().manual_seed(m)
    w = cpu_layout(torch.randn(200, 72, generator=gen)).to(dtype)
    bias = torch.randn(200, generator=gen).to(dtype)
    x = torch.randn(m, 72, generator=gen).to(dtype)
    got = cpu_dense_matmul(x, w, bias)
    if m == 1:
        assert got is None  # one row: MKL's GEMV on the stored layout (F.linear)
        return
    assert got is not None and got.dtype == dtype and got.shape == (m, 200)
    exact = x.double() @ w.double().t() + bias.double()
    scale = exact.abs().max().item()
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # float32 summation order; one bfloat16 rounding
    torch.testing.assert_close(got.double() / scale, exact / scale, rtol=0, atol=tol)
    # Through linear(): the same path the torch op table takes.
    torch.testing.assert_close(linear(x, w, bias, kernels=False, cpu_kernels=True), got, rtol=0, atol=0)


def test_cpu_dense_matmul_follows_a_weight_written_in_place():
    w, x = torch.randn(64, 32), torch.randn(4, 32)
    first = cpu_dense_matmul(x, w)
    with torch.no_grad():
        w.copy_(torch.randn(64, 32))  # a weight reload: the packed copy must not go stale
    torch.testing.assert_close(cpu_dense_matmul(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, torch.nn.functional.linear(x, w))


def test_a_packed_weights_onednn_copy_is_made_once():
    w = quantize_int8(torch.randn(64, 160))
    x = torch.randn(3, 160)
    cpu_packed_matmul(x, w)
    expanded = w.__dict__["_cpu_pack"][torch.float32][1]
    packed = expanded.__dict__["_llmesh_onednn"][torch.float32][1]
    cpu_packed_matmul(x, w)
    assert w.__dict__["_cpu_pack"][torch.float32][1].__dict__["_llmesh_onednn"][torch.float32][1] is packed


# ---- measured choice of GEMM path (calibrate) ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_gemm_path_calibrate_can_choose_computes_the_product(dtype):
    gen = torch.Generator().manual_seed(7)
    w = cpu_layout(torch.randn(256, 96, generator=gen)).to(dtype)
    bias = torch.randn(256, generator=gen).to(dtype)
    for m in (1, 8):
        x = torch.randn(m, 96, generator=gen).to(dtype)
        exact = x.double() @ w.double().t() + bias.double()
        tol = 1e-6 if dtype == torch.float32 else 2 ** -8
        for choice in cpu_matmul.gemm_paths(dtype):
            got = cpu_matmul.run_gemm_path(choice, x, w, bias)
            if choice == "mkl":
                assert got is None  # the caller's F.linear
                continue
            if got is None:  # no oneDNN (or no bfloat16 oneDNN) on this CPU
                continue
            assert got.dtype == dtype and got.shape == (m, 256)
            scale = exact.abs().max().item()
            torch.testing.assert_close(got.double() / scale, exact / scale, rtol=0, atol=tol)


def test_calibrate_times_each_shape_and_row_bucket_and_keeps_only_the_chosen_copies():
    gen = torch.Generator().manual_seed(8)
    f32 = [cpu_layout(torch.randn(320, 64, generator=gen)) for _ in range(3)]
    bf16 = [torch.randn(320, 64, generator=gen).bfloat16() for _ in range(3)]
    tiny = torch.randn(40, 24, generator=gen)
    assert cpu_matmul.calibrate(f32 + bf16 + [tiny]) == {}, "weights that fit in the caches keep the default rule"
    report = cpu_matmul.calibrate(f32 + bf16 + [tiny], min_bytes=0)
    assert set(report) >= {"float32 320x64 m1", "float32 320x64 m8", "bfloat16 320x64 m1", "bfloat16 320x64 m8",
                           "float32 40x24 m1"}
    for key, entry in report.items():
        dtype = torch.float32 if key.startswith("float32") else torch.bfloat16
        assert entry["choice"] in cpu_matmul.gemm_paths(dtype) and entry[entry["choice"]] > 0
        fastest = min(v for k, v in entry.items() if k != "choice")
        default = cpu_matmul._default_choice(dtype, int(key.rpartition("m")[2]))
        # the fastest, or the fixed rule's path when that is within the margin of it
        assert entry[entry["choice"]] == fastest or (
            entry["choice"] == default and entry[default] <= cpu_matmul.CALIBRATE_MARGIN * fastest + 0.1)
    for ws, dtype in ((f32, torch.float32), (bf16, torch.bfloat16)):
        chosen = {report[f"{str(dtype)[6:]} 320x64 m{m}"]["choice"] for m in (1, 8)}
        for m in (1, 8):
            x = torch.randn(m, 64, generator=gen).to(dtype)
            choice = report[f"{str(dtype)[6:]} 320x64 m{m}"]["choice"]
            got = cpu_dense_matmul(x, ws[0])
            if choice == "mkl":
                assert got is None
            else:
                assert torch.equal(got, cpu_matmul.run_gemm_path(choice, x, ws[0], None))
        kept = set(ws[0].__dict__.get("_llmesh_onednn", {}))
        wanted = {torch.float32 if c == "onednn_f32" else dtype for c in chosen if c != "mkl"}
        assert kept == wanted, "a oneDNN copy no choice uses is freed"


def test_a_gemm_resolved_before_calibrate_follows_its_choice():
    # The first call memoizes its oneDNN copy (the default rule from two rows up); calibrating
    # afterwards may choose MKL for the shape, and then the memo must not be used.
    gen = torch.Generator().manual_seed(9)
    # A shape no other test calibrates: the choices are process-wide.
    ws = [cpu_layout(torch.randn(336, 72, generator=gen)) for _ in range(3)]
    x = torch.randn(8, 72, generator=gen)
    before = cpu_dense_matmul(x, ws[0])
    if before is None:
        pytest.skip("no oneDNN linear in this PyTorch build")
    assert cpu_dense_matmul(x, ws[0]) is not None  # the memoized call
    choice = cpu_matmul.calibrate(ws, min_bytes=0)["float32 336x72 m8"]["choice"]
    after = cpu_dense_matmul(x, ws[0])
    assert (after is None) == (choice == "mkl")
    if after is not None:
        torch.testing.assert_close(after, torch.nn.functional.linear(x, ws[0]), rtol=1e-5, atol=1e-5)

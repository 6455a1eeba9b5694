"""W4A8: INT4 weights in E4M3-scaled groups times FP8 activations (packed.W4A8Weight,
quantize.quantize_w4a8, linear.w4a8_matmul_ref). The quantizer's codes are the best its
kernel can reconstruct, the reference computes the kernel's arithmetic, and the weight slices
and fuses like the other formats. FBGEMM's kernel against this reference is in
test_fbgemm_kernels.py (GPU)."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine.model.shard import slice_in_features, slice_out_features
from llmesh.engine.quant.linear import linear, w4a8_matmul_ref
from llmesh.engine.quant.packed import W4A8_ROW_RANGE, W4A8Weight, cat_out_features, w4a8_product
from llmesh.engine.quant.quantize import quantize_w4a8
from llmesh.kernels.fp8_gemm import quantize_fp8_per_token_ref


def _weight(n: int, k: int, seed: int = 0, outlier: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(n, k, generator=gen)
    if outlier:
        w[:, 3] *= 20  # an outlier input channel, as real models have
    return w


@pytest.mark.parametrize("n,k", [(64, 256), (48, 200), (16, 640)])
def test_each_code_is_the_nearest_value_the_kernel_can_reconstruct(n, k):
    """Over all 16 codes of its group, the chosen one's rounded product lies nearest the weight
    (the quantizer accounts for the E4M3 rounding of code * scale)."""
    w = _weight(n, k)
    q = quantize_w4a8(w)
    assert (q.in_features, q.out_features, q.padded_in_features) == (k, n, -(-k // 128) * 128)
    assert q.group_scales.dtype == torch.float8_e4m3fn and q.group_scales.shape == (q.padded_in_features // 128, n)
    codes = q.codes()
    assert codes.min() >= -8 and codes.max() <= 7 and not codes[:, k:].any()  # padding holds code 0
    target = w / q.scales[:, None]                                              # [N, K], what r normalised
    g = q.group_scales.float().repeat_interleave(128, dim=0)[:k].t()           # [N, K]
    every = torch.stack([w4a8_product(torch.full_like(g, c), g) for c in range(-8, 8)])  # [16, N, K]
    best = (every - target).abs().amin(dim=0)
    chosen = (w4a8_product(codes[:, :k], g) - target).abs()
    assert torch.all(chosen <= best + 1e-6)
    torch.testing.assert_close(q.dequantize().t(), w4a8_product(codes[:, :k], g) * q.scales[:, None])


def test_rows_are_quantized_in_slices_with_the_same_result(monkeypatch):
    from llmesh.engine.quant import quantize

    w = _weight(80, 256)
    whole = quantize_w4a8(w)
    monkeypatch.setattr(quantize, "W4A8_ROWS_AT_ONCE", 24)  # 80 rows: three slices and a short one
    sliced = quantize_w4a8(w)
    for a, b in zip((whole.qweight, whole.group_scales.view(torch.uint8), whole.scales),
                    (sliced.qweight, sliced.group_scales.view(torch.uint8), sliced.scales)):
        assert torch.equal(a, b)


def test_scales_keep_every_product_inside_e4m3():
    w = _weight(32, 256)
    q = quantize_w4a8(w)
    assert q.group_scales.float().max() <= W4A8_ROW_RANGE / 7
    assert torch.all((8 * q.group_scales.float()) <= 448)
    # the row's largest weight is reconstructed within one E4M3 step of 392 * r
    rel = ((q.dequantize().t() - w).abs().amax(dim=1) / w.abs().amax(dim=1))
    assert torch.all(rel < 0.1)


def test_error_is_close_to_asymmetric_int4s():
    from llmesh.engine.quant.quantize import quantize_int4

    w = 0.02 * torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    err = (quantize_w4a8(w).dequantize().t() - w).norm() / w.norm()
    int4 = (quantize_int4(w).dequantize().t() - w).norm() / w.norm()
    assert err < 1.25 * int4  # symmetric codes and E4M3 products cost a little over zero points


@pytest.mark.parametrize("m,k", [(1, 256), (5, 200)])
def test_the_reference_is_the_kernels_arithmetic(m, k):
    """FP8 per-token activation codes times e4m3(code * group scale), summed in float32, times
    both scales; linear's torch path and its kernel path on the CPU compute it."""
    w = quantize_w4a8(_weight(64, k, outlier=False))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    rows = quantize_fp8_per_token_ref(x)
    want = (rows.xq.float() * rows.scale[:, None]) @ w.dequantize()
    got = w4a8_matmul_ref(rows, w, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, w, kernels=False), got)
    if torch.cuda.is_available():  # FBGEMM's kernel: its sums round differently (test_fbgemm_kernels.py)
        on_gpu = linear(x.cuda(), w.to("cuda"), kernels=True).float().cpu()
        torch.testing.assert_close(on_gpu, got, rtol=2e-2, atol=2e-2 * got.abs().max().item())
    else:  # through Triton's interpreter: the same bits
        torch.testing.assert_close(linear(x, w, kernels=True), got)
    # and close to the float product: a W4A8 weight is a 4-bit weight
    dense = x @ _weight(64, k, outlier=False).t()
    assert (got - dense).norm() / dense.norm() < 0.15


def test_fused_and_sliced_weights_are_the_parts_they_came_from():
    a, b = quantize_w4a8(_weight(32, 384, seed=1)), quantize_w4a8(_weight(48, 384, seed=2))
    fused = cat_out_features([a, b])
    assert isinstance(fused, W4A8Weight) and fused.out_features == 80
    torch.testing.assert_close(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()], 1))
    torch.testing.assert_close(slice_out_features(fused, 32, 80).dequantize(), b.dequantize())
    part = slice_in_features(a, 128, 384)
    assert part.in_features == 256
    torch.testing.assert_close(part.dequantize(), a.dequantize()[128:])
    with pytest.raises(ValueError, match="group boundary"):
        slice_in_features(a, 64, 384)
    odd = quantize_w4a8(_weight(16, 200))  # K = 200 pads to 256: the last shard keeps the padding
    tail = slice_in_features(odd, 128, 200)
    assert (tail.in_features, tail.padded_in_features) == (72, 128)
    torch.testing.assert_close(tail.dequantize(), odd.dequantize()[128:])


def test_a_shuffled_weight_refuses_to_be_read_here():
    w = quantize_w4a8(_weight(16, 128))
    w.shuffled = True
    with pytest.raises(ValueError, match="shuffled layout"):
        w.codes()
    with pytest.raises(ValueError, match="shuffled layout"):
        slice_out_features(w, 0, 8)
    with pytest.raises(ValueError, match="before they are shuffled"):
        cat_out_features([w, w])

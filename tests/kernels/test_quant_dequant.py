"""The dequantize kernels (the large-batch path: expand, then cuBLAS) match the packed
weights' float32 references, rounded to the target dtype."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.engine.quant.packed import pack_int4  # noqa: E402
from llmesh.engine.quant.quantize import quantize_int8  # noqa: E402
from llmesh.kernels.quant_dequant import dequantize_int4, dequantize_int8  # noqa: E402
from llmesh.kernels.w4a16_gemm import dequantize_int4_ref  # noqa: E402
from llmesh.kernels.w8a16_gemm import dequantize_int8_ref  # noqa: E402


@pytest.mark.parametrize("k,n,g", [(96, 40, 32), (256, 130, 128), (80, 64, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4(device, k, n, g, dtype):
    gen = torch.Generator().manual_seed(k + n + g)
    groups = -(-k // g)
    w = pack_int4(torch.randint(0, 16, (k, n), generator=gen), torch.rand(groups, n, generator=gen) * 0.02,
                  -torch.rand(groups, n, generator=gen) * 0.1, g)
    got = dequantize_int4(w.qweight.to(device), w.scales.to(device), w.mins.to(device), g, k, dtype)
    ref = dequantize_int4_ref(w.qweight, w.scales, w.mins, g, k).to(dtype)
    assert got.shape == (k, n) and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8(device, per_channel, dtype):
    gen = torch.Generator().manual_seed(int(per_channel))
    if per_channel:
        w = quantize_int8(torch.randn(72, 96, generator=gen))
        q, s, g = w.qweight, w.scales, w.group_size
    else:
        q = torch.randint(-127, 128, (96, 72), generator=gen, dtype=torch.int8)
        s, g = (torch.rand(3, 72, generator=gen) * 0.01).half(), 32
    got = dequantize_int8(q.to(device), s.to(device), g, dtype)
    torch.testing.assert_close(got.cpu(), dequantize_int8_ref(q, s, g).to(dtype), rtol=0, atol=0)


def test_rejects_mismatched_tensors(device):
    q = torch.zeros(64, 8, dtype=torch.uint8, device=device)
    s = torch.zeros(3, 8, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_int4(q, s, s, 32, 128, torch.bfloat16)

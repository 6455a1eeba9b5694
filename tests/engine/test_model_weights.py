"""Fused linear weights: parts arriving as separate checkpoint tensors compute what the
separate projections compute, whatever their formats."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine.model.weights import FusedLinear
from llmesh.engine.quant.quantize import QUANTIZERS
from llmesh.engine.quant.linear import linear


def _parts(seed: int, k: int = 64, outs=(48, 16, 16)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, k, generator=g) for n in outs]


def _fused(method: str, parts, order=(2, 0, 1)) -> FusedLinear:
    lin = FusedLinear(parts[0].shape[1], [p.shape[0] for p in parts], False, method,
                      dtype=torch.float32, device=torch.device("cpu"))
    for i in order:  # checkpoint order is arbitrary
        assert lin.weight is None
        lin.load(i, "weight", parts[i])
    return lin


@pytest.mark.parametrize("method", ["none", "int8", "int4"])
def test_fused_equals_separate_projections(method):
    parts = _parts(0)
    lin = _fused(method, parts)
    x = torch.randn(5, parts[0].shape[1])
    q = QUANTIZERS.get(method)
    separate = torch.cat([linear(x, q(p) if q else p, kernels=False) for p in parts], dim=-1)
    torch.testing.assert_close(linear(x, lin.weight, kernels=False), separate, rtol=1e-5, atol=1e-5)
    assert not isinstance(lin.weight, list)


def test_parts_of_different_formats_stay_a_list():
    parts = _parts(1)
    q8, q4 = QUANTIZERS["int8"], QUANTIZERS["int4"]
    lin = FusedLinear(64, [48, 16, 16], False, "keep", dtype=torch.float32, device=torch.device("cpu"))
    for i, w in enumerate((q8(parts[0]), q4(parts[1]), q8(parts[2]))):
        lin.load(i, "weight", w)
    assert isinstance(lin.weight, list) and len(lin.weight) == 3
    assert lin.nbytes() == sum(w.nbytes() for w in lin.weight)


def test_bad_shapes_and_kinds_are_named():
    lin = FusedLinear(64, [48, 16], True, "none", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="expects"):
        lin.load(1, "weight", torch.zeros(48, 64))
    with pytest.raises(ValueError, match="expects"):
        lin.load(0, "bias", torch.zeros(16))
    with pytest.raises(ValueError, match="weight and bias"):
        lin.load(0, "scales", torch.zeros(48))

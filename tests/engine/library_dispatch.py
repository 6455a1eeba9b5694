"""The check both library kernels' dispatch tests make (tinygemm, gemlite): with a measured
table holding one entry for a weight at M = 1, ``linear`` sends one row to the library's
function once, with the right result, and four rows (past the table's M) to our kernels."""

from __future__ import annotations

import torch

from llmesh.engine.quant.linear import linear
from llmesh.kernels import quant_gemm_config


def use_table(monkeypatch, w, entry: list, kind: str = "w4a16") -> None:
    """The dispatch table of this GPU: ``entry`` for w's kind and shape at M = 1, nothing else."""
    from llmesh.kernels.common import cuda_device_tag

    key = f"{kind} {w.out_features}x{w.in_features} m1"
    table = {cuda_device_tag(torch.device("cuda")): {key: entry}}
    monkeypatch.setattr(quant_gemm_config, "load_tuned", lambda: table)


def count_calls(monkeypatch, module, name: str) -> list:
    """The calls made to ``module.name`` from now on (it still runs)."""
    calls: list = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


def check_one_row_dispatch(w, calls: list) -> None:
    k = w.in_features
    x = torch.randn(1, k, device="cuda").bfloat16()
    y = linear(x, w)
    assert len(calls) == 1
    torch.testing.assert_close(y.float(), x.float() @ w.dequantize(), rtol=3e-2, atol=3e-2 * y.abs().max().item())
    linear(torch.randn(4, k, device="cuda").bfloat16(), w)  # M = 4: past the table's M, our kernels
    assert len(calls) == 1

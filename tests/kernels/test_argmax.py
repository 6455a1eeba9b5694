"""The split-row argmax equals torch's argmax: first index on ties, NaN largest."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.argmax import CHUNK, argmax_rows, argmax_rows_ref  # noqa: E402


@pytest.mark.parametrize("n,v,dtype", [
    (1, 1, torch.float32),
    (1, CHUNK - 3, torch.bfloat16),
    (3, 3 * CHUNK + 17, torch.float16),
    (2, 2 * CHUNK, torch.float32),
    (5, 5000, torch.bfloat16),
])
def test_matches_torch_on_random_rows(device, n, v, dtype):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    x = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    got = argmax_rows(x.to(device))
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert torch.equal(got.cpu(), argmax_rows_ref(x))


def test_ties_go_to_the_lowest_index_across_chunks(device):
    v = 3 * CHUNK + 5
    x = torch.zeros(4, v)
    x[0, [CHUNK + 7, 2 * CHUNK + 1, 5]] = 2.0         # tie across chunks: 5 wins
    x[1, [2 * CHUNK + 1, CHUNK + 7]] = 2.0             # later chunk first in the list: CHUNK + 7 wins
    x[2, :] = float("-inf")                            # nothing finite: index 0, as torch
    x[3, [v - 1, v - 2]] = 1.0                         # the last, partial chunk
    got = argmax_rows(x.to(device)).cpu()
    assert got.tolist() == [5, CHUNK + 7, 0, v - 2]
    assert torch.equal(got, argmax_rows_ref(x))


def test_nan_is_the_largest_and_the_first_nan_wins(device):
    v = 2 * CHUNK + 9
    x = torch.randn(3, v, generator=torch.Generator().manual_seed(1))
    x[0, CHUNK + 3] = float("inf")
    x[0, 2 * CHUNK + 4] = float("nan")                 # NaN above +inf
    x[1, [2 * CHUNK + 1, CHUNK + 2]] = float("nan")    # the first NaN
    x[2, 7] = float("inf")
    got = argmax_rows(x.to(device)).cpu()
    assert got.tolist() == [2 * CHUNK + 4, CHUNK + 2, 7]
    assert torch.equal(got, argmax_rows_ref(x))


def test_all_nan_rows_and_nan_before_inf(device):
    v = 2 * CHUNK + 3
    x = torch.randn(2, v, generator=torch.Generator().manual_seed(3))
    x[0, :] = float("nan")                             # every entry NaN: the first
    x[1, 4] = float("nan")                             # NaN in chunk 0 beats +inf in a later chunk
    x[1, CHUNK + 1] = float("inf")
    got = argmax_rows(x.to(device)).cpu()
    assert got.tolist() == [0, 4]
    assert torch.equal(got, argmax_rows_ref(x))


def test_strided_rows_and_bad_inputs(device):
    x = torch.randn(3, 2 * CHUNK, generator=torch.Generator().manual_seed(2))
    view = x.to(device)[:, :CHUNK + 100]  # rows strided, last dim contiguous
    assert torch.equal(argmax_rows(view).cpu(), argmax_rows_ref(x[:, :CHUNK + 100]))
    assert argmax_rows(torch.empty(0, 5, device=device)).shape == (0,)
    with pytest.raises(ValueError, match="at least one column"):
        argmax_rows(torch.empty(2, 0, device=device))
    with pytest.raises(ValueError, match="dtype"):
        argmax_rows(torch.ones(2, 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        argmax_rows(x.to(device).t())

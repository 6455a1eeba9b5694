"""dense_causal_attention (prefill chunks without a cached prefix) matches per-sequence causal
attention on every backend it can dispatch to, and its dispatch rule picks as documented."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels import dense_causal_attention as dca  # noqa: E402
from llmesh.kernels import fa3  # noqa: E402
from llmesh.kernels.dense_causal_attention import dense_causal_attention, dense_causal_attention_ref  # noqa: E402

TOL = {torch.float32: 1e-3 if torch.cuda.is_available() else 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(lengths, h_q, h_kv, d, dtype, seed, pad_rows=0):
    gen = torch.Generator().manual_seed(seed)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    t = starts[-1] + pad_rows
    # q, k, v as views of one fused qkv projection, as the model produces them
    qkv = torch.randn(t, (h_q + 2 * h_kv) * d, generator=gen).to(dtype)
    q = qkv[:, :h_q * d].view(t, h_q, d)
    k = qkv[:, h_q * d:(h_q + h_kv) * d].view(t, h_kv, d)
    v = qkv[:, (h_q + h_kv) * d:].view(t, h_kv, d)
    return q, k, v, starts


def _fa4_here() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and dca.fa4_forward() is not None)


BACKENDS = (["triton"] + (["cudnn", "flash"] if torch.cuda.is_available() else []) + (["fa4"] if _fa4_here() else [])
            + (["fa3", "fa3_batched"] if fa3.fa3_runs_here() else []))


def _skip_unsupported(backend, dtype):
    if backend.startswith("fa3") and dtype != torch.bfloat16:
        pytest.skip("the fa3-fwd build has bfloat16 kernels only")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,h_q,h_kv,d,dtype", [
    ([1, 17, 40], 8, 2, 64, torch.bfloat16),  # unequal lengths: one call per sequence
    ([24, 24], 4, 4, 64, torch.float16),  # equal lengths: one batched call
    ([33], 8, 1, 128, torch.bfloat16),
    ([1, 1, 1], 8, 2, 64, torch.bfloat16),  # one-token sequences: cuDNN refuses key length 1
])
def test_matches_reference(device, backend, lengths, h_q, h_kv, d, dtype):
    _skip_unsupported(backend, dtype)
    q, k, v, starts = _inputs(lengths, h_q, h_kv, d, dtype, seed=sum(lengths) + h_q, pad_rows=3)
    ref = dense_causal_attention_ref(q, k, v, starts, d ** -0.5)
    out = torch.full_like(q, float("nan"), device=device)
    got = dense_causal_attention(q.to(device), k.to(device), v.to(device), starts, d ** -0.5, out=out,
                                 backend=backend).cpu()
    real = starts[-1]
    torch.testing.assert_close(got[:real].float(), ref[:real].float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.isnan(got[real:]).all()  # rows no sequence owns are not written


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,h_q,h_kv", [([24, 24, 24], 8, 2), ([40], 4, 4)])
def test_without_out_equal_lengths_return_the_library_output(device, backend, lengths, h_q, h_kv):
    # No `out` and every row owned: the SDPA backends return their own output (no copy); it
    # must still be [T, H_q, D] in row order and equal the reference.
    q, k, v, starts = _inputs(lengths, h_q, h_kv, 64, torch.bfloat16, seed=len(lengths) + h_q)
    got = dense_causal_attention(q.to(device), k.to(device), v.to(device), starts, 0.125, backend=backend)
    assert got.shape == q.shape
    torch.testing.assert_close(got.cpu().float(), dense_causal_attention_ref(q, k, v, starts, 0.125).float(),
                               rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_offsets_give_the_same_output(device, backend):
    """The engine hands its int32 query_start_loc (on q's device) beside the host list; the
    output is the one the host list alone gives."""
    q, k, v, starts = _inputs([3, 50, 21], 8, 2, 64, torch.bfloat16, seed=9)
    q, k, v = q.to(device), k.to(device), v.to(device)
    want = dense_causal_attention(q, k, v, starts, 0.125, backend=backend)
    cu = torch.tensor(starts, dtype=torch.int32, device=device)
    got = dense_causal_attention(q, k, v, starts, 0.125, backend=backend, cu_seqlens=cu)
    assert torch.equal(got, want)


def test_fa3_is_loaded_or_says_why_not():
    assert (fa3.fa3_forward() is None) == (fa3.fa3_unavailable_reason() is not None)


def test_fa3_forced_where_it_cannot_run_says_why():
    q, k, v, starts = _inputs([8, 8], 4, 2, 64, torch.float16, seed=2)  # fp16: no FA3 kernels, on any device
    q, k, v = (x.cuda() for x in (q, k, v)) if torch.cuda.is_available() else (q, k, v)
    for backend in ("fa3", "fa3_batched"):
        with pytest.raises(ValueError, match=f"'{backend}'.*fa3-fwd"):
            dense_causal_attention(q, k, v, starts, 0.1, backend=backend)


def test_triton_path_float32(device):
    q, k, v, starts = _inputs([5, 30], 6, 2, 80, torch.float32, seed=4)
    got = dense_causal_attention(q.to(device), k.to(device), v.to(device), starts, 0.1)  # auto: Triton here
    torch.testing.assert_close(got.cpu(), dense_causal_attention_ref(q, k, v, starts, 0.1),
                               rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_dispatch_rule(monkeypatch):
    """The cuDNN rule, on a device without a measured table."""
    monkeypatch.setattr(dca, "DENSE_CAUSAL_BACKEND", {})
    cpu_q = torch.zeros(4, 8, 128, dtype=torch.bfloat16)
    assert dca.choose_backend(cpu_q, 4, [4096]) == "triton"  # no CUDA, no cuDNN
    if torch.cuda.is_available() and dca.cudnn_usable(cpu_q.cuda(), 4):  # FA4 (forced only) never chosen
        q = cpu_q.cuda()
        assert dca.choose_backend(q, 4, [2048, 2048]) == "cudnn"
        assert dca.choose_backend(q, 4, [100, 200]) == "triton"  # too few tokens
        assert dca.choose_backend(q, 4, [64 + i for i in range(dca.CUDNN_MAX_CALLS + 1)]) == "triton"
        assert dca.choose_backend(q.float(), 4, [4096]) == "triton"


def test_measured_table_by_mean_prompt_length(monkeypatch):
    """DENSE_CAUSAL_BACKEND's bucket of the batch's mean length decides where it has an entry:
    "triton" always runs, "fa3" and "fa3_batched" where FA3 can, anything else falls to the cuDNN
    rule; a CPU never reads the table."""
    from llmesh.kernels.common import bucket_entry

    table = {512: "triton", 1024: "fa3_batched", 2048: "fa3", 8192: "cudnn"}
    assert [bucket_entry(table, n) for n in (1, 512, 513, 1025, 4096, 100_000)] == [
        "triton", "triton", "fa3_batched", "fa3", "cudnn", "cudnn"]
    cpu_q = torch.zeros(4, 8, 128, dtype=torch.bfloat16)
    monkeypatch.setitem(dca.DENSE_CAUSAL_BACKEND, "cpu", table)
    assert dca.choose_backend(cpu_q, 4, [1024, 1024]) == "triton"
    if not torch.cuda.is_available():
        return
    from llmesh.kernels.common import cuda_device_tag

    q = cpu_q.cuda()
    monkeypatch.setitem(dca.DENSE_CAUSAL_BACKEND, cuda_device_tag(q.device), table)
    assert dca.choose_backend(q, 4, [300, 400]) == "triton"  # mean 350
    want_fa3 = "fa3" if fa3.fa3_usable(q, 4) else ("cudnn" if dca.cudnn_usable(q, 4) else "triton")
    assert dca.choose_backend(q, 4, [1000, 1400]) == want_fa3
    assert dca.choose_backend(q, 4, [1024, 1024]) == ("fa3_batched" if want_fa3 == "fa3" else want_fa3)
    assert dca.choose_backend(q, 4, [4096] * 4) == ("cudnn" if dca.cudnn_usable(q, 4) else "triton")
    assert dca.choose_backend(q, 4, [100, 200]) == "triton"  # too few tokens for any library


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN SDPA needs a CUDA device")
def test_one_token_sequence_keeps_cudnn(monkeypatch):
    """A one-token prompt in a batch cuDNN takes does not make auto mode give cuDNN up for the shape
    (cuDNN refuses key length 1; that sequence's output is its value, computed aside)."""
    monkeypatch.setattr(dca, "DENSE_CAUSAL_BACKEND", {})  # the cuDNN rule
    q, k, v, starts = _inputs([1, 2047], 8, 2, 64, torch.bfloat16, seed=7)
    if not dca.cudnn_usable(q.cuda(), 4):
        pytest.skip("this torch has no cuDNN SDPA for these shapes")
    dca._refusals.clear()
    got = dense_causal_attention(q.cuda(), k.cuda(), v.cuda(), starts, 0.125).cpu()
    torch.testing.assert_close(got.float(), dense_causal_attention_ref(q, k, v, starts, 0.125).float(),
                               rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
    assert dca.choose_backend(q.cuda(), 4, [1, 2047]) == "cudnn" and not dca._refusals


def test_rejects_bad_inputs(device):
    q, k, v, starts = _inputs([4, 4], 4, 2, 64, torch.float32, seed=1)
    q, k, v = q.to(device), k.to(device), v.to(device)
    with pytest.raises(ValueError, match="query_start_loc"):
        dense_causal_attention(q, k, v, [0, 5, 3], 0.1)
    with pytest.raises(ValueError, match="backend"):
        dense_causal_attention(q, k, v, starts, 0.1, backend="xformers")
    with pytest.raises(ValueError, match="cu_seqlens"):
        dense_causal_attention(q, k, v, starts, 0.1, cu_seqlens=torch.tensor(starts, device=device))  # int64
    with pytest.raises(ValueError, match="cu_seqlens"):
        dense_causal_attention(q, k, v, starts, 0.1, cu_seqlens=torch.tensor(starts[:2], dtype=torch.int32,
                                                                             device=device))
    with pytest.raises(ValueError, match="k has T=7"):
        dense_causal_attention(q, k[:7], v[:7], starts, 0.1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            dense_causal_attention(q, k, v, starts, 0.1, backend="cudnn")

"""The Triton W4A16 GEMM matches its torch reference on Int4Weight's layout (pack_int4), with
and without split-K, with padded K, and rejects malformed arguments; pick_config's table."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.engine.quant.packed import GGUF_GROUP, pack_int4  # noqa: E402
from llmesh.kernels.common import arrival_counters  # noqa: E402
from llmesh.kernels.quant_gemm_config import H100_SMS, GemmConfig, pick_config  # noqa: E402
from llmesh.kernels import w4a16_gemm as w4a16_module  # noqa: E402
from llmesh.kernels.w4a16_gemm import dequantize_int4_ref, w4a16_gemm, w4a16_gemm_ref  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}  # 16-bit: an ulp or so at |y| ~ 1
CUDA = torch.cuda.is_available()


def _weight(k, n, g, gen, q4_1=False):
    """Random codes with GGUF-like scales: mins = -8 * scale (Q4_0, symmetric) or free (Q4_1)."""
    q = torch.randint(0, 16, (k, n), generator=gen)
    groups = -(-k // g)
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.005
    mins = -torch.rand(groups, n, generator=gen) * 0.15 if q4_1 else -8 * scales
    return pack_int4(q, scales, mins, g, fmt="q4_1" if q4_1 else "int4")


def _run(w, x, device, **kw):
    return w4a16_gemm(x.to(device), w.qweight.to(device), w.scales.to(device), w.mins.to(device), w.group_size, **kw)


def _close(got, ref, dtype):
    assert got.dtype == ref.dtype == dtype
    torch.testing.assert_close(got.cpu().float(), ref.cpu().float(), rtol=TOL[dtype], atol=TOL[dtype])


CASES = [  # (M, N, K, G); K = 96 pads to Kp = 128 (for G = 32 and G = 64)
    (1, 32, 64, 32),
    (3, 80, 96, 32),
    (17, 80, 256, 64),
    (3, 32, 96, 64),
    (1, 80, 256, 128),
    (3, 32, 80, 48),  # a group size that is not a power of two (BLOCK_K = 16)
]


@pytest.mark.parametrize("m,n,k,g", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference(device, m, n, k, g, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k + g)
    w = _weight(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    _close(_run(w, x, device), w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, g), dtype)


@pytest.mark.parametrize("m,n,k,g", CASES[:4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_tiles_dequantize_first(device, m, n, k, g, dtype):
    """Prefill-sized tiles (block_m 64, several warps) match the reference as the decode tiles do."""
    gen = torch.Generator().manual_seed(m * 7 + n + k + g)
    w = _weight(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    cfg = GemmConfig(64, 32, min(32, g & -g), 1, 4, 1)
    _close(_run(w, x, device, config=cfg), w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, g), dtype)


WORD_CASES = [  # (M, N, K, G, split_k): N / 4 words in tiles of 16 (block_n 64)
    (1, 64, 64, 32, 1),
    (3, 80, 96, 32, 2),      # 20 words: the second tile ragged; Kp = 128 in 2 splits
    (17, 128, 256, 64, 3),   # two M tiles, two column tiles, 3 splits
    (2, 68, 130, 64, 1),     # padded K (Kp = 256), 17 words
]


@pytest.mark.parametrize("m,n,k,g,split", WORD_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_words_match_reference(device, m, n, k, g, split, dtype, monkeypatch, forbid):
    """The int32-word kernel (codes moved into a float's mantissa, four dots a tile) matches
    the reference as the byte kernel does."""
    gen = torch.Generator().manual_seed(m * 31 + n + k + g)
    w = _weight(k, n, g, gen, q4_1=True)
    x = torch.randn(m, k, generator=gen).to(dtype)
    cfg = GemmConfig(16, 64, min(32, g & -g), split, 1, 1, words=True)
    ref = w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, g)
    with monkeypatch.context() as patch:
        forbid(w4a16_module, "_w4a16_kernel", patch)
        _close(_run(w, x, device, config=cfg), ref, dtype)
    _close(_run(w, x, device, config=GemmConfig(16, 32, min(32, g & -g), split, 1, 1)), ref, dtype)
    w_odd = _weight(k, 33, g, gen)  # no whole words: the byte kernel runs
    _close(_run(w_odd, x, device, config=cfg), w4a16_gemm_ref(x, w_odd.qweight, w_odd.scales, w_odd.mins, g), dtype)


def test_float16_and_out(device):
    gen = torch.Generator().manual_seed(5)
    w = _weight(96, 80, 32, gen)
    x = torch.randn(3, 96, generator=gen).half()
    out = torch.full((3, 80), float("nan"), dtype=torch.float16, device=device)
    got = _run(w, x, device, out=out)
    assert got is out
    _close(got, w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, 32), torch.float16)


def test_reference_is_the_layout():
    gen = torch.Generator().manual_seed(1)
    w = _weight(96, 32, 32, gen, q4_1=True)
    assert torch.equal(dequantize_int4_ref(w.qweight, w.scales, w.mins, 32, 96), w.dequantize())
    x = torch.randn(4, 96, generator=gen).bfloat16()
    assert torch.equal(w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, 32),
                       (x.float() @ w.dequantize().bfloat16().float()).bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_k_matches_single_pass(device, dtype):
    gen = torch.Generator().manual_seed(2)
    w = _weight(256, 80, 32, gen)
    x = torch.randn(3, 256, generator=gen).to(dtype)
    one = _run(w, x, device, config=GemmConfig(16, 32, 16, 1, 1, 1))
    split = _run(w, x, device, config=GemmConfig(16, 32, 16, 3, 1, 1))
    again = _run(w, x, device, config=GemmConfig(16, 32, 16, 3, 1, 1))
    _close(split, one, dtype)
    assert torch.equal(split, again)  # partials summed in split order: a split-K result is reproducible
    assert not arrival_counters("w4a16_gemm", torch.device(device), 1 << 10).any()  # each tile's last split reset its own
    _close(split, w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, 32), dtype)
    many = _run(w, x, device, config=GemmConfig(16, 32, 16, 64, 1, 1))  # more splits than tiles
    _close(many, one, dtype)


@pytest.mark.parametrize("k,g", [(96, 32), (40, 16), (130, 64)])
def test_padded_k_never_reads_past_k(device, k, g):
    gen = torch.Generator().manual_seed(k + g)
    w = _weight(k, 32, g, gen)
    assert w.padded_in_features > k
    x = torch.randn(5, k, generator=gen)
    wide = torch.full((5, w.padded_in_features + 8), float("nan"))
    wide[:, :k] = x
    got = _run(w, wide[:, :k], device)  # strided rows; columns >= K are NaN
    _close(got, w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, g), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gguf_q4_1_group_32(device, dtype):
    gen = torch.Generator().manual_seed(32)
    w = _weight(256, 80, GGUF_GROUP, gen, q4_1=True)
    x = torch.randn(17, 256, generator=gen).to(dtype)
    ref = (x.float() @ w.dequantize().to(dtype).float()).to(dtype)
    _close(_run(w, x, device), ref, dtype)
    _close(_run(w, x, device, config=GemmConfig(16, 32, 32, 2, 1, 1)), ref, dtype)


def test_empty_batch(device):
    w = _weight(64, 32, 32, torch.Generator().manual_seed(0))
    assert _run(w, torch.empty(0, 64), device).shape == (0, 32)


def test_rejects_bad_inputs(device):
    gen = torch.Generator().manual_seed(3)
    w = _weight(256, 32, 32, gen)
    q, s, mn = w.qweight.to(device), w.scales.to(device), w.mins.to(device)
    x = torch.randn(2, 256, device=device)
    with pytest.raises(ValueError, match="x has K=100"):
        w4a16_gemm(torch.randn(2, 100, device=device), q, s, mn, 32)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 16"):
        w4a16_gemm(x, q, s, mn, 24)
    with pytest.raises(ValueError, match="Kp=256, which is not a multiple"):
        w4a16_gemm(x, q, s[:2], mn[:2], 256)
    with pytest.raises(ValueError, match="scales has rows=4"):
        w4a16_gemm(x, q, s[:4], mn, 32)
    with pytest.raises(ValueError, match="mins has N=16"):
        w4a16_gemm(x, q, s, mn[:, :16], 32)
    with pytest.raises(ValueError, match="qweight must have dtype in \\(uint8\\)"):
        w4a16_gemm(x, q.to(torch.int8), s, mn, 32)
    with pytest.raises(ValueError, match="scales must have dtype in \\(float16\\)"):
        w4a16_gemm(x, q, s.float(), mn, 32)
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        w4a16_gemm(x, torch.cat([q, q], 1)[:, ::2], s, mn, 32)
    with pytest.raises(ValueError, match="config.block_k=64 must divide group_size=32"):
        w4a16_gemm(x, q, s, mn, 32, config=GemmConfig(16, 32, 64, 1, 1, 1))
    with pytest.raises(ValueError, match="config.block_m must be a power of two >= 16"):
        w4a16_gemm(x, q, s, mn, 32, config=GemmConfig(8, 32, 32, 1, 1, 1))
    with pytest.raises(ValueError, match="out must have shape"):
        w4a16_gemm(x, q, s, mn, 32, out=torch.empty(2, 31, device=device))


@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (6144, 4096)])
def test_pick_config_h100_table(monkeypatch, n, k):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU table, not the interpreter's
    for g in (32, 128):
        decode = pick_config("w4a16", 1, n, k, g)
        assert decode.block_m == 16 and decode.num_stages >= 3 and g % decode.block_k == 0 and decode.words
        programs = -(-n // decode.block_n) * decode.split_k
        assert programs >= 2 * H100_SMS * 0.9
        big = pick_config("w4a16", 4096, n, k, g)
        assert big.block_m >= 64 and big.split_k == 1 and g % big.block_k == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pick_config("w4a16", 1, n, k, 32).block_n <= 32


@pytest.mark.skipif(not CUDA, reason="Llama-sized shapes only on a GPU")
@pytest.mark.parametrize("m", [1, 16, 100])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
def test_llama_shapes_cuda(m, n, k):
    gen = torch.Generator().manual_seed(m)
    w = _weight(k, n, 128, gen).to("cuda")
    x = torch.randn(m, k, generator=gen).bfloat16().cuda()
    got = w4a16_gemm(x, w.qweight, w.scales, w.mins, 128)
    ref = w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, 128)
    scale = ref.float().abs().max()
    torch.testing.assert_close(got.float() / scale, ref.float() / scale, rtol=0, atol=1e-2)

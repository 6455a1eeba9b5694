"""The decode GEMV (quant_gemv.py) matches the W4A16 / W8A16 torch references on random
packed weights: M = 1, 3, 16, split-K with K not a multiple of the split, padded K, grouped
and per-channel INT8; repeated split launches reuse the arrival counters correctly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.engine.quant.packed import pack_int4  # noqa: E402
from llmesh.kernels import quant_gemv  # noqa: E402
from llmesh.kernels.quant_gemv import GemvConfig, w4a16_gemv, w8a16_gemv  # noqa: E402
from llmesh.kernels.quant_ref import w4a16_gemm_ref, w8a16_gemm_ref  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 3e-3}


def _int4(k, n, g, gen):
    q = torch.randint(0, 16, (k, n), generator=gen)
    groups = -(-k // g)
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.005
    mins = -torch.rand(groups, n, generator=gen) * 0.15
    return pack_int4(q, scales, mins, g)


def _int8(k, n, g, gen):
    q = torch.randint(-127, 128, (k, n), generator=gen, dtype=torch.int8)
    scales = torch.rand(k // g, n, generator=gen) * 0.01 + 0.001
    return q, scales


def _close(got, ref):
    """An ulp or so of the output's magnitude: the GEMV does not round W to x's dtype as the
    reference does, and 16-bit outputs of |y| ~ 10 differ by 2^-8 * 8 at a rounding boundary."""
    assert got.dtype == ref.dtype
    tol = TOL[ref.dtype]
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.cpu().float(), ref.cpu().float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,g,cfg", [
    (48, 64, 32, GemvConfig(16, 32, 1, 1, 1)),       # one split
    (40, 96, 32, GemvConfig(16, 16, 3, 1, 1)),       # Kp = 128: 64 byte rows = 4 tiles in 3 splits (2+2)
    (33, 320, 32, GemvConfig(32, 16, 4, 1, 1)),      # 192 byte rows = 12 tiles in 4 splits; ragged N
    (64, 256, 64, GemvConfig(16, 32, 3, 1, 1)),      # 128 byte rows = 4 tiles in 3 splits (2+2)
    (36, 128, 32, GemvConfig(16, 16, 2, 1, 1)),      # words: 9 words in tiles of 4, the last ragged
])
@pytest.mark.parametrize("words", [False, True], ids=["bytes", "words"])
def test_w4a16_gemv_matches_reference(device, m, dtype, n, k, g, cfg, words, forbid):
    """words=True with N = 33 falls back to the byte kernel (no whole words)."""
    cfg = dataclasses.replace(cfg, words=words)
    if words and n % 4 == 0:
        forbid(quant_gemv, "_w4a16_gemv_kernel")
    gen = torch.Generator().manual_seed(m * 1000 + k)
    w = _int4(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    got = w4a16_gemv(x.to(device), w.qweight.to(device), w.scales.to(device), w.mins.to(device), g, config=cfg)
    _close(got, w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, g))


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,g,cfg", [
    (96, 96, GemvConfig(16, 64, 1, 1, 1)),    # per channel, K not a multiple of block_k
    (200, 200, GemvConfig(16, 32, 3, 1, 1)),  # per channel: 7 tiles in 3 splits (3+3+1), last one ragged
    (256, 32, GemvConfig(16, 32, 3, 1, 1)),   # GGUF Q8_0 groups: 8 tiles in 3 splits
])
@pytest.mark.parametrize("words", [False, True], ids=["bytes", "words"])
def test_w8a16_gemv_matches_reference(device, m, dtype, k, g, cfg, words, forbid):
    cfg = dataclasses.replace(cfg, words=words)
    if words:
        forbid(quant_gemv, "_w8a16_gemv_kernel")
    gen = torch.Generator().manual_seed(m * 7 + k)
    n = 40  # words: 10 a row, tiles of 4 words, the last ragged
    q, s = _int8(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    got = w8a16_gemv(x.to(device), q.to(device), s.to(device), g, config=cfg)
    _close(got, w8a16_gemm_ref(x, q, s, g))


@pytest.mark.parametrize("words", [False, True], ids=["bytes", "words"])
def test_split_launches_in_a_row_reuse_the_counters(device, words, forbid):
    """Each split launch leaves its tiles' counters at zero; a stale counter would make the
    wrong split write y (a partial sum) on the next launch."""
    gen = torch.Generator().manual_seed(5)
    w = _int4(128, 64, 32, gen)
    cfg = GemvConfig(16, 16, 4, 1, 1, words)
    if words:
        forbid(quant_gemv, "_w4a16_gemv_kernel")
    args = [t.to(device) for t in (w.qweight, w.scales, w.mins)]
    for i in range(3):
        x = torch.randn(2, 128, generator=gen)
        _close(w4a16_gemv(x.to(device), *args, 32, config=cfg), w4a16_gemm_ref(x, w.qweight, w.scales, w.mins, 32))


def test_rejects_more_than_16_rows_and_bad_configs(device):
    gen = torch.Generator().manual_seed(0)
    w = _int4(64, 16, 32, gen)
    args = [t.to(device) for t in (w.qweight, w.scales, w.mins)]
    with pytest.raises(ValueError, match="at most 16 rows"):
        w4a16_gemv(torch.randn(17, 64, device=device), *args, 32)
    with pytest.raises(ValueError, match="divide group_size"):
        w4a16_gemv(torch.randn(1, 64, device=device), *args, 32, config=GemvConfig(16, 64, 1, 1, 1))


def test_dispatch_table_lookup_takes_the_nearest_measured_batch_at_or_above_m():
    from llmesh.kernels.quant_gemm_config import load_tuned, lookup, table_key

    table = {table_key("w4a16", 14336, 4096, 1): ["gemv", [64, 64, 4, 4, 3]],
             table_key("w4a16", 14336, 4096, 16): ["dot", [16, 64, 128, 8, 4, 3]],
             table_key("fp8", 14336, 4096, 256): ["scaled_mm", []]}
    assert lookup(table, "w4a16", 1, 14336, 4096) == ("gemv", (64, 64, 4, 4, 3))
    assert lookup(table, "w4a16", 3, 14336, 4096) == ("dot", (16, 64, 128, 8, 4, 3))
    assert lookup(table, "w4a16", 64, 14336, 4096) is None  # past the largest measured M: the default path
    assert lookup(table, "fp8", 200, 14336, 4096) == ("scaled_mm", ())
    assert lookup(table, "fp8", 2048, 14336, 4096) is None
    assert lookup(table, "w8a16", 1, 14336, 4096) is None and lookup(table, "w4a16", 1, 4096, 4096) is None
    with pytest.raises(ValueError, match="unknown kernel"):
        lookup({table_key("w4a16", 8, 8, 1): ["magic", []]}, "w4a16", 1, 8, 8)
    assert isinstance(load_tuned(), dict)  # the shipped file parses


def test_words_read_a_sliced_weight_and_fall_back_where_words_do_not_line_up(device):
    """A qweight view starting at an odd column is not word-aligned: the byte kernel runs."""
    gen = torch.Generator().manual_seed(9)
    w = _int4(64, 68, 32, gen)
    x = torch.randn(2, 64, generator=gen)
    cfg = GemvConfig(16, 16, 2, 1, 1, True)
    for cols in (slice(4, 68), slice(1, 65)):
        q, s, mn = (t[:, cols] for t in (w.qweight, w.scales, w.mins))
        got = w4a16_gemv(x.to(device), q.to(device), s.to(device), mn.to(device), 32, config=cfg)
        _close(got, w4a16_gemm_ref(x, q, s, mn, 32))


def test_as_words_never_raises_on_odd_storage():
    """A weight whose storage or view starts off a 4-byte boundary has no int32 view: as_words
    says so (None, the byte kernels run) rather than raising from view()."""
    from llmesh.kernels.int_words import as_words

    for base in range(4):
        raw = torch.frombuffer(bytearray(base + 4 + 8 * 64), dtype=torch.uint8, offset=base)
        for start in range(4):
            t = raw[start:start + 8 * 64].view(8, 64)
            words = as_words(t)
            if words is not None:
                assert words.shape == (8, 16) and torch.equal(words.view(torch.uint8), t)

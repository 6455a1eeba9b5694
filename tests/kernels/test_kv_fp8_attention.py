"""FP8 KV pool, read side: every attention kernel that reads the paged pool (decode, prefill,
unified) dequantizes on load. Against the torch reference over the same FP8 pool they agree as
tightly as on a float pool; against attention over the unquantized K/V within E4M3's error."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.common import INTERPRET_FP16_DOTS  # noqa: E402
from llmesh.kernels.fp8_gemm import fp8_support  # noqa: E402
from llmesh.kernels.kv_quant_ref import KV_FP8_DTYPE, KV_SCALE_DTYPE  # noqa: E402
from llmesh.kernels.paged_attention import write_kv_ref  # noqa: E402
from llmesh.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from llmesh.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from llmesh.kernels.unified_attention import unified_attention, unified_attention_ref  # noqa: E402

_NO_FP8 = fp8_support("cuda") if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(_NO_FP8 is not None, reason=f"FP8 KV pool: {_NO_FP8}")

# Kernel vs the float32 reference over the same FP8 pool (dequantized exactly): summation order
# for float32 (more room for a GPU's dot units and exp2), one rounding of the output and of the
# probabilities for 16-bit q (rtol and atol).
TIGHT = {torch.float32: 1e-3 if torch.cuda.is_available() else 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# FP8 pool vs the unquantized K/V, as the relative RMS error of the outputs: E4M3 rounds each
# value by up to 2^-4 relative (about 2.5% RMS), which moves the scores and the weighted means
# of V by about as much (measured 0.027-0.052 on these inputs; a missing scale is off by 2^k).
FP8_VS_FULL = 0.08


E4M3_NAN = 0x7F
"""The E4M3 byte of a NaN: what the kernels' copy of a pool holds in every slot no context owns."""


class Fp8Pool:
    """Random contexts written into an FP8 pool (with scales) and into a float32 pool, through
    shuffled block tables. The references read `k8`, `v8` (zeros in unowned slots, as they gather
    whole tables and mask afterwards); `fp8()` gives the kernels a copy with NaN codes and
    non-zero scales there, so a kernel that reads past a context poisons its output."""

    def __init__(self, ctx_lens, h_kv, d, block_size, gen, value_std=None):
        need = [-(-n // block_size) for n in ctx_lens]
        num_blocks = sum(need) + 2
        order = torch.randperm(num_blocks, generator=gen).tolist()
        width = max(need) + 1
        self.k8 = torch.zeros(num_blocks, block_size, h_kv, d, dtype=KV_FP8_DTYPE)
        self.v8 = torch.zeros_like(self.k8)
        self.ks = torch.zeros(num_blocks, block_size, h_kv, dtype=KV_SCALE_DTYPE)
        self.vs = torch.zeros_like(self.ks)
        self.kf = torch.zeros(num_blocks, block_size, h_kv, d)
        self.vf = torch.zeros_like(self.kf)
        self.owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        tables = []
        # Heads of different magnitudes, as real K (a few heads with large norms) has.
        mag = torch.logspace(-0.5, 0.5, h_kv)[None, :, None]
        for n, nb in zip(ctx_lens, need):
            blocks = [order.pop() for _ in range(nb)]
            tables.append(blocks + [0] * (width - nb))
            slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(n)])
            self.owned.view(-1)[slots] = True
            k = torch.randn(n, h_kv, d, generator=gen) * mag
            v = torch.randn(n, h_kv, d, generator=gen) * (mag if value_std is None else value_std)
            write_kv_ref(self.k8, self.v8, k, v, slots, self.ks, self.vs)
            write_kv_ref(self.kf, self.vf, k, v, slots)
        self.tables = torch.tensor(tables, dtype=torch.int32)
        self.lens = torch.tensor(ctx_lens, dtype=torch.int32)

    def fp8(self, device):
        """(k_cache, v_cache, k_scales, v_scales) on `device`, unowned slots poisoned."""
        free = ~self.owned
        out = []
        for cache in (self.k8, self.v8):
            raw = cache.view(torch.uint8).clone()
            raw[free] = E4M3_NAN
            out.append(raw.view(KV_FP8_DTYPE).to(device))
        for scales in (self.ks, self.vs):
            out.append(scales.masked_fill(free[:, :, None], 127).to(device))  # scale 1
        return out


def _assert_tight(got, want, dtype):
    torch.testing.assert_close(got.float().cpu(), want, rtol=TIGHT[dtype], atol=TIGHT[dtype])


def _assert_near_full(got, want, what):
    err = ((got.float().cpu() - want).norm() / want.norm()).item()
    assert err <= FP8_VS_FULL, f"{what}: relative RMS error {err:.3g} > {FP8_VS_FULL}"


@pytest.mark.parametrize("h_q,h_kv,d,block_size,dtype,partition", [
    (4, 2, 64, 16, torch.float32, 512),
    (8, 2, 128, 16, torch.bfloat16, 32),  # split into partitions
    (6, 3, 32, 8, torch.float16, 512),
])
def test_decode(device, h_q, h_kv, d, block_size, dtype, partition):
    gen = torch.Generator().manual_seed(h_q * 10 + d)
    pool = Fp8Pool([1, 37, 100], h_kv, d, block_size, gen)
    q = torch.randn(3, h_q, d, generator=gen).to(dtype)
    scale = d ** -0.5
    k8, v8, ks, vs = pool.fp8(device)
    got = paged_decode_attention(q.to(device), k8, v8, pool.tables.to(device), pool.lens.to(device), scale,
                                 partition_size=partition, k_scales=ks, v_scales=vs)
    ref = paged_decode_attention_ref(q.float(), pool.k8, pool.v8, pool.tables, pool.lens, scale, pool.ks, pool.vs)
    _assert_tight(got, ref, dtype)
    full = paged_decode_attention_ref(q.float(), pool.kf, pool.vf, pool.tables, pool.lens, scale)
    _assert_near_full(got, full, "decode vs unquantized")


def _varlen(seqs, h_q, d, dtype, gen):
    """seqs: (new tokens, context) pairs → q [T, H_q, D], query_start_loc [S + 1]."""
    qsl = [0]
    for n_new, _ in seqs:
        qsl.append(qsl[-1] + n_new)
    return torch.randn(qsl[-1], h_q, d, generator=gen).to(dtype), torch.tensor(qsl, dtype=torch.int32)


@pytest.mark.parametrize("h_q,h_kv,d,dtype", [(4, 2, 64, torch.float32), (8, 1, 128, torch.bfloat16)])
def test_prefill(device, h_q, h_kv, d, dtype):
    gen = torch.Generator().manual_seed(d + h_q)
    seqs = [(20, 20), (7, 40), (1, 9)]  # a fresh prompt, an extend after a cached prefix, a decode
    pool = Fp8Pool([c for _, c in seqs], h_kv, d, 16, gen)
    q, qsl = _varlen(seqs, h_q, d, dtype, gen)
    scale = d ** -0.5
    k8, v8, ks, vs = pool.fp8(device)
    got = prefill_attention(q.to(device), k8, v8, pool.tables.to(device), qsl.to(device), pool.lens.to(device),
                            scale, k_scales=ks, v_scales=vs)
    ref = prefill_attention_ref(q.float(), pool.k8, pool.v8, pool.tables, qsl, pool.lens, scale, pool.ks, pool.vs)
    _assert_tight(got, ref, dtype)
    full = prefill_attention_ref(q.float(), pool.kf, pool.vf, pool.tables, qsl, pool.lens, scale)
    _assert_near_full(got, full, "prefill vs unquantized")


@pytest.mark.parametrize("segments", [1, 3])
def test_unified(device, segments):
    gen = torch.Generator().manual_seed(segments)
    h_q, h_kv, d, dtype = 8, 2, 64, torch.float32
    seqs = [(1, 70), (3, 33), (24, 24), (1, 5)]  # decodes, a speculative-sized query, a prefill
    pool = Fp8Pool([c for _, c in seqs], h_kv, d, 16, gen)
    q, qsl = _varlen(seqs, h_q, d, dtype, gen)
    scale = d ** -0.5
    k8, v8, ks, vs = pool.fp8(device)
    got = unified_attention(q.to(device), k8, v8, pool.tables.to(device), pool.lens.to(device), qsl.to(device),
                            scale, max_query_len=24, max_seq_len=80, num_segments=segments,
                            k_scales=ks, v_scales=vs)
    ref = unified_attention_ref(q.float(), pool.k8, pool.v8, pool.tables, pool.lens, qsl, scale, pool.ks, pool.vs)
    _assert_tight(got, ref, dtype)
    full = unified_attention_ref(q, pool.kf, pool.vf, pool.tables, pool.lens, qsl, scale)
    _assert_near_full(got, full, "unified vs unquantized")


def test_fp8_pool_without_scales_is_refused(device):
    gen = torch.Generator().manual_seed(0)
    pool = Fp8Pool([5], 1, 32, 8, gen)
    k8, v8, ks, _ = pool.fp8(device)
    q = torch.randn(1, 2, 32, device=device)
    with pytest.raises(ValueError, match="v_scales"):
        paged_decode_attention(q, k8, v8, pool.tables.to(device), pool.lens.to(device), 1.0, k_scales=ks)


def test_poisoned_slots_show(device):
    """The pool the kernels read does hold NaN past every context: reading one slot too many
    (a context length one longer than written) poisons the output. A GPU decodes the byte as
    NaN; Triton's interpreter as 480 (E4M3 without NaN), far above these values (|v| < 20)."""
    gen = torch.Generator().manual_seed(5)
    pool = Fp8Pool([5, 16], 2, 32, 8, gen)
    k8, v8, ks, vs = pool.fp8(device)
    q = torch.randn(2, 4, 32, generator=gen).to(device)
    got = paged_decode_attention(q, k8, v8, pool.tables.to(device), (pool.lens + 1).to(device), 0.2,
                                 k_scales=ks, v_scales=vs)
    assert got.isnan().any() or got.abs().max() > 100


@pytest.fixture
def fp16_dots(monkeypatch):
    """float16 kernels take their 16-bit dot branches under the interpreter too (a no-op on a GPU,
    where they always do)."""
    monkeypatch.setenv(INTERPRET_FP16_DOTS, "1")


# float16 q over an FP8 pool of small values (std 1e-4: value scales 2^-19 or so). The P·V
# product must keep the value scales' range: p * vs rounded to float16 lands in its subnormals
# (measured under the interpreter: 2-3% relative RMS error in these tests, 0.9% at std 1e-3);
# in bfloat16 the probabilities round by 2^-9 at most (0.08%).
VALUE_STD = 1e-4
SMALL_V_RMS = 5e-3


def _assert_small_v(got, ref, what):
    err = ((got.float().cpu() - ref).norm() / ref.norm()).item()
    assert err <= SMALL_V_RMS, f"{what}: relative RMS error {err:.3g} > {SMALL_V_RMS}"


@pytest.mark.parametrize("partition", [512, 32])
def test_decode_fp16_small_values(device, fp16_dots, partition):
    gen = torch.Generator().manual_seed(partition)
    h_q, h_kv, d = 8, 2, 64
    pool = Fp8Pool([1, 37, 100], h_kv, d, 16, gen, value_std=VALUE_STD)
    # every p * vs lies below float16's smallest normal, 2^-14
    assert int(pool.vs[pool.owned].max()) <= 127 - 15
    q = torch.randn(3, h_q, d, generator=gen).half()
    k8, v8, ks, vs = pool.fp8(device)
    got = paged_decode_attention(q.to(device), k8, v8, pool.tables.to(device), pool.lens.to(device), d ** -0.5,
                                 partition_size=partition, k_scales=ks, v_scales=vs)
    ref = paged_decode_attention_ref(q.float(), pool.k8, pool.v8, pool.tables, pool.lens, d ** -0.5, pool.ks,
                                     pool.vs)
    _assert_small_v(got, ref, "decode")


def test_prefill_fp16_small_values(device, fp16_dots):
    gen = torch.Generator().manual_seed(11)
    h_q, h_kv, d = 4, 2, 64
    seqs = [(20, 20), (7, 40), (1, 9)]
    pool = Fp8Pool([c for _, c in seqs], h_kv, d, 16, gen, value_std=VALUE_STD)
    q, qsl = _varlen(seqs, h_q, d, torch.float16, gen)
    k8, v8, ks, vs = pool.fp8(device)
    got = prefill_attention(q.to(device), k8, v8, pool.tables.to(device), qsl.to(device), pool.lens.to(device),
                            d ** -0.5, k_scales=ks, v_scales=vs)
    ref = prefill_attention_ref(q.float(), pool.k8, pool.v8, pool.tables, qsl, pool.lens, d ** -0.5, pool.ks,
                                pool.vs)
    _assert_small_v(got, ref, "prefill")


@pytest.mark.parametrize("segments", [1, 3])
def test_unified_fp16_small_values(device, fp16_dots, segments):
    gen = torch.Generator().manual_seed(20 + segments)
    h_q, h_kv, d = 8, 2, 64
    seqs = [(1, 70), (3, 33), (24, 24)]  # the short-query kernel and the prefill kernel
    pool = Fp8Pool([c for _, c in seqs], h_kv, d, 16, gen, value_std=VALUE_STD)
    q, qsl = _varlen(seqs, h_q, d, torch.float16, gen)
    k8, v8, ks, vs = pool.fp8(device)
    got = unified_attention(q.to(device), k8, v8, pool.tables.to(device), pool.lens.to(device), qsl.to(device),
                            d ** -0.5, max_query_len=24, max_seq_len=80, num_segments=segments,
                            k_scales=ks, v_scales=vs)
    ref = unified_attention_ref(q.float(), pool.k8, pool.v8, pool.tables, pool.lens, qsl, d ** -0.5, pool.ks,
                                pool.vs)
    _assert_small_v(got, ref, "unified")

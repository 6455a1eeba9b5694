"""The Triton paged decode attention matches the decode path of paged_attention_ref."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.attention_config import PagedDecodeTile  # noqa: E402
from llmesh.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402

# float32 is exact up to summation order on the CPU interpreter; a GPU's dot units and exp2
# leave more room. 16-bit tolerances cover one rounding of the output.
TOL = {torch.float32: 1e-3 if torch.cuda.is_available() else 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

HEADS = [(4, 4), (8, 2), (8, 1)]  # GQA ratios 1, 4, 8


def _check(device, paged_kv, seq_lens, h_q, h_kv, d, block_size, dtype, partition_size, table_dtype, fold=None,
           tile=None):
    gen = torch.Generator().manual_seed(sum(seq_lens) * 7 + h_q * 3 + h_kv + d + partition_size + block_size)
    kv = paged_kv(seq_lens, h_kv, d, block_size, dtype, gen, table_dtype=table_dtype)
    q = torch.randn(len(seq_lens), h_q, d, generator=gen).to(dtype)
    scale = d ** -0.5
    ref = paged_decode_attention_ref(q, kv.k_ref, kv.v_ref, kv.block_tables, kv.seq_lens, scale)

    out = torch.full_like(q, float("nan"), device=device)  # every element must be written
    got = paged_decode_attention(
        q.to(device), kv.k_cache, kv.v_cache, kv.block_tables.to(device), kv.seq_lens.to(device), scale,
        partition_size=partition_size, out=out, fold=fold, tile=tile)
    assert got is out
    tol = TOL[dtype]
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("h_q,h_kv", HEADS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partition_size,fold", [(32, True), (32, False), (2048, None)],
                         ids=["split-fold", "split-reduce", "nosplit"])
def test_batch_matches_reference(device, paged_kv, h_q, h_kv, d, dtype, partition_size, fold):
    """Context lengths around block boundaries and a long one, in one batch; split-K forced on
    (33 partitions for the long context), combined by the last partition program or by the
    reduce kernel, or off."""
    _check(device, paged_kv, [1, 15, 16, 17, 33, 1030], h_q, h_kv, d, 16, dtype, partition_size, torch.int32,
           fold)


@pytest.mark.parametrize("tile", [PagedDecodeTile(16, 2, 2), PagedDecodeTile(128, 4, 3)], ids=["n16", "n128"])
@pytest.mark.parametrize("partition_size", [64, 2048])
def test_every_tile_matches_reference(device, paged_kv, tile, partition_size):
    """The measured table's tiles (BLOCK_N below and above a partition's 64 keys, which caps it)."""
    _check(device, paged_kv, [1, 17, 64, 65, 300], 8, 2, 64, 16, torch.bfloat16, partition_size, torch.int32,
           tile=tile)


def test_folded_launches_reuse_their_counters(device, paged_kv):
    """Each folded launch leaves its arrival counters at zero: the same inputs again, and
    another batch, give the same outputs as the reduce kernel's path."""
    gen = torch.Generator().manual_seed(5)
    for seq_lens in ([300, 2, 129], [300, 2, 129], [64, 65, 700, 1]):
        kv = paged_kv(seq_lens, 2, 64, 16, torch.float32, gen)
        q = torch.randn(len(seq_lens), 8, 64, generator=gen).to(device)
        args = (kv.k_cache, kv.v_cache, kv.block_tables.to(device), kv.seq_lens.to(device), 0.125)
        folded = paged_decode_attention(q, *args, partition_size=32, fold=True)
        reduced = paged_decode_attention(q, *args, partition_size=32, fold=False)
        torch.testing.assert_close(folded, reduced, rtol=1e-5, atol=1e-5)
        assert torch.equal(paged_decode_attention(q, *args, partition_size=32, fold=True), folded)


@pytest.mark.parametrize("seq_lens,h_q,h_kv,d,block_size,dtype,partition_size", [
    ([1], 4, 4, 64, 16, torch.float32, 512),  # a single one-token context
    ([1030], 16, 2, 128, 16, torch.bfloat16, 512),  # one long context, default partitions
    ([40, 7], 8, 1, 64, 8, torch.bfloat16, 16),  # block_size 8, partitions of two blocks
    ([100, 64, 65], 8, 2, 128, 32, torch.float16, 64),  # block_size 32, partitions end mid-block
    ([70, 5], 12, 4, 80, 16, torch.float32, 32),  # GQA 3 (padded rows), head_dim not a power of two
])
def test_edge_cases_match_reference(device, paged_kv, seq_lens, h_q, h_kv, d, block_size, dtype, partition_size):
    _check(device, paged_kv, seq_lens, h_q, h_kv, d, block_size, dtype, partition_size, torch.int64)


@pytest.mark.parametrize("partition_size,fold", [(16, True), (16, False), (512, None)])
def test_empty_context_gives_zeros(device, paged_kv, partition_size, fold):
    """A batch padded with empty entries (CUDA-graph sizes) leaves the real ones unchanged."""
    gen = torch.Generator().manual_seed(11)
    kv = paged_kv([20, 0, 5], 2, 64, 16, torch.float32, gen)
    q = torch.randn(3, 4, 64, generator=gen)
    out = torch.full_like(q, float("nan"), device=device)
    paged_decode_attention(q.to(device), kv.k_cache, kv.v_cache, kv.block_tables.to(device),
                           kv.seq_lens.to(device), 0.125, max_seq_len=64, partition_size=partition_size, out=out,
                           fold=fold)
    keep = torch.tensor([0, 2])
    ref = paged_decode_attention_ref(q[keep], kv.k_ref, kv.v_ref, kv.block_tables[keep], kv.seq_lens[keep], 0.125)
    torch.testing.assert_close(out.cpu()[keep], ref, rtol=1e-3, atol=1e-3)
    assert torch.equal(out[1].cpu(), torch.zeros(4, 64))


def test_rejects_bad_inputs(device):
    q = torch.randn(2, 6, 64, device=device)
    cache = torch.randn(4, 16, 4, 64, device=device)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=device)
    lens = torch.tensor([3, 4], device=device)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode_attention(q, cache, cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="block_tables has S=1"):
        paged_decode_attention(q[:, :4], cache, cache, tables[:1], lens, 0.1)
    with pytest.raises(ValueError, match="partition_size"):
        paged_decode_attention(q[:, :4], cache, cache, tables, lens, 0.1, partition_size=100)
    with pytest.raises(ValueError, match="does not fit its block table"):
        paged_decode_attention(q[:, :4], cache, cache, tables, torch.tensor([3, 33], device=device), 0.1)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q[:, :4], cache.half(), cache.half(), tables, lens, 0.1)

"""The fused MoE kernel against its per-expert torch reference (llmesh/kernels/fused_moe_ref.py),
and the block alignment against its definition."""

from __future__ import annotations

import json

import pytest
import torch

from llmesh.engine.model.moe import quantize_experts_fp8, quantize_experts_int4, quantize_experts_int8
from llmesh.kernels.fused_moe import fused_moe, moe_align_block_size
from llmesh.kernels.fused_moe_config import MoEConfig, default_config, m_bucket
from llmesh.kernels.fused_moe_ref import fused_moe_ref


def _routing(t: int, e: int, k: int, gen: torch.Generator, skew: bool = False):
    """Random top-k routing [T, k]: distinct experts per token, softmax-renormalised weights.
    skew: every token's experts come from the first k + 1 (many experts get no token)."""
    pool = k + 1 if skew else e
    scores = torch.rand(t, pool, generator=gen)
    ids = scores.topk(k, dim=-1).indices
    weights = torch.softmax(torch.randn(t, k, generator=gen), dim=-1)
    return weights, ids


def _experts(e: int, h: int, inter: int, dtype, gen):
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=gen) / inter ** 0.5).to(dtype)
    return w13, w2


def _int4_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Float experts as INT4 (quantize_int4 per expert): (codes w13, codes w2, fused_moe's keywords)."""
    c13, s13, m13 = quantize_experts_int4(w13)
    c2, s2, m2 = quantize_experts_int4(w2)
    return c13, c2, dict(w13_scale=s13, w2_scale=s2, w13_min=m13, w2_min=m2)


def _dense_or_int4(fmt, dtype, device, x, w13, w2, weights, ids):
    """fused_moe's positional arguments and quantization keywords on ``device``: float experts in
    ``dtype``, or INT4 ones (fmt "int4")."""
    quant = {}
    if fmt == "int4":
        w13, w2, quant = _int4_experts(w13, w2)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    args = [v.to(device) for v in (x, w13, w2, weights.to(dtype), ids)]
    return args, {name: v.to(device) for name, v in quant.items()}


@pytest.mark.parametrize("t,e,k,skew", [(1, 8, 2, False), (5, 4, 1, False), (7, 8, 8, False),
                                        (33, 16, 2, True), (19, 8, 2, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_reference(device, t, e, k, skew, dtype):
    gen = torch.Generator().manual_seed(t * 100 + e * 10 + k)
    h, inter = 64, 48  # I not a multiple of the 32-wide tiles: masked columns
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, dtype, gen)
    weights, ids = _routing(t, e, k, gen, skew)
    ref = fused_moe_ref(x, w13, w2, weights.to(dtype), ids)
    cfg = MoEConfig(block_m=16, block_n=32, block_k=32)
    got = fused_moe(x.to(device), w13.to(device), w2.to(device), weights.to(dtype).to(device), ids.to(device),
                    config=cfg, down_config=cfg).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_float32_routing_weights_and_default_config(device):
    """Mixtral keeps its routing weights in float32 beside bf16 activations; default tiles."""
    gen = torch.Generator().manual_seed(3)
    t, e, k, h, inter = 40, 8, 2, 128, 64
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    w13, w2 = _experts(e, h, inter, torch.bfloat16, gen)
    weights, ids = _routing(t, e, k, gen)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    got = fused_moe(x.to(device), w13.to(device), w2.to(device), weights.to(device), ids.to(device)).cpu()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("k,quantize", [(1, quantize_experts_int8), (2, quantize_experts_int8),
                                        (2, quantize_experts_fp8)], ids=["int8-k1", "int8-k2", "fp8-k2"])
def test_quantized_experts_match_dequantized_reference(device, k, quantize):
    gen = torch.Generator().manual_seed(11 + k)
    t, e, h, inter = 21, 8, 64, 32
    x = torch.randn(t, h, generator=gen)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    q13, s13 = quantize(w13)
    q2, s2 = quantize(w2)
    weights, ids = _routing(t, e, k, gen, skew=True)
    ref = fused_moe_ref(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    cfg = MoEConfig(block_m=16, block_n=32, block_k=32)
    got = fused_moe(x.to(device), q13.to(device), q2.to(device), weights.to(device), ids.to(device),
                    w13_scale=s13.to(device), w2_scale=s2.to(device), config=cfg, down_config=cfg).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # And the quantization itself stays close to the float experts.
    full = fused_moe_ref(x, w13, w2, weights, ids)
    assert float((ref - full).abs().max()) < 0.1 * float(full.abs().max())


@pytest.mark.parametrize("t,k,h,inter,dtype,block_k,block_m", [
    (21, 2, 256, 128, torch.float32, 64, 16),     # K steps of 64 inside the groups of 128
    (3, 1, 128, 64, torch.float32, 128, 16),      # K shorter than the padded halves: masked rows
    (9, 2, 256, 384, torch.bfloat16, 128, 16),    # 16-bit activations (on a GPU: codes widened by the
    (9, 2, 256, 384, torch.float16, 64, 16),      # exponent trick, bf16's and fp16's own magic numbers)
    (21, 2, 256, 128, torch.float32, 64, 64),     # tiles of 64 rows: the scales go into the weights
    (40, 2, 256, 384, torch.bfloat16, 64, 64),    # (rounded to the dot type, as the reference)
])
def test_int4_experts_match_dequantized_reference(device, t, k, h, inter, dtype, block_k, block_m):
    """INT4 experts (quantize_int4 per expert, the halves layout, group 128) through the kernel
    equal the reference that dequantizes them first (to rounding of the sums; in 16 bits the
    kernel applies each group's scale and min to the exact codes' products, where the reference
    rounds every dequantized weight first)."""
    gen = torch.Generator().manual_seed(31 + t)
    e = 8
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    q13, s13, m13 = quantize_experts_int4(w13)
    q2, s2, m2 = quantize_experts_int4(w2)
    assert q13.dtype == torch.uint8 and q13.shape == (e, -(-h // 256) * 128, 2 * inter)
    weights, ids = _routing(t, e, k, gen, skew=t > 10)
    quant = dict(w13_scale=s13, w2_scale=s2, w13_min=m13, w2_min=m2)
    ref = fused_moe_ref(x, q13, q2, weights.to(dtype), ids, **quant)
    cfg = MoEConfig(block_m=block_m, block_n=32, block_k=block_k)
    got = fused_moe(x.to(device), q13.to(device), q2.to(device), weights.to(dtype).to(device), ids.to(device),
                    **{name: v.to(device) for name, v in quant.items()}, config=cfg, down_config=cfg).cpu()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    full = fused_moe_ref(x.float(), w13, w2, weights, ids)  # and INT4 stays near the float experts
    assert float((ref.float() - full).norm() / full.norm()) < 0.2


@pytest.mark.parametrize("fmt,dtype,split", [("dense", torch.float32, 3), ("dense", torch.bfloat16, 2),
                                              ("int4", torch.float32, 2), ("int4", torch.bfloat16, 4)])
def test_split_k_sums_every_piece_once(device, fmt, dtype, split):
    """split_k: the K loop in pieces, float32 partials summed by the tile's last arrival, which
    runs the epilogue (SiLU-and-mul, routing weight); both GEMMs, a K that does not divide
    evenly into the pieces, and a second call on the same counters (each launch resets them)."""
    gen = torch.Generator().manual_seed(41 + split)
    t, e, k, h, inter = 3, 8, 2, 320, 192
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    weights, ids = _routing(t, e, k, gen)
    args, qdev = _dense_or_int4(fmt, dtype, device, x, w13, w2, weights, ids)
    one = MoEConfig(block_m=16, block_n=32, block_k=32)
    many = MoEConfig(block_m=16, block_n=32, block_k=32, split_k=split)
    want = fused_moe(*args, **qdev, config=one, down_config=one).cpu()
    for _ in range(2):
        got = fused_moe(*args, **qdev, config=many, down_config=many).cpu()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # the pieces' float32 sums in another order
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    ref = fused_moe_ref(*(a.cpu() for a in args), **{name: v.cpu() for name, v in qdev.items()})
    torch.testing.assert_close(got, ref, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("fmt,dtype,ep", [("dense", torch.float32, False), ("dense", torch.bfloat16, True),
                                           ("int8", torch.float32, False), ("int4", torch.bfloat16, True),
                                           ("int4", torch.float32, False)])
def test_one_token_skips_the_align_step_and_sums_in_the_down_gemm(device, fmt, dtype, ep):
    """A one-token step gives each pair its own block (no align launch) and the down GEMM's last
    program per column tile sums the k rows: bit for bit what the sorted blocks and
    _moe_sum_kernel give (align_path forces that path), with pairs of another rank's experts
    (id -1) among them, on counters each launch leaves at zero (three calls, one split-K config)."""
    from llmesh.kernels import fused_moe as fm

    gen = torch.Generator().manual_seed(7 + len(fmt))
    e, k, h, inter = 16, 8, 256, 96
    x = torch.randn(1, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    weights, ids = _routing(1, e, k, gen)
    if ep:
        ids[0, 2] = ids[0, 5] = -1
    quant = {}
    if fmt == "int4":
        w13, w2, quant = _int4_experts(w13, w2)
    elif fmt == "int8":
        w13, s13 = quantize_experts_int8(w13)
        w2, s2 = quantize_experts_int8(w2)
        quant = dict(w13_scale=s13, w2_scale=s2)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    args = [v.to(device) for v in (x, w13, w2, weights.to(dtype), ids)]
    qdev = {name: v.to(device) for name, v in quant.items()}
    cfg = MoEConfig(block_m=16, block_n=32, block_k=64 if fmt == "int4" else 32)
    aligned = fused_moe(*args, **qdev, config=cfg, down_config=cfg, align_path="torch").cpu()
    assert fm.PAIR_BLOCKS_MAX_TOKENS >= 1
    for down in (cfg, cfg, MoEConfig(16, 32, 32, split_k=2)):  # the last: rows summed by moe_sum
        got = fused_moe(*args, **qdev, config=cfg, down_config=down).cpu()
        if down is cfg:
            assert torch.equal(got, aligned)
    torch.testing.assert_close(got, aligned, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-3)
    kept = ids.clamp(min=0)  # the reference on the experts this rank holds: -1 pairs weigh 0
    w_kept = torch.where(ids < 0, 0.0, weights)
    ref = fused_moe_ref(x, w13, w2, w_kept.to(dtype), kept, **quant)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(aligned, ref, atol=tol, rtol=tol)
    assert not fm._pair_block_cache or all(v[0].numel() == v[1].item() for v in fm._pair_block_cache.values())


@pytest.mark.parametrize("fmt,dtype,t,ep", [("dense", torch.float32, 37, False), ("dense", torch.bfloat16, 21, True),
                                             ("int4", torch.bfloat16, 9, True), ("dense", torch.bfloat16, 2, False)])
def test_the_down_gemm_sums_each_token_bit_for_bit(device, fmt, dtype, t, ep):
    """token_sum: the last of a token's k pairs to reach a column tile sums its rows, giving
    exactly _moe_sum_kernel's output, with other ranks' pairs (-1, several a token, so several
    lanes of one block count on one counter), in grouped program order, three launches on
    counters each leaves at zero; a split-K down GEMM falls back to moe_sum."""
    from llmesh.kernels.common import arrival_counters
    from llmesh.kernels.moe_topk_sum import TOKEN_SUM_SLOTS

    gen = torch.Generator().manual_seed(t + len(fmt))
    e, k, h, inter = 16, 4, 96, 64
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    weights, ids = _routing(t, e, k, gen)
    if ep:
        ids[::2, 1:3] = -1
    args, qdev = _dense_or_int4(fmt, dtype, device, x, w13, w2, weights, ids)
    cfg = MoEConfig(block_m=16, block_n=32, block_k=64 if fmt == "int4" else 32, group_m=2)
    want = fused_moe(*args, **qdev, config=cfg, down_config=cfg, token_sum=False).cpu()
    for _ in range(3):
        got = fused_moe(*args, **qdev, config=cfg, down_config=cfg, token_sum=True).cpu()
        assert torch.equal(got, want)
    assert not arrival_counters("fused_moe_token_sum", x.to(device).device, 1, TOKEN_SUM_SLOTS).any()
    split = MoEConfig(16, 32, 32, split_k=2)
    if fmt == "dense":
        torch.testing.assert_close(fused_moe(*args, config=cfg, down_config=split, token_sum=True).cpu(), want,
                                   atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-3)


@pytest.mark.parametrize("fmt,group_m,split", [("dense", 1, 1), ("dense", 3, 2), ("int4", 2, 1), ("int4", 4, 3)])
def test_grouped_program_order_changes_no_result(device, fmt, group_m, split):
    """group_m: the programs in grouped order (a 1-D grid of blocks x column tiles, the last
    group short) compute the same tiles, so the output is bit for bit the default order's, with
    split-K partials and counters addressed by the same tile (two calls: the counters reset)."""
    gen = torch.Generator().manual_seed(60 + group_m)
    t, e, k, h, inter = 23, 4, 2, 192, 160  # column tiles of 32: 5 (gate/up), 6 (down)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    weights, ids = _routing(t, e, k, gen, skew=True)
    quant = {}
    if fmt == "int4":
        w13, s13, m13 = quantize_experts_int4(w13)
        w2, s2, m2 = quantize_experts_int4(w2)
        quant = dict(w13_scale=s13.to(device), w2_scale=s2.to(device), w13_min=m13.to(device), w2_min=m2.to(device))
    else:
        w13, w2 = w13.to(torch.bfloat16), w2.to(torch.bfloat16)
    args = [v.to(device) for v in (x, w13, w2, weights.to(torch.bfloat16), ids)]
    plain = MoEConfig(block_m=16, block_n=32, block_k=32, split_k=split)
    grouped = MoEConfig(block_m=16, block_n=32, block_k=32, split_k=split, group_m=group_m)
    want = fused_moe(*args, **quant, config=plain, down_config=plain, align_path="torch").cpu()
    for _ in range(2):
        got = fused_moe(*args, **quant, config=grouped, down_config=grouped, align_path="torch").cpu()
        assert torch.equal(got, want)


def test_split_k_must_be_positive():
    with pytest.raises(ValueError, match="split_k"):
        MoEConfig(16, 32, 32, 4, 3, 0)


def test_int4_experts_in_groups_no_k_step_fits_are_refused():
    gen = torch.Generator().manual_seed(2)
    w13, w2 = _experts(4, 64, 32, torch.float32, gen)
    q13, s13, m13 = quantize_experts_int4(w13)
    q2, s2, m2 = quantize_experts_int4(w2)
    weights, ids = _routing(2, 4, 1, gen)
    narrow = s13.repeat_interleave(16, dim=1)  # 256 rows in groups of 8
    with pytest.raises(ValueError, match="groups of 8 input rows"):
        fused_moe(torch.randn(2, 64), q13, q2, weights, ids, w13_scale=narrow, w2_scale=s2,
                  w13_min=narrow, w2_min=m2)


def test_int4_experts_dequantize_as_int4weight_does():
    from llmesh.engine.quant.quantize import quantize_int4
    from llmesh.kernels.fused_moe_ref import dequantize_experts_ref

    w = torch.randn(3, 96, 200, generator=torch.Generator().manual_seed(5))  # [E, N, K], K padded to 256
    q, scale, low = quantize_experts_int4(w)
    got = dequantize_experts_ref(q, scale, torch.float32, low, 200)  # [E, N, K]
    for i in range(3):
        torch.testing.assert_close(got[i], quantize_int4(w[i]).dequantize().t())


def test_same_expert_twice_in_a_block_and_empty_batch(device):
    """Every token to the same two experts (one block holds many copies of one expert's rows)."""
    gen = torch.Generator().manual_seed(5)
    t, e, h, inter = 20, 4, 32, 32
    x = torch.randn(t, h, generator=gen)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    ids = torch.tensor([[2, 0]] * t)
    weights = torch.full((t, 2), 0.5)
    cfg = MoEConfig(block_m=16, block_n=32, block_k=32)
    got = fused_moe(x.to(device), w13.to(device), w2.to(device), weights.to(device), ids.to(device),
                    config=cfg, down_config=cfg).cpu()
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)
    empty = fused_moe(x[:0].to(device), w13.to(device), w2.to(device), weights[:0].to(device), ids[:0].to(device))
    assert empty.shape == (0, h)


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("path", ["torch", "program", "chunks"])
def test_align_block_size(block_m, path, device):
    gen = torch.Generator().manual_seed(block_m)
    t, e, k = 37, 6, 2
    _, ids = _routing(t, e, k, gen, skew=True)
    # The Triton kernel reads device memory (or runs under the interpreter on the CPU).
    out = moe_align_block_size(ids.to(device), block_m, e, path=path)
    sorted_ids, expert_ids, num_post = (x.cpu() for x in out)
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=e)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_post) == int(padded.sum())
    pos = 0
    for ex in range(e):
        run = sorted_ids[pos : pos + int(padded[ex])]
        real = run[run < flat.numel()]
        # Every pair of this expert, in token order, then padding.
        assert real.tolist() == torch.nonzero(flat == ex).flatten().tolist()
        assert (run[len(real):] == flat.numel()).all()
        blocks = expert_ids[pos // block_m : (pos + int(padded[ex])) // block_m]
        assert (blocks == ex).all()
        pos += int(padded[ex])
    assert (expert_ids[pos // block_m :] == -1).all()
    assert (sorted_ids[pos:] == flat.numel()).all()


def test_config_heuristic_and_buckets():
    assert m_bucket(1) == 1 and m_bucket(3) == 4 and m_bucket(10**6) == 8192
    assert default_config(1, 128, 768, 2048, 8).block_m == 16
    assert default_config(4096, 128, 768, 2048, 8).block_m == 64
    # INT4: a step covers 2 BLOCK_K rows, so decode tiles take half bf16's BLOCK_K
    assert default_config(1, 128, 768, 2048, 8, "int4") == MoEConfig(16, 64, 64, 4, 3)
    assert default_config(4096, 128, 768, 2048, 8, "int4").block_m == 128
    with pytest.raises(ValueError, match="power of two"):
        MoEConfig(block_m=24, block_n=32, block_k=32)


def test_tiles_are_fitted_to_shared_memory():
    from llmesh.kernels.fused_moe_config import (SHARED_MEMORY_LIMIT, fit_shared_memory, load_tuned,
                                                 shared_memory_estimate)

    prefill = MoEConfig(128, 128, 64, 8, 4)
    # the H200's report for this INT4 gate/up tile with float32 activations (OutOfResources)
    assert shared_memory_estimate(prefill, 4, 1, gated=True, int4=True) == 311296
    fitted = fit_shared_memory(prefill, SHARED_MEMORY_LIMIT, 4, 1, gated=True, int4=True)
    assert fitted.block_m == 128 and fitted.num_stages < 4
    assert shared_memory_estimate(fitted, 4, 1, gated=True, int4=True) <= SHARED_MEMORY_LIMIT
    # a limit that no number of stages meets shortens the K step, never below a dot tile
    tight = fit_shared_memory(prefill, 40_000, 4, 1, gated=True, int4=True)
    assert tight.num_stages == 2 and tight.block_k < 64 and tight.block_m == 128
    assert fit_shared_memory(prefill, 1, 4, 1, gated=True, int4=True).block_k == 16
    # 16-bit activations: every shipped tile and heuristic tile is left as measured
    for tag, table in load_tuned().items():
        int4 = tag.endswith(":int4")
        for (_, n, k, _), cfg in table.items():
            for gated in (True, False):
                assert fit_shared_memory(cfg, SHARED_MEMORY_LIMIT, 2, 1 if int4 else 2, gated, int4) == cfg, (tag, cfg)
    for weights in ("dense", "int4"):
        for m in (1, 64, 4096):
            cfg = default_config(m, 128, 768, 2048, 8, weights)
            assert fit_shared_memory(cfg, SHARED_MEMORY_LIMIT, 2, 1 if weights == "int4" else 2, True,
                                     weights == "int4") == cfg


def test_bad_arguments_are_named(device):
    x = torch.randn(4, 32, device=device)
    w13 = torch.randn(2, 64, 32, device=device)
    w2 = torch.randn(2, 32, 16, device=device)  # I = 16, but w13 says 32
    ids = torch.zeros(4, 1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, w13, w2, torch.ones(4, 1, device=device), ids)
    with pytest.raises(ValueError, match="int8 / fp8 experts need"):
        fused_moe(x, w13.to(torch.int8), torch.zeros(2, 32, 32, dtype=torch.int8, device=device),
                  torch.ones(4, 1, device=device), ids)


def test_tuned_table_merges_per_device_and_the_shipped_file_parses(tmp_path):
    from llmesh.kernels.fused_moe_config import MoEConfig, load_tuned, merge_tuned, pick_config, table_tag

    path = tmp_path / "tuned.json"
    merge_tuned(path, "h200", {(128, 768, 2048, 64): MoEConfig(16, 64, 128, 4, 3)})
    merge_tuned(path, "h200", {(128, 2048, 768, 64): MoEConfig(16, 128, 64, 8, 4)})
    merge_tuned(path, "h100", {(128, 768, 2048, 64): MoEConfig(32, 64, 64, 4, 3)})
    tables = load_tuned(path)
    assert tables["h200"] == {(128, 768, 2048, 64): MoEConfig(16, 64, 128, 4, 3),
                              (128, 2048, 768, 64): MoEConfig(16, 128, 64, 8, 4)}
    assert tables["h100"][(128, 768, 2048, 64)].block_m == 32
    # INT4 experts: a table of their own beside the device's dense one
    merge_tuned(path, table_tag("h200", "int4"), {(128, 768, 2048, 64): MoEConfig(16, 128, 64, 4, 3)})
    merge_tuned(path, "h200", {(128, 2048, 768, 4096): MoEConfig(64, 128, 64, 8, 3, 1, 8)})
    assert load_tuned(path)["h200"][(128, 2048, 768, 4096)] == MoEConfig(64, 128, 64, 8, 3, 1, 8)
    assert json.loads(path.read_text())["h200"]["128,2048,768,64"] == [16, 128, 64, 8, 4, 1]  # group_m 0: not written
    # weight_tma after a group_m of 0: both written; the entry reads back as the config
    merge_tuned(path, "h200", {(128, 768, 2048, 4096): MoEConfig(64, 128, 64, 8, 3, 1, 0, 1)})
    assert json.loads(path.read_text())["h200"]["128,768,2048,4096"] == [64, 128, 64, 8, 3, 1, 0, 1]
    assert load_tuned(path)["h200"][(128, 768, 2048, 4096)].weight_tma == 1
    tables = load_tuned(path)
    assert tables["h200:int4"] == {(128, 768, 2048, 64): MoEConfig(16, 128, 64, 4, 3)}
    assert tables["h200"][(128, 768, 2048, 64)] == MoEConfig(16, 64, 128, 4, 3)
    with pytest.raises(ValueError, match="expert weight format"):
        table_tag("h200", "int3")
    load_tuned.cache_clear()
    assert isinstance(load_tuned(), dict)  # the shipped file (or none) parses
    # no device, or a CPU tensor's: the heuristic
    assert pick_config(64, 128, 768, 2048, 8) == pick_config(64, 128, 768, 2048, 8, torch.device("cpu"))


@pytest.mark.parametrize("t,k,h", [(1, 8, 2048), (3, 2, 100), (0, 4, 64), (5, 1, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_sum_adds_slots_in_order(device, t, k, h, dtype):
    """The top-k sum: float32 in slot order, rounded once, bit for bit; masked tail columns."""
    from llmesh.kernels.moe_topk_sum import moe_sum

    gen = torch.Generator().manual_seed(t * 7 + k + h)
    src = (torch.randn(t, k, h, generator=gen) * torch.logspace(-3, 3, k)[None, :, None]).to(dtype)
    want = torch.zeros(t, h)
    for j in range(k):
        want = want + src[:, j].float()
    got = moe_sum(src.to(device))
    assert got.dtype == dtype and got.shape == (t, h)
    assert torch.equal(got.cpu(), want.to(dtype))

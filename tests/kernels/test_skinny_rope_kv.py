"""The q/k/v GEMV with RoPE and the K/V write in its epilogue (llmesh/kernels/skinny_rope_kv.py)
against its unfused composition, skinny_gemm then rope_kv_write with the same config: the qkv
tensor (q and k rotated, v as projected) and both pools equal bit for bit, for FMA rows, FMA
tiles and tl.dot configs, M from 1 to 5, bias, float16, padding slots (-1) left unwritten.
Which configs and pools qualify (rope_kv_fusable), bad arguments refused. The op tables: the
torch table's norm_qkv_rope is the composition, the triton table's equals it everywhere (the
fused kernel only where the skinny table picks an unsplit config without a norm prologue). On
CUDA: the dispatch by the table, Llama-3-8B's shapes with the H200 config, graph capture."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.engine.model.config import ModelConfig  # noqa: E402
from llmesh.engine.model.ops import compose_norm_qkv_rope  # noqa: E402
from llmesh.engine.model.ops_torch import TorchOps  # noqa: E402
from llmesh.engine.model.ops_triton import FUSED_DECODE_ENV, TritonOps, rope_epilogue_config  # noqa: E402
from llmesh.kernels.rope import rope_cos_sin_cache  # noqa: E402
from llmesh.kernels.rope_kv_write import rope_kv_write  # noqa: E402
from llmesh.kernels.skinny_gemm import skinny_gemm  # noqa: E402
from llmesh.kernels.skinny_gemm_config import FUSED_SLOWER, TUNED, SkinnyConfig  # noqa: E402
from llmesh.kernels.skinny_rope_kv import rope_kv_fusable, skinny_rope_kv  # noqa: E402
from tests.kernels.cuda_graphs import capture  # noqa: E402

CUDA = torch.cuda.is_available()
EPS = 1e-5
CONFIGS = {
    "fma_row": SkinnyConfig(1, 8, 32, 1, 1, 1, False),
    "fma_row_wide": SkinnyConfig(1, 16, 16, 1, 2, 2, False),
    "fma_tile": SkinnyConfig(4, 8, 32, 1, 1, 1, False),
    "dot": SkinnyConfig(16, 16, 32, 1, 1, 1, True),
}


def _problem(m, nq, nkv, d, k, dtype, device, seed, bias=False, blocks=6, block_size=4):
    gen = torch.Generator().manual_seed(seed)
    n = (nq + 2 * nkv) * d
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    w = (0.3 * torch.randn(n, k, generator=gen)).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    positions = torch.randint(0, 60, (m,), generator=gen).to(device)
    slots = torch.randperm(blocks * block_size, generator=gen)[:m].to(device)
    if m > 1:
        slots[1] = -1  # a CUDA-graph padding row: computed, never stored in the pool
    k_cache = torch.randn(blocks, block_size, nkv, d, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(blocks, block_size, nkv, d, generator=gen).to(dtype).to(device)
    cos_sin = rope_cos_sin_cache(d, 10000.0, None, 64, device=torch.device(device))
    return x, w, b, positions, slots, k_cache, v_cache, cos_sin


def _unfused(x, w, b, positions, slots, k_cache, v_cache, cos_sin, nq, nkv, cfg):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    qkv = skinny_gemm(x, w, b, config=cfg)
    q, k, v = qkv.view(x.shape[0], nq + 2 * nkv, -1).split_with_sizes((nq, nkv, nkv), 1)
    rope_kv_write(positions, q, k, v, cos_sin, k_cache, v_cache, slots, q_out=q, k_out=k)
    return qkv, k_cache, v_cache


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m,bias", [(1, False), (3, True), (5, False)])
def test_equals_skinny_gemm_then_rope_kv_write(device, name, m, bias):
    cfg = CONFIGS[name]
    nq, nkv, d = 4, 2, 32
    x, w, b, pos, slots, kc, vc, cs = _problem(m, nq, nkv, d, 48, torch.bfloat16, device, seed=m, bias=bias)
    want_qkv, want_k, want_v = _unfused(x, w, b, pos, slots, kc, vc, cs, nq, nkv, cfg)
    before_k, before_v = kc.clone(), vc.clone()
    qkv = skinny_rope_kv(x, w, b, pos, cs, kc, vc, slots, nq, nkv, config=cfg)
    assert torch.equal(qkv, want_qkv)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    # only the real rows' slots changed
    written = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    flat_k, flat_before = kc.view(-1, nkv, d).cpu(), before_k.view(-1, nkv, d).cpu()
    assert torch.equal(flat_k[~written], flat_before[~written])
    assert torch.equal(vc.view(-1, nkv, d).cpu()[~written], before_v.view(-1, nkv, d).cpu()[~written])


@pytest.mark.parametrize("name", ["fma_row", "dot"])
def test_float16_and_mha(device, name):
    """float16, and as many KV heads as query heads (no grouping)."""
    cfg = CONFIGS[name]
    nq = nkv = 2
    x, w, b, pos, slots, kc, vc, cs = _problem(2, nq, nkv, 16, 40, torch.float16, device, seed=7, bias=True)
    want_qkv, want_k, want_v = _unfused(x, w, b, pos, slots, kc, vc, cs, nq, nkv, cfg)
    qkv = skinny_rope_kv(x, w, b, pos, cs, kc, vc, slots, nq, nkv, config=cfg)
    assert torch.equal(qkv, want_qkv) and torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_what_qualifies(device):
    pool = torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16)
    assert rope_kv_fusable(SkinnyConfig(1, 8, 512, 1, 4, 1, False), 128, pool, False, False)
    assert not rope_kv_fusable(SkinnyConfig(1, 8, 512, 2, 4, 1, False), 128, pool, False, False)  # split-K
    assert not rope_kv_fusable(SkinnyConfig(1, 8, 512, 1, 4, 1, False), 128, pool, True, False)  # FP8 pool
    assert not rope_kv_fusable(SkinnyConfig(1, 8, 512, 1, 4, 1, False), 128, pool, False, True)  # q/k norm
    assert not rope_kv_fusable(SkinnyConfig(1, 64, 512, 1, 4, 1, False), 48, pool, False, False)  # 32 ∤ 24
    assert not rope_kv_fusable(SkinnyConfig(1, 8, 512, 1, 4, 1, False), 128, pool.float(), False, False)


def test_bad_arguments_are_refused(device):
    nq, nkv, d = 4, 2, 32
    x, w, b, pos, slots, kc, vc, cs = _problem(2, nq, nkv, d, 48, torch.bfloat16, device, seed=3)
    cfg = CONFIGS["fma_row"]
    with pytest.raises(ValueError, match="N"):
        skinny_rope_kv(x, w[:-d], None, pos, cs, kc, vc, slots, nq, nkv, config=cfg)
    with pytest.raises(ValueError, match="H_kv"):
        skinny_rope_kv(x, w, None, pos, cs, kc[:, :, :1], vc[:, :, :1], slots, nq, nkv, config=cfg)
    with pytest.raises(ValueError, match="positions"):
        skinny_rope_kv(x, w, None, pos[:1], cs, kc, vc, slots, nq, nkv, config=cfg)
    with pytest.raises(ValueError, match="split-K"):
        skinny_rope_kv(x, w, None, pos, cs, kc, vc, slots, nq, nkv, config=SkinnyConfig(1, 8, 16, 2, 1, 1, False))
    with pytest.raises(ValueError, match="v_cache"):
        skinny_rope_kv(x, w, None, pos, cs, kc, vc[:1], slots, nq, nkv, config=cfg)


def _model_config(nq=4, nkv=2, d=32, hidden=48):
    return ModelConfig("llama", vocab_size=64, hidden_size=hidden, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=nq, num_key_value_heads=nkv, head_dim=d, max_position_embeddings=64,
                       rms_norm_eps=EPS)


class _Meta:
    """The fields norm_qkv_rope reads (host_seq_lens None: slots may hold -1 padding)."""

    def __init__(self, slots):
        self.slot_mapping = slots
        self.host_seq_lens = None


def test_op_tables_compose_the_same_ops(device, monkeypatch):
    """The torch table's norm_qkv_rope is norm_linear + rope_and_write_kv; the triton table's
    equals its own separate ops (on the CPU, with no skinny table, it is that composition)."""
    nq, nkv, d = 4, 2, 32
    x, w, b, pos, slots, kc, vc, _ = _problem(2, nq, nkv, d, 48, torch.bfloat16, device, seed=11, bias=True)
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    g = (1 + 0.2 * torch.randn(48, generator=torch.Generator().manual_seed(2))).to(x)
    meta = _Meta(slots)
    for ops in (TorchOps(_model_config(), device=x.device, dtype=x.dtype, max_positions=64),
                TritonOps(_model_config(), device=x.device, max_positions=64)):
        k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        q, k, v, res = ops.norm_qkv_rope(x, r, g, EPS, w, b, (nq, nkv, d), pos, k1, v1, meta)
        qkv, res_ref = ops.norm_linear(x, r, g, EPS, w, b)
        q_ref, k_ref, v_ref = qkv.view(2, nq + 2 * nkv, d).split_with_sizes((nq, nkv, nkv), 1)
        q_ref, k_ref = ops.rope_and_write_kv(pos, q_ref, k_ref, v_ref, k2, v2, meta)
        for got, want in ((q, q_ref), (k, k_ref), (v, v_ref), (res, res_ref), (k1, k2), (v1, v2)):
            assert torch.equal(got, want), ops.name
        assert q.shape == (2, nq, d) and k.shape == v.shape == (2, nkv, d)


def _gpu_table(monkeypatch, entries):
    from llmesh.bench_results import device_tag

    monkeypatch.setitem(TUNED, device_tag(torch.device("cuda", torch.cuda.current_device())), entries)


@pytest.mark.skipif(not CUDA, reason="the fused op dispatches only on CUDA, by the measured table")
def test_triton_table_dispatches_by_skinny_table(monkeypatch):
    from llmesh.bench_results import device_tag

    nq, nkv, d, k = 4, 2, 32, 256
    n = (nq + 2 * nkv) * d
    x, w, b, pos, slots, kc, vc, _ = _problem(1, nq, nkv, d, k, torch.bfloat16, "cuda", seed=13, bias=True)
    g = torch.ones(k, dtype=x.dtype, device="cuda")
    cfg = SkinnyConfig(1, 8, 128, 1, 4, 1, False)
    _gpu_table(monkeypatch, {(n, k, 1): tuple(cfg.__dict__.values())})
    tag = device_tag(x.device)
    monkeypatch.setitem(FUSED_SLOWER, tag, {(n, k, 1)})
    assert rope_epilogue_config(x, w, d, kc, False, False) == cfg
    assert rope_epilogue_config(x, w, d, kc, True, False) is None  # FP8 pool: two kernels
    assert rope_epilogue_config(torch.cat([x, x]), w, d, kc, False, False) is None  # M = 2: no entry
    monkeypatch.setitem(FUSED_SLOWER, tag, set())
    assert rope_epilogue_config(x, w, d, kc, False, False) is None  # the norm prologue keeps its fusion
    monkeypatch.setitem(FUSED_SLOWER, tag, {(n, k, 1)})

    monkeypatch.setenv(FUSED_DECODE_ENV, "1")
    ops = TritonOps(_model_config(nq, nkv, d, k), device=x.device, max_positions=64)
    meta = _Meta(slots)
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    got = ops.norm_qkv_rope(x, None, g, EPS, w, b, (nq, nkv, d), pos, k1, v1, meta)
    want = compose_norm_qkv_rope(ops, x, None, g, EPS, w, b, (nq, nkv, d), pos, k2, v2, meta)
    for a, c in zip((*got, k1, v1), (*want, k2, v2)):
        assert torch.equal(a, c)


@pytest.mark.skipif(not CUDA, reason="Llama-sized shapes and CUDA graphs need a GPU")
def test_llama_8b_shape_with_the_h200_config_in_a_cuda_graph():
    """Llama-3-8B's qkv (32 q / 8 KV heads of 128, K = 4096) with the H200 table's batch-1
    config, captured in a CUDA graph and replayed at new positions and slots."""
    cfg = SkinnyConfig(1, 8, 512, 1, 4, 1, False)
    nq, nkv, d = 32, 8, 128
    x, w, b, pos, slots, kc, vc, cs = _problem(1, nq, nkv, d, 4096, torch.bfloat16, "cuda", seed=17,
                                               blocks=64, block_size=16)
    cs = rope_cos_sin_cache(d, 500000.0, None, 4096, device=torch.device("cuda"))

    def step():
        return skinny_rope_kv(x, w, None, pos, cs, kc, vc, slots, nq, nkv, config=cfg)

    graph, out = capture(step)
    kc_ref, vc_ref = kc.clone(), vc.clone()  # after the warm-up call's writes
    for seed, p, s in ((1, 7, 100), (2, 3000, 513)):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        pos.fill_(p)
        slots.fill_(s)
        graph.replay()
        want_qkv, kc_ref, vc_ref = _unfused(x, w, None, pos, slots, kc_ref, vc_ref, cs, nq, nkv, cfg)
        torch.cuda.synchronize()
        assert torch.equal(out, want_qkv)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)

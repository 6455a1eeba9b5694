"""Expert parallelism (``enable_expert_parallel``): each rank holds whole experts, runs only
the (token, expert) pairs routed to them, and the ranks' partial outputs sum to the whole
layer's. Checked at three levels: the fused kernel with pairs of other ranks' experts (id -1)
against the torch reference; one MoE block split over ranks against the unsplit block (in one
process, both op tables); and the engine with tensor_parallel_size=2 over gloo (two real
processes) against one process, token for token in float32 (and on two GPUs, bfloat16 logits
within a tolerance)."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from llmesh.engine import LLM, SamplingParams
from llmesh.engine.errors import ModelLoadError
from llmesh.engine.loader import load_model
from llmesh.engine.model.moe import SparseMoeBlock, moe_tensor_name
from llmesh.engine.model.ops import make_ops
from llmesh.engine.model.shard import ShardSpec
from llmesh.kernels.fused_moe import fused_moe, moe_align_block_size
from llmesh.kernels.fused_moe_config import MoEConfig
from llmesh.kernels.fused_moe_ref import fused_moe_ref
from tests.fixtures.tiny_models import MOE_ARCHS, build_tiny_model

PROMPTS = [[11, 42, 7, 300, 12], [5, 99, 23, 64, 128, 256], [3] * 40]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-moe-ep")
    return {arch: build_tiny_model(str(root / arch), arch) for arch in MOE_ARCHS}


# ---- the kernel with pairs held elsewhere -------------------------------------------------
def test_align_puts_foreign_pairs_in_one_trailing_run():
    gen = torch.Generator().manual_seed(0)
    t, e, k, block_m = 29, 4, 2, 16
    ids = torch.randint(-1, e, (t, k), generator=gen)  # -1: another rank's expert
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_m, e)
    flat = ids.flatten()
    counts = torch.bincount(flat[flat >= 0], minlength=e)
    local_end = int(((counts + block_m - 1) // block_m * block_m).sum())
    foreign = int((flat < 0).sum())
    assert int(num_post) == local_end + -(-foreign // block_m) * block_m
    run = sorted_ids[local_end:int(num_post)]
    assert run[run < flat.numel()].tolist() == torch.nonzero(flat < 0).flatten().tolist()
    assert (expert_ids[local_end // block_m:] == -1).all()
    assert set(expert_ids[: local_end // block_m].tolist()) == set(torch.nonzero(counts).flatten().tolist())


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty hands out float tensors full of NaN while the test runs, so a kernel output
    it leaves unwritten shows (fresh memory is often zero already, and a missing zero-fill
    would pass). Returns the number of tensors poisoned so far."""
    real_empty = torch.empty
    poisoned = []

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
            poisoned.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return poisoned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_skips_foreign_pairs_like_the_reference(dtype, poisoned_empty):
    gen = torch.Generator().manual_seed(1)
    t, e, k, h, inter = 23, 4, 2, 64, 32
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=gen) / inter ** 0.5).to(dtype)
    weights = torch.softmax(torch.randn(t, k, generator=gen), dim=-1).to(dtype)
    ids = torch.randint(-1, e, (t, k), generator=gen)
    ids[0] = -1  # a token none of whose experts is here: its output row is exactly zero
    cfg = MoEConfig(block_m=16, block_n=32, block_k=32)
    got = fused_moe(x, w13, w2, weights, ids, config=cfg, down_config=cfg)
    assert (t * k, h) in poisoned_empty  # the per-pair output buffer started as NaN
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    assert torch.equal(got[0], torch.zeros(h, dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


# ---- one block split over ranks -----------------------------------------------------------
def _blocks(path: str, layer: int, world: int) -> tuple[SparseMoeBlock, list[SparseMoeBlock], object]:
    """The unsplit MoE block of ``layer`` and its ``world`` expert-parallel shards."""
    loaded = load_model(path)
    cfg = loaded.config

    def new(shard: ShardSpec | None) -> SparseMoeBlock:
        return SparseMoeBlock.empty(cfg, torch.zeros(cfg.num_experts, dtype=torch.int64), linear_method="none",
                                    dtype=torch.float32, device=torch.device("cpu"), shard=shard)

    whole = new(None)
    parts = [new(ShardSpec(r, world, expert_parallel=True)) for r in range(world)]
    for name, t in loaded.weights:
        if (moe := moe_tensor_name(name)) is not None and moe[0] == layer:
            for block in (whole, *parts):
                block.load(*moe[1:], t)
    for block in (whole, *parts):
        assert block.missing(layer) == []
    return whole, parts, cfg


@pytest.mark.parametrize("arch, world, ops_name", [
    ("mixtral", 2, "torch"), ("qwen3_moe", 4, "torch"),
    ("qwen2_moe", 2, "torch"),  # the shared expert: column/row-parallel, its partials sum too
    ("mixtral", 2, "triton"),   # the fused kernel (Triton's interpreter on the CPU)
])
def test_rank_partials_sum_to_the_whole_block(moe_dirs, arch, world, ops_name):
    path = moe_dirs[arch]
    loaded = load_model(path)
    layer = loaded.config.sparse_layers[0]
    whole, parts, cfg = _blocks(path, layer, world)
    per = cfg.num_experts // world
    for r, block in enumerate(parts):
        assert (block.expert_start, block.expert_end) == (r * per, (r + 1) * per)
        assert block.experts.w13.shape[0] == per and block.experts.w2.shape[0] == per  # only its own experts
        torch.testing.assert_close(block.experts.w13, whole.experts.w13[r * per:(r + 1) * per], rtol=0, atol=0)
    ops = make_ops(ops_name, cfg, device=torch.device("cpu"), dtype=torch.float32, max_positions=64)
    x = torch.randn(13, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    counted = torch.ones(13, dtype=torch.int64)
    norm = torch.ones(cfg.hidden_size)
    full, _ = whole.forward(ops, x, None, norm, 1e-6, counted)
    summed = sum(block.forward(ops, x, None, norm, 1e-6, counted)[0] for block in parts)
    torch.testing.assert_close(summed, full, atol=1e-5, rtol=1e-5)
    # Every rank counts every expert by its global id: each rank's counts are the whole block's.
    assert int(whole.expert_tokens.sum()) == 13 * cfg.num_experts_per_tok
    for block in parts:
        assert torch.equal(block.expert_tokens, whole.expert_tokens)


def test_expert_range_refuses_an_uneven_split():
    assert ShardSpec(1, 2, expert_parallel=True).expert_range(8) == (4, 8)
    assert ShardSpec(1, 2).expert_range(8) == (0, 8)  # tensor parallelism alone: no expert split
    with pytest.raises(ValueError, match=r"enable_expert_parallel: num_experts \(8\) must be divisible by "
                                         r"tensor_parallel_size \(3\)"):
        ShardSpec(0, 3, expert_parallel=True).expert_range(8)


# ---- the engine over two processes ----------------------------------------------------------
def _generate(model: str, **kw) -> tuple[list[list[int]], torch.Tensor, list[int]]:
    """Greedy tokens of PROMPTS, rank 0's expert counts [sparse layers, E] and its experts per layer."""
    llm = LLM(model, **{"dtype": "float32", "device": "cpu", "max_model_len": 256, "num_kv_blocks": 64, **kw})
    try:
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        model = llm.engine.runner.model
        return tokens, model.expert_tokens.clone(), [layer.moe.experts.w13.shape[0] for layer in model.layers
                                                     if layer.moe is not None]
    finally:
        llm.engine.core.shutdown()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_tp2_with_expert_parallel_gives_tp1_tokens(moe_dirs, arch):
    path = moe_dirs[arch]
    # 16-token steps chunk the 40-token prompt: mixed prefill/decode steps route through both ranks.
    kw = dict(max_num_batched_tokens=16)
    got, counts, held = _generate(path, tensor_parallel_size=2, enable_expert_parallel=True, **kw)
    want, want_counts, whole = _generate(path, **kw)
    assert got == want
    assert held == [n // 2 for n in whole]  # rank 0 loaded half of each layer's experts
    assert torch.equal(counts, want_counts)  # llmesh_engine_expert_tokens_total: each expert once


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_expert_parallel_on_gpus_with_cuda_graphs_gives_tp1_tokens(moe_dirs):
    # NCCL, the fused kernel with id -1 pairs inside captured decode and mixed graphs.
    pytest.importorskip("triton")
    kw = dict(device="cuda", backend="triton", max_num_seqs=8)
    got, counts, _ = _generate(moe_dirs["qwen3_moe"], tensor_parallel_size=2, enable_expert_parallel=True, **kw)
    want, want_counts, _ = _generate(moe_dirs["qwen3_moe"], **kw)
    assert got == want
    assert torch.equal(counts, want_counts)


BF16_FIRST_EQUAL = 1
BF16_LOGIT_ERROR_MEAN, BF16_LOGIT_ERROR_MAX = 0.05, 0.3
"""bfloat16, two ranks against one: the ranks' partial outputs are summed by an all-reduce in
bfloat16 (one more rounding of each layer's output, 2^-9 relative, in another order), so
logits differ slightly; a near-tie in the router can send a token to another expert, hence the
looser largest error. A rank missing its experts' share gives errors of order 1."""


def _logits_per_step(model: str, **kw) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy tokens and float32 logits per step of each of PROMPTS, one prompt at a time (so a
    step's first logits row is that prompt's)."""
    llm = LLM(model, **{"max_model_len": 256, "num_kv_blocks": 64, **kw})
    try:
        tokens, logits = [], []
        for p in PROMPTS:
            seen: list[torch.Tensor] = []
            llm.engine.runner.logits_observer = lambda reqs, lg: seen.append(lg[0].float().cpu())
            tokens.append(llm.generate([p], GREEDY)[0].token_ids)
            logits.append(seen)
        return tokens, logits
    finally:
        llm.engine.core.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_expert_parallel_bfloat16_logits_track_tp1(moe_dirs):
    pytest.importorskip("triton")
    kw = dict(device="cuda", backend="triton", dtype="bfloat16", max_num_seqs=8)
    path = moe_dirs["qwen3_moe"]
    got, got_logits = _logits_per_step(path, tensor_parallel_size=2, enable_expert_parallel=True, **kw)
    want, want_logits = _logits_per_step(path, **kw)
    errors = []
    for g, w, gl, wl in zip(got, want, got_logits, want_logits):
        common = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w))
        assert common >= BF16_FIRST_EQUAL, f"two ranks {g} left one rank's {w} at token {common}"
        # steps up to and including the first difference saw the same tokens on both sides
        errors += [((a - b).norm() / b.norm()).item() for a, b in zip(gl[:common + 1], wl[:common + 1])]
    assert sum(errors) / len(errors) <= BF16_LOGIT_ERROR_MEAN and max(errors) <= BF16_LOGIT_ERROR_MAX, errors


def test_indivisible_expert_count_is_refused_before_any_worker_starts(tmp_path):
    path = build_tiny_model(str(tmp_path / "mixtral5"), "mixtral", num_local_experts=5)
    children = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ModelLoadError, match=r"enable_expert_parallel: num_experts \(5\) must be divisible by "
                                             r"tensor_parallel_size \(2\)"):
        _generate(path, tensor_parallel_size=2, enable_expert_parallel=True)
    assert {p.pid for p in multiprocessing.active_children()} <= children, "a worker was started"

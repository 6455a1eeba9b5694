"""The triton runner's start-up pass over the steps too large for a CUDA graph: which sizes it
steps through, the synthetic steps it builds, that they run the eager path's kernels (dense
prompts' attention and a mixed batch's) and write nothing to the K/V pool, and, on a GPU, that
after it no step a request makes compiles a Triton kernel (on an H100 the first offline run of
Qwen3-30B-A3B made eight specializations in its eager steps, 5.4 s of a 29 s run:
bench/results/moe_h100_order1_engine.json)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package")

from llmesh.engine import LLMEngine, SamplingParams, build_engine_config  # noqa: E402
from llmesh.engine.step_inputs import warmup_step  # noqa: E402
from llmesh.engine.triton_runner import eager_warmup_sizes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_sizes_are_both_ends_of_each_power_of_two_bucket_past_the_graphs():
    assert eager_warmup_sizes(2048, 8192) == [2049, 4096, 4097, 8192]
    assert eager_warmup_sizes(2048, 3000) == [2049, 3000]  # the bucket (2048, 4096] as far as a step reaches
    assert eager_warmup_sizes(2048, 2048) == []  # every step fits a graph
    assert eager_warmup_sizes(2048, 16384)[-2:] == [8193, 16384]
    assert eager_warmup_sizes(0, 5) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("decode_row", [False, True])
def test_warmup_step_is_prompts_of_at_most_max_len_that_write_nothing(decode_row):
    step = warmup_step(37, max_seqs=8, max_len=16, block_size=8, decode_row=decode_row)
    qsl, lens = step.query_start_loc, step.seq_lens
    assert step.num_tokens == qsl[-1] == 37 and step.num_seqs == len(lens) == len(qsl) - 1
    query = np.diff(qsl)
    assert (lens <= 16).all() and (query >= 1).all()
    assert (step.slot_mapping == -1).all() and len(step.logits_indices) == 0 and not step.sampling_requests
    assert (step.table_lens * 8 >= lens).all() and len(step.block_ids) == step.table_lens.sum()
    assert (step.block_ids == 0).all()
    assert step.max_query_len == query.max() and step.max_seq_len == lens.max()
    expect_positions = np.concatenate([np.arange(n - q, n) for n, q in zip(lens, query)])
    assert (step.positions == expect_positions).all()
    if decode_row:  # one decode after one cached token, then fresh prompts
        assert query[0] == 1 and lens[0] == 2 and (query[1:] == lens[1:]).all()
    else:  # fresh prompts only: the dense prefill path's condition
        assert (query == lens).all()


def test_warmup_step_refuses_what_no_step_could_hold():
    with pytest.raises(ValueError, match="more than 2"):
        warmup_step(40, max_seqs=3, max_len=16, block_size=8, decode_row=True)
    with pytest.raises(ValueError, match="holds no prompt"):
        warmup_step(1, max_seqs=3, max_len=16, block_size=8, decode_row=True)


def _counting(monkeypatch, module, name: str) -> list[int]:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_warmup_runs_both_eager_attention_paths_and_leaves_the_pool_and_counts_clean(tiny_model_dirs, monkeypatch):
    """The pass called directly on a runner without graphs (on the CPU through Triton's
    interpreter), with one 16-token bucket standing for the graphs: steps of 17 and 24 tokens,
    each as fresh prompts (dense causal attention) and as a mixed batch (extend attention)."""
    from llmesh.engine.model import ops_triton

    dense = _counting(monkeypatch, ops_triton, "dense_causal_attention")
    extend = _counting(monkeypatch, ops_triton, "extend_attention")
    engine = LLMEngine(build_engine_config(tiny_model_dirs["llama"], dtype="float32", device=DEVICE, backend="triton",
                                           block_size=8, num_kv_blocks=16, max_model_len=16, cuda_graphs=False,
                                           max_num_batched_tokens=24, max_num_seqs=4))
    runner = engine.runner
    runner.mixed_buckets = [16]
    assert not dense and not extend
    with torch.inference_mode():
        sizes = runner._warm_eager_steps()
    assert sizes == [17, 24]
    assert len(dense) == 2 * runner.cfg.num_hidden_layers and len(extend) == 2 * runner.cfg.num_hidden_layers
    assert not runner.kv_caches.any(), "a warm-up step wrote to the K/V pool"
    assert runner.stats.eager_steps == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles kernels (and graphs exist) on a GPU only")
def test_no_request_step_compiles_a_kernel_after_start_up(tmp_path):
    """A tiny Qwen3-MoE (the sorted MoE align path and the grouped GEMM in every eager step):
    eager steps of assorted sizes, fresh prompts and prompts beside decodes, and the greedy
    sampler's first call make no Triton specialization once the engine has started."""
    sys.path.insert(0, str(ROOT / "bench"))
    from jit_watch import JitWatch

    from tests.fixtures.tiny_models import build_tiny_model

    path = build_tiny_model(str(tmp_path / "qwen3_moe"), "qwen3_moe")
    engine = LLMEngine(build_engine_config(path, device="cuda", backend="triton", dtype="bfloat16",
                                           max_model_len=1024, max_num_batched_tokens=4096, max_num_seqs=8,
                                           num_kv_blocks=1024))
    assert engine.runner.use_graphs and engine.runner.mixed_buckets[-1] == 2048
    rng = random.Random(3)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    waves = [[1000, 1000, 601], [999, 1000, 1000, 1000, 97], [700, 700, 700, 333]]
    with JitWatch() as jit:
        for i, wave in enumerate(waves):
            if i == 2:  # two requests decode while the wave's prompts prefill: a mixed eager step
                for _ in range(2):
                    engine.add_request([rng.randrange(3, 500) for _ in range(9)],
                                       SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
                engine.step()
                engine.step()
            for length in wave:
                engine.add_request([rng.randrange(3, 500) for _ in range(length)], params)
            while engine.has_unfinished_requests():
                engine.step()
    assert jit.available
    assert engine.runner.stats.eager_steps >= 3, engine.runner.stats
    assert jit.count == 0, f"kernels compiled inside requests' steps: {jit.summary()}\n" + "\n".join(jit.variants)

"""The CUDA C++ kernels (llmesh/kernels/cuda/) inside the engine's decode graphs, launched with
programmatic dependent launch (PDL) among the Triton kernels: the one-row GEMV of every bf16
projection at batch 1, the one-token MoE layer, the INT4 fragment-order GEMM. The greedy tokens
of a graph replay are those of the eager steps, on every run.

Under PDL a kernel's blocks start while the kernel before still runs. One that then read its
activations on the read-only path (ld.global.nc, what a `const __restrict__` pointer's plain
read compiles to) got rows of the layer before in the graphs, where one layer's buffers are the
next one's and kernels follow each other within a microsecond, and never in eager steps, where
the host's launch gap hides it: the tokens changed from run to run (cuda/common.cuh, ld_act). A
kernel test of one launch cannot see it."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package")

from llmesh.engine import LLM, SamplingParams  # noqa: E402
from llmesh.kernels import moe_gemv  # noqa: E402
from tests.fixtures.tiny_models import build_tiny_model  # noqa: E402

RUNS = 3
MMA_CONFIGS = {"staged": "1,1,2,1", "fragments": "1,1,2,1,0,8,1"}
"""w4a16_mma configs the INT4 cases dispatch every one-row projection to: x staged in shared
memory (xload 0), and each lane's fragments of x read straight from global memory (xload 1)."""


def _tokens(path: str, prompts, graphs: bool, **kw) -> list[list[list[int]]]:
    """RUNS passes over the prompts, one request at a time (batch 1: every projection one row)."""
    llm = LLM(path, device="cuda", backend="triton", dtype="bfloat16", cuda_graphs=graphs, num_kv_blocks=128,
              max_model_len=256, **kw)
    assert llm.engine.runner.use_graphs == graphs
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    return [[llm.generate([p], params)[0].token_ids for p in prompts] for _ in range(RUNS)]


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _int4_on_mma(monkeypatch, config: str) -> list[int]:
    """Every plain INT4 projection at one row on w4a16_mma with ``config`` (the measured table
    names none of the tiny model's shapes); its calls counted."""
    from llmesh.engine.quant import mma_weights
    from llmesh.kernels import quant_gemm_config

    def choice(device, kind, m, n, k):
        return ("mma", (config,)) if kind == "w4a16" and m == 1 else None

    monkeypatch.setattr(quant_gemm_config, "tuned_choice", choice)
    monkeypatch.setattr(quant_gemm_config, "tuned_choices_any_m",
                        lambda device, kind, n, k: {("mma", (config,))} if kind == "w4a16" else set())
    return _count_calls(monkeypatch, mma_weights, "w4a16_mma")


CASES = [("llama", "auto", None, None), ("llama", "fp8", None, None), ("qwen3_moe", "auto", None, None),
         ("qwen3_moe", "auto", None, "norm_router"), ("qwen3_moe", "auto", None, "router_gemv"),
         ("llama", "auto", "staged", None), ("llama", "auto", "fragments", None)]
"""(architecture, KV cache dtype, the INT4 kernel's x path or None for bf16 weights, the MoE entry
feeding the CUDA MoE layer: the three ops, or moe_norm_router's one Triton kernel, or the norm then
router_gemv's one CUDA launch for the router's GEMV and choice)"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels inside CUDA graphs: need a GPU")
@pytest.mark.parametrize("arch,kv_cache_dtype,int4,entry_kind", CASES)
def test_graph_replays_give_the_eager_steps_tokens_with_the_cuda_kernels(tmp_path, monkeypatch, arch,
                                                                         kv_cache_dtype, int4, entry_kind):
    probe = torch.zeros(1, 64, dtype=torch.bfloat16, device="cuda")
    if (why := moe_gemv.dense_unsupported(probe, torch.zeros(8, 64, dtype=torch.bfloat16, device="cuda"))):
        pytest.skip(f"the CUDA GEMV: {why}")
    monkeypatch.setenv(moe_gemv.DENSE_ENV, "1")
    monkeypatch.setenv(moe_gemv.ENV, "1")
    kw: dict = dict(kv_cache_dtype=kv_cache_dtype)
    entry: list[int] = []
    if entry_kind == "norm_router":
        from llmesh.kernels import moe_norm_router

        monkeypatch.setattr(moe_norm_router, "NORM_ROUTER_MAX_TOKENS", 64)
        entry = _count_calls(monkeypatch, moe_norm_router, "norm_router")
    elif entry_kind == "router_gemv":
        from llmesh.kernels import router_gemv

        monkeypatch.setenv(router_gemv.ENV, "1")
        entry = _count_calls(monkeypatch, router_gemv, "router")
    if int4 is None:
        dense = _count_calls(monkeypatch, moe_gemv, "gemv")
        layer = _count_calls(monkeypatch, moe_gemv, "moe_gemv")
    else:
        mma = _int4_on_mma(monkeypatch, MMA_CONFIGS[int4])
        kw["quantization"] = "int4"
    path = build_tiny_model(str(tmp_path / arch), arch)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 40))] for _ in range(6)]
    eager = _tokens(path, prompts, graphs=False, **kw)
    graphs = _tokens(path, prompts, graphs=True, **kw)
    if int4 is None:
        assert dense and (layer or arch != "qwen3_moe"), "the CUDA kernels never ran"
        assert entry or not entry_kind, f"the MoE entry's {entry_kind} never ran"
    else:
        assert mma, "w4a16_mma never ran"
    assert all(run == eager[0] for run in eager), "eager steps differ from run to run"
    for i, run in enumerate(graphs):
        assert run == eager[0], f"graph replay run {i} left the eager tokens"

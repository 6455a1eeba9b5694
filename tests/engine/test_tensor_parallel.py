"""Tensor parallelism on the CPU: two real processes joined by gloo give the tokens of one
process; a dying worker ends the engine core like a dying core; shards of packed weights
are the matching parts of the whole weight."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import pytest
import torch

from llmesh.engine import LLM, AsyncLLM, SamplingParams, build_engine_config
from llmesh.engine.errors import EngineDeadError, ModelLoadError
from llmesh.engine.model.shard import ShardSpec, slice_in_features, slice_out_features
from llmesh.engine.quant.quantize import quantize_fp8, quantize_int4, quantize_int8
from llmesh.engine.quant.packed import Int8Weight

PROMPTS = [[11, 42, 7, 300, 12], [5, 99, 23, 64, 128, 256], [3] * 40]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _generate(model: str, **kw) -> list[list[int]]:
    llm = LLM(model, **{"dtype": "float32", "device": "cpu", "max_model_len": 256, "num_kv_blocks": 64, **kw})
    try:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.engine.core.shutdown()


@pytest.mark.parametrize("arch, kw", [
    # qkv bias (column-parallel bias); async scheduling: decode inputs reach the worker by
    # broadcast from rank 0's sampled ids; 16-token steps chunk the 40-token prompt.
    ("qwen2", dict(async_scheduling=True, max_num_batched_tokens=16)),
    # int8 quantize-on-load: per-channel scales split with the columns, whole on row shards
    ("llama", dict(quantization="int8")),
])
def test_tp2_greedy_tokens_equal_tp1(tiny_model_dirs, arch, kw):
    model = tiny_model_dirs[arch]
    assert _generate(model, tensor_parallel_size=2, **kw) == _generate(model, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_on_gpus_with_cuda_graphs_gives_tp1_tokens(tiny_model_dirs):
    # NCCL, the triton backend, decode and mixed steps replayed from graphs that hold the
    # all-reduces, async scheduling (decode inputs broadcast from rank 0's sampled ids).
    pytest.importorskip("triton")
    model = tiny_model_dirs["llama"]
    kw = dict(device="cuda", backend="triton", async_scheduling=True, max_num_seqs=8)
    llm = LLM(model, dtype="float32", max_model_len=256, num_kv_blocks=64, tensor_parallel_size=2, **kw)
    assert llm.engine.runner.use_graphs
    try:
        got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        stats = llm.engine.runner.stats
        assert stats.decode_graph_steps > 0
    finally:
        llm.engine.core.shutdown()
    assert got == _generate(model, **kw)


def test_int4_shard_off_a_group_boundary_is_refused(tiny_llama):
    # o_proj has 128 input features in one INT4 group of 128: two ranks would cut it at 64.
    with pytest.raises(Exception, match="shard boundary must be a group boundary"):
        _generate(tiny_llama, tensor_parallel_size=2, quantization="int4")


def test_heads_not_divisible_by_the_ranks_are_refused(tiny_llama):
    from llmesh.engine.loader import load_model
    from llmesh.engine.model.llama import LlamaForCausalLM

    loaded = load_model(tiny_llama)  # 4 q heads, 2 KV heads: 3 ranks cannot split them
    with pytest.raises(ModelLoadError, match=r"num_attention_heads \(4\) must be divisible by tensor_parallel_size"):
        LlamaForCausalLM(loaded.config, loaded.weights, shard=ShardSpec(0, 3))


def _worker_pids(core) -> list[int]:
    return [p.pid for p in core.tp.procs]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_killed_worker_ends_streams_and_the_core(tiny_llama):
    engine = AsyncLLM(build_engine_config(tiny_llama, dtype="float32", device="cpu", max_model_len=256,
                                          num_kv_blocks=64, tensor_parallel_size=2))
    core_pid = engine.core_pid
    try:
        async def main():
            (worker,) = await engine.call(_worker_pids)
            params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            agens = [engine.generate([7] * 20, params, request_id=f"w{i}") for i in range(2)]
            for agen in agens:
                assert (await agen.__anext__()).token_ids
            os.kill(worker, signal.SIGKILL)
            t0 = time.monotonic()
            for agen in agens:
                with pytest.raises(EngineDeadError, match="tensor-parallel worker rank 1 .*killed by SIGKILL"):
                    async for _ in agen:
                        pass
            assert time.monotonic() - t0 < 10.0
            assert engine.dead is not None and not engine.has_work
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate([1, 2, 3], params, request_id="after"):
                    pass
            deadline = time.monotonic() + 10
            while _alive(core_pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not _alive(core_pid), "the engine core outlived its worker"

        asyncio.run(main())
    finally:
        engine.shutdown()


# ---- shards of packed weights ------------------------------------------------------------
def test_int4_row_shards_dequantize_to_the_whole_weights_slices():
    torch.manual_seed(0)
    w = torch.randn(48, 512)  # [N, K]: 4 groups of 128 along K
    q = quantize_int4(w)
    whole = q.dequantize()  # [K, N]
    for start, end in ((0, 256), (256, 512), (128, 384)):
        assert torch.equal(slice_in_features(q, start, end).dequantize(), whole[start:end])
    assert torch.equal(slice_out_features(q, 16, 32).dequantize(), whole[:, 16:32])
    with pytest.raises(ValueError, match="group boundary"):
        slice_in_features(q, 64, 320)


def test_int8_shards_keep_their_scales():
    torch.manual_seed(0)
    w = torch.randn(32, 96)
    q = quantize_int8(w)  # per channel: one scale row for the whole K
    whole = q.dequantize()
    assert torch.equal(slice_in_features(q, 48, 96).dequantize(), whole[48:96])
    assert torch.equal(slice_out_features(q, 8, 24).dequantize(), whole[:, 8:24])
    grouped = Int8Weight(q.qweight, torch.rand(3, 32) + 0.5, 32, "q8_0")  # GGUF Q8_0: groups of 32
    assert torch.equal(slice_in_features(grouped, 32, 96).dequantize(), grouped.dequantize()[32:96])
    with pytest.raises(ValueError, match="group boundary"):
        slice_in_features(grouped, 16, 64)


def test_fp8_shards_keep_their_per_channel_scales():
    torch.manual_seed(0)
    q = quantize_fp8(torch.randn(32, 64))  # qweight [N, K], one scale per output channel
    whole = q.dequantize()
    assert torch.equal(slice_in_features(q, 32, 64).dequantize(), whole[32:64])
    assert torch.equal(slice_out_features(q, 8, 24).dequantize(), whole[:, 8:24])


def test_moe_model_is_refused_before_any_worker_starts(tmp_path):
    from tests.fixtures.tiny_models import build_tiny_model

    path = build_tiny_model(str(tmp_path / "mixtral"), "mixtral")
    children = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ModelLoadError, match="mixture-of-experts layers split over ranks only by expert parallelism; set enable_expert_parallel"):
        _generate(path, tensor_parallel_size=2)
    assert {p.pid for p in multiprocessing.active_children()} <= children, "a worker was started"

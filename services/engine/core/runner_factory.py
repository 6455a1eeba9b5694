"""The model runner an engine core (and every tensor-parallel worker) builds from its config."""

from __future__ import annotations

import torch

from llmesh.engine.config import EngineConfig
from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model_runner import ModelRunner, TorchModelRunner
from llmesh.engine.sampler import Sampler


def build_runner(config: EngineConfig, model_config: ModelConfig, weights, *, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, linear_method: str, extra_kv_pools=(),
                 shard=None, step_sender=None, awq_calibration: list[int] | None = None) -> ModelRunner:
    """The configured backend's runner; every tensor-parallel rank builds its own the same way
    (same graphs, same pool size), so their collectives pair up."""
    cache = config.cache
    sampler = Sampler(seed=config.seed, device=device, max_penalty_rows=config.scheduler.max_num_seqs)
    common = dict(device=device, dtype=dtype, block_size=cache.block_size, sampler=sampler, num_blocks=cache.num_kv_blocks,
                  kv_cache_memory=cache.kv_cache_memory, gpu_memory_utilization=cache.gpu_memory_utilization,
                  linear_method=linear_method, extra_kv_pools=extra_kv_pools, shard=shard, step_sender=step_sender,
                  awq_calibration=awq_calibration, kv_cache_dtype=cache.kv_cache_dtype)
    if config.backend == "triton":
        from llmesh.engine.triton_runner import TritonModelRunner

        return TritonModelRunner(model_config, weights, max_model_len=max_model_len,
                                 max_num_seqs=config.scheduler.max_num_seqs,
                                 max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                                 cuda_graphs=config.cuda_graphs, **common)
    return TorchModelRunner(model_config, weights, max_model_len=max_model_len, **common)

"""One step at the engine's limits before it serves (GPU engines).

The largest eager step an engine makes is a prefill of ``max_num_batched_tokens`` tokens that
samples ``max_num_seqs`` rows: its activations, its [rows, vocab] float32 logits and the
sampler's buffers are sized by those two limits. Decode and mixed steps replay graphs whose
memory was taken at capture; the eager path's memory comes from PyTorch's caching allocator,
which grows its pool when a step first needs more. Growing it mid-serving costs device
synchronizations (and, near the memory limit, frees and retries): on the H200 the first
1,000-prompt offline run after a 128-prompt warm-up ran at 11.1k out tok/s and the next runs
at 13.1k and 12.9k (bench/results/decode_8b_h200.json), the first run's large prefill steps
blocking the host for 380-740 ms at launch where later runs queue them in 16-18 ms
(step_timeline_h200.json). vLLM profiles the same step (a dummy forward of the token budget
and a dummy sampler run of max_num_seqs rows) before it serves.

So the engine core runs that step once, on a private KV manager and scheduler (no prefix-cache
entries, no KV events reach the router), before its real scheduler exists: the allocator then
holds memory of the peak sizes, and an engine whose limits do not fit its GPU fails at start
with a message that says which limits to lower, not under load.
"""

from __future__ import annotations

import logging
import time

import torch

from llmesh.engine.config import EngineConfig
from llmesh.engine.errors import EngineError
from llmesh.engine.kv_cache.manager import KVCacheManager
from llmesh.engine.model_runner import ModelRunner
from llmesh.engine.request import Request
from llmesh.engine.sampling_params import SamplingParams
from llmesh.engine.scheduler import Scheduler

log = logging.getLogger("llmesh.engine")

WARM_UP_TOKEN = 11
"""The prompt token (any id of every vocabulary): the step's cost does not depend on it."""


def warm_up_shape(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, num_blocks: int,
                  block_size: int) -> tuple[int, int]:
    """(requests, prompt tokens each) for one step of the whole token budget sampling as many
    rows as the limits allow, within the KV pool (each request holds its prompt's blocks)."""
    length = max(1, min(max_num_batched_tokens // max(1, max_num_seqs), max_model_len - 1))
    per_request_blocks = -(-(length + 1) // block_size)
    seqs = max(1, min(max_num_seqs, max_num_batched_tokens // length, num_blocks // per_request_blocks))
    return seqs, length


def warm_up(runner: ModelRunner, config: EngineConfig, max_model_len: int) -> dict[str, float]:
    """Run the peak eager step (sampling with top-k / top-p, the sampler's largest path) until
    its requests finish; returns what ran. Raises EngineError when the step runs out of memory."""
    sched_cfg = config.scheduler
    seqs, length = warm_up_shape(sched_cfg.max_num_seqs, sched_cfg.max_num_batched_tokens, max_model_len,
                                 runner.num_blocks, config.cache.block_size)
    kv = KVCacheManager(num_blocks=runner.num_blocks, block_size=config.cache.block_size,
                        namespace="warm-up", enable_prefix_caching=False)
    scheduler = Scheduler(sched_cfg, kv)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_k=50, top_p=0.95, seed=0, ignore_eos=True)
    ids = [f"warm-up-{i}" for i in range(seqs)]
    for request_id in ids:
        scheduler.add_request(Request(request_id=request_id, prompt_token_ids=[WARM_UP_TOKEN] * length,
                                      sampling_params=params, max_model_len=max_model_len))
    t0, steps = time.perf_counter(), 0
    try:
        while scheduler.has_unfinished_requests():
            scheduled = scheduler.schedule()
            if scheduled.is_empty:
                break
            scheduler.update_from_output(scheduled, runner.launch(scheduled).result().sampled_token_ids)
            steps += 1
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
    except torch.OutOfMemoryError as exc:
        raise EngineError(
            f"engine warm-up: one step of {seqs * length} tokens sampling {seqs} rows does not fit the GPU "
            f"beside the KV cache ({exc}); lower max_num_batched_tokens or max_num_seqs, or "
            f"gpu_memory_utilization to leave more memory outside the KV cache") from exc
    finally:
        runner.release(ids)
    if scheduler.has_unfinished_requests() or kv.num_used_blocks:
        raise EngineError(f"engine warm-up: {seqs} requests of {length} tokens did not finish in {steps} steps")
    took = {"warm_up_requests": seqs, "warm_up_prompt_tokens": length, "warm_up_steps": steps,
            "warm_up_seconds": round(time.perf_counter() - t0, 3)}
    log.info("engine warmed up", extra=took)
    return took

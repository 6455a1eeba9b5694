"""EngineServiceConfig: everything one engine process needs, from flags and environment."""

from __future__ import annotations

import dataclasses

from llmesh.config import option, require
from llmesh.grpc_server import ServiceConfig


@dataclasses.dataclass
class EngineServiceConfig(ServiceConfig):
    """llmesh engine: serves one model replica over gRPC (Engine service)."""

    model: str = option("demo", "HF folder, .gguf file, or 'demo' for the demo model")
    served_model_name: str | None = option(None, "name clients use (default: the file or folder name)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = option("auto", "float32, bfloat16, float16 or auto")
    backend: str = option("torch", "model runner: torch (reference, CPU or GPU) or triton (Triton kernels, "
                                   "CUDA graphs; GPU)")
    quantization: str = option("auto", "weights in memory: auto, none, int8, int4, fp8 (Ada/Hopper), gguf, awq "
                                       "or gptq (auto: what the checkpoint holds; GGUF blocks kept on a GPU)")
    block_size: int = option(16, "tokens per KV block")
    num_kv_blocks: int | None = option(None, "exact KV pool size in blocks (default: from memory)")
    kv_cache_memory: int | None = option(None, "bytes for the KV pool (default: 90% of free GPU memory, 1 GiB on CPU)")
    max_model_len: int | None = option(None, "cap the window below the model's own")
    max_num_seqs: int = option(64, "cap on running requests")
    max_num_batched_tokens: int = option(2048, "token budget of one scheduler step")
    enable_prefix_caching: bool = option(True, "reuse KV blocks of equal prefixes")
    seed: int = option(0, "seed for unseeded random sampling")
    prefix_index: str | None = option(None, "host:port of the prefix-cache index to publish KV events to")
    instance_id: str | None = option(None, "replica id in the index (default: model@advertise address)")
    advertise_address: str | None = option(None, "host:port the router reaches this engine at (default: bound address)")
    heartbeat_interval_s: float = option(2.0, "seconds between heartbeats to the index")
    heartbeat_ttl_s: float = option(10.0, "the index forgets this replica after this long without a heartbeat")
    stall_timeout_s: float = option(30.0, "report NOT_SERVING when the step loop has work but no step finished for this long")
    fault_step_delay_s: float = option(0.0, "fault injection for tests: sleep this long before every step")
    fault_fail_step_at: int = option(0, "fault injection for tests: the engine core's N-th step raises (0: never)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.heartbeat_interval_s > 0, "heartbeat_interval_s must be > 0")
        require(self.heartbeat_ttl_s > self.heartbeat_interval_s,
                "heartbeat_ttl_s must exceed heartbeat_interval_s or the index forgets live replicas")
        require(self.stall_timeout_s > 0, "stall_timeout_s must be > 0")
        require(self.fault_step_delay_s >= 0, "fault_step_delay_s must be >= 0")
        require(self.fault_fail_step_at >= 0, "fault_fail_step_at must be >= 0")
        require(self.backend in ("torch", "triton"), f"backend must be torch or triton, got {self.backend!r}")
        from llmesh.engine.quant.config import QUANTIZATION_CHOICES

        require(self.quantization in QUANTIZATION_CHOICES,
                f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {self.quantization!r}")

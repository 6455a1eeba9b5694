"""EngineConfig: one root config for an engine, built from small per-area dataclasses.

Every field is documented and validated once, at construction; the engine passes the
pieces down (the scheduler gets SchedulerConfig, the KV cache CacheConfig, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmesh.prefix_hash import DEFAULT_BLOCK_SIZE


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per KV block (and per prefix-hash block)."""
    kv_cache_memory: int | None = None
    """Bytes for the KV pool. None: a fraction of free device memory (GPU) or 1 GiB (CPU)."""
    gpu_memory_utilization: float = 0.90
    """On a GPU with kv_cache_memory unset: fraction of the free memory, after the
    weights are loaded, that the KV pool may take."""
    num_blocks: int | None = None
    """Exact pool size in blocks; overrides the memory budget (tests, benchmarks)."""
    enable_prefix_caching: bool = True
    """Reuse full blocks across requests with equal prefixes."""

    def __post_init__(self) -> None:
        _require(isinstance(self.block_size, int) and 1 <= self.block_size <= 1024,
                 f"block_size must be an integer in [1, 1024], got {self.block_size!r}")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0,
                 f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory!r}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0,
                 f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _require(self.num_blocks is None or self.num_blocks >= 1,
                 f"num_blocks must be ≥ 1, got {self.num_blocks!r}")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    """Token budget of one step: decodes count one each, prefill chunks their length."""
    max_num_seqs: int = 64
    """Cap on running requests."""
    max_model_len: int = 2048
    """The served window: prompt + generated tokens. Resolved from the model if not set."""
    enable_chunked_prefill: bool = True
    """Split long prefills across steps so decodes are never starved."""

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be ≥ 1, got {self.max_num_batched_tokens!r}")
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be ≥ 1, got {self.max_num_seqs!r}")
        _require(self.max_model_len >= 2, f"max_model_len must be ≥ 2, got {self.max_model_len!r}")
        _require(self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
                 "without chunked prefill, max_num_batched_tokens must be ≥ max_model_len "
                 "or long prompts could never be scheduled")


@dataclass
class EngineConfig:
    model: str
    """Path to a Hugging Face model folder or a .gguf file (local files only)."""
    served_model_name: str | None = None
    """Name clients use; defaults to the folder or file name without suffix."""
    dtype: str = "auto"
    """float32, bfloat16, float16 or auto (float32 on CPU, bfloat16 on GPU)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    backend: str = "torch"
    """Model-runner backend: torch (reference, CPU or GPU) or triton (Triton kernels, CUDA
    graphs for decode on a GPU; on the CPU it runs through Triton's interpreter, for tests)."""
    cuda_graphs: bool = True
    """triton backend on a GPU: replay decode steps from captured CUDA graphs."""
    quantization: str = "auto"
    """Weights in memory: auto (what the checkpoint holds: AWQ/GPTQ packed, a GGUF's Q8_0/Q4_x
    blocks kept on a GPU; else full precision), none, int8 (per-channel), int4 (group 128,
    zero points), fp8 (E4M3 W8A8, Ada/Hopper GPUs), gguf, awq or gptq (see quant/config.py)."""
    async_scheduling: bool | None = None
    """Schedule step N+1 and stage its inputs while step N runs on the device, then detokenize
    and check stops for step N while step N+1 computes; a decode's input token is read on the
    device, so the only host-device sync per step is for the sampled tokens. Token for token
    the same output. None: on for the triton backend on a GPU (where host work would
    otherwise idle the GPU), off elsewhere (on the CPU a step's work is the host's anyway)."""
    seed: int = 0
    """Seed of the engine's generator for unseeded random sampling."""
    max_model_len: int | None = None
    """Cap the served window below the model's own (None: the model's)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _require(self.backend in ("torch", "triton"), f"backend must be 'torch' or 'triton', got {self.backend!r}")
        from llmesh.engine.quant.config import QUANTIZATION_CHOICES

        _require(self.quantization in QUANTIZATION_CHOICES,
                 f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {self.quantization!r}")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        _require(self.max_model_len is None or self.max_model_len >= 2,
                 f"max_model_len must be ≥ 2, got {self.max_model_len!r}")

"""EngineConfig: one root config for an engine, built from small per-area dataclasses.

This is the only place an engine option is declared: its type, default, help and
validation. Users see every leaf field as one flat option of the same name (see
``llmesh.config``): the engine service's ``--flag`` and ``LLMESH_ENGINE_<NAME>`` variable,
a key of a models file's ``engine:`` section and a keyword argument of ``LLM(...)``;
docs/configuration.md is generated from here. The engine passes the pieces down (the
scheduler gets SchedulerConfig, the KV cache CacheConfig, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmesh.config import MISSING, derived, group, option, require
from llmesh.prefix_hash import DEFAULT_BLOCK_SIZE

KV_CACHE_DTYPES = ("auto", "fp8")
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}
"""Other spellings accepted (vLLM's), stored as the canonical name."""


@dataclass
class CacheConfig:
    """KV cache: block size, pool size and prefix caching."""

    block_size: int = option(DEFAULT_BLOCK_SIZE, "tokens per KV block (and per prefix-hash block)")
    kv_cache_memory: int | None = option(
        None, "bytes for the KV pool (None: gpu_memory_utilization of the memory left after the weights "
              "on a GPU, 1 GiB on the CPU)")
    gpu_memory_utilization: float = option(
        0.90, "on a GPU with kv_cache_memory unset: fraction of the free memory, after the weights are "
              "loaded, that the KV pool may take")
    num_kv_blocks: int | None = option(
        None, "exact KV pool size in blocks; overrides kv_cache_memory and gpu_memory_utilization "
              "(vLLM's num_gpu_blocks_override)")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of equal prompt prefixes across requests")
    kv_cache_dtype: str = option(
        "auto", "KV pool element type: auto (the model dtype) or fp8 (alias fp8_e4m3: float8 E4M3 with a "
                "power-of-two scale per token and KV head, about twice the tokens in the same memory; "
                "docs/quantization.md)")

    def __post_init__(self) -> None:
        require(isinstance(self.block_size, int) and 1 <= self.block_size <= 1024,
                f"block_size must be an integer in [1, 1024], got {self.block_size!r}")
        require(self.kv_cache_memory is None or self.kv_cache_memory > 0,
                f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory!r}")
        require(0.0 < self.gpu_memory_utilization <= 1.0,
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        require(self.num_kv_blocks is None or self.num_kv_blocks >= 1,
                f"num_kv_blocks must be ≥ 1, got {self.num_kv_blocks!r}")
        self.kv_cache_dtype = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                f"kv_cache_dtype must be one of {', '.join((*KV_CACHE_DTYPES, *KV_CACHE_DTYPE_ALIASES))}, "
                f"got {self.kv_cache_dtype!r}")


GPU_STEP_TOKENS = 2048
CPU_STEP_TOKENS = 128
"""On the CPU a step costs about 6 ms per token (SmolLM2-135M, float32), so 128 tokens keep
a step, and with it the time an abort takes to land, under a second."""


def default_step_tokens(device_type: str) -> int:
    """max_num_batched_tokens when the config leaves it unset."""
    return CPU_STEP_TOKENS if device_type == "cpu" else GPU_STEP_TOKENS


@dataclass
class SchedulerConfig:
    """Scheduler: batch sizes, chunked prefill and the waiting queue's cap."""

    max_num_batched_tokens: int | None = option(
        None, "token budget of one step: a decode counts one token, a prefill chunk its length. None: "
              f"{GPU_STEP_TOKENS} on a GPU, {CPU_STEP_TOKENS} on the CPU, where a step costs milliseconds "
              "per token and an abort or a passed deadline only lands between steps")
    max_num_seqs: int = option(64, "cap on running requests")
    max_waiting_requests: int | None = option(
        None, "online serving (the engine service, AsyncLLM): cap on requests admitted but not yet "
              "running; one more is refused at once with RESOURCE_EXHAUSTED and a retry hint "
              "instead of queueing (None: max_num_seqs, so a request waits at most about one batch's "
              "turnover; 0: no queue). Offline LLM.generate batches are not capped")
    enable_chunked_prefill: bool = option(
        True, "split long prefills across steps so running decodes are never starved "
              "(off: max_num_batched_tokens must cover a whole prompt)")
    max_model_len: int | None = derived(
        None, "the served window (prompt + generated tokens), resolved by the engine from the model "
              "and EngineConfig.max_model_len before the scheduler starts")

    def __post_init__(self) -> None:
        require(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
                f"max_num_batched_tokens must be ≥ 1, got {self.max_num_batched_tokens!r}")
        require(self.max_num_seqs >= 1, f"max_num_seqs must be ≥ 1, got {self.max_num_seqs!r}")
        require(self.max_waiting_requests is None or self.max_waiting_requests >= 0,
                f"max_waiting_requests must be ≥ 0, got {self.max_waiting_requests!r}")
        require(self.max_model_len is None or self.max_model_len >= 2,
                f"max_model_len must be ≥ 2, got {self.max_model_len!r}")
        require(self.enable_chunked_prefill or self.max_model_len is None or self.max_num_batched_tokens is None
                or self.max_num_batched_tokens >= self.max_model_len,
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f"≥ max_model_len ({self.max_model_len}) or long prompts could never be scheduled: raise "
                "max_num_batched_tokens, lower max_model_len or enable chunked prefill")

    @property
    def waiting_cap(self) -> int:
        """The effective cap on waiting requests (max_waiting_requests resolved)."""
        return self.max_num_seqs if self.max_waiting_requests is None else self.max_waiting_requests


POOLING_MODES = ("none", "last", "mean")


@dataclass
class PoolerConfig:
    """Embeddings: how a prompt's final hidden states become one vector (docs/embeddings.md)."""

    pooling: str = option(
        "none", "embeddings: none (generation only), last (the last prompt token's final hidden state, "
                "after the final norm; Qwen3-Embedding) or mean (the mean over the prompt tokens; e5-style)")
    normalize: bool = option(False, "embeddings: L2-normalize each pooled vector")
    matryoshka: bool = option(
        False, "embeddings: the model was trained so that a prefix of its vector is an embedding too "
               "(Matryoshka, e.g. Qwen3-Embedding), so requests may ask for fewer dimensions")

    def __post_init__(self) -> None:
        require(self.pooling in POOLING_MODES,
                f"pooling must be one of {', '.join(POOLING_MODES)}, got {self.pooling!r}")
        require(isinstance(self.normalize, bool), f"normalize must be true or false, got {self.normalize!r}")
        require(isinstance(self.matryoshka, bool), f"matryoshka must be true or false, got {self.matryoshka!r}")
SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """Speculative decoding: drafts checked by the target in one pass (docs/speculative-decoding.md)."""

    speculative_method: str | None = option(
        None, "None (off), ngram (prompt lookup: drafts copied from earlier in the prompt and output) "
              "or draft (a smaller model with the same tokenizer, speculative_model)")
    num_speculative_tokens: int = option(4, "drafts proposed per request per step (k); a verify step "
                                            "computes k + 1 positions")
    prompt_lookup_max: int = option(4, "ngram: longest suffix (in tokens) looked up in the context")
    prompt_lookup_min: int = option(1, "ngram: shortest suffix looked up; shorter matches propose nothing")
    speculative_model: str | None = option(None, "draft: path of the draft model (same tokenizer and vocabulary)")
    speculative_disable_batch_size: int = option(
        8, "no drafts while more requests than this run: a large batch is compute-bound and verify "
           "width would cost more than it saves")

    def __post_init__(self) -> None:
        require(self.speculative_method is None or self.speculative_method in SPECULATIVE_METHODS,
                f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)} or None, "
                f"got {self.speculative_method!r}")
        require(isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 64,
                f"num_speculative_tokens must be in [1, 64], got {self.num_speculative_tokens!r}")
        require(1 <= self.prompt_lookup_min <= self.prompt_lookup_max,
                f"need 1 ≤ prompt_lookup_min ≤ prompt_lookup_max, got {self.prompt_lookup_min!r} and "
                f"{self.prompt_lookup_max!r}")
        require(self.speculative_method != "draft" or bool(self.speculative_model),
                "speculative_method 'draft' needs speculative_model (the draft model's path)")
        require(self.speculative_disable_batch_size >= 1,
                f"speculative_disable_batch_size must be ≥ 1, got {self.speculative_disable_batch_size!r}")

    @property
    def enabled(self) -> bool:
        return self.speculative_method is not None


SPECULATIVE_CONFIG_KEYS = {
    "method": "speculative_method", "num_speculative_tokens": "num_speculative_tokens",
    "prompt_lookup_max": "prompt_lookup_max", "prompt_lookup_min": "prompt_lookup_min",
    "model": "speculative_model", "disable_by_batch_size": "speculative_disable_batch_size",
}
"""vLLM's ``speculative_config`` dict keys → this config's flat option names."""


def speculative_options(speculative_config: dict | None) -> dict:
    """``LLM(speculative_config={...})`` (vLLM's form) as flat options; unknown keys raise."""
    if not speculative_config:
        return {}
    unknown = sorted(set(speculative_config) - set(SPECULATIVE_CONFIG_KEYS))
    if unknown:
        raise TypeError(f"speculative_config: unknown key(s) {', '.join(map(repr, unknown))}; valid: "
                        f"{', '.join(SPECULATIVE_CONFIG_KEYS)}")
    return {SPECULATIVE_CONFIG_KEYS[k]: v for k, v in speculative_config.items()}


DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("torch", "triton")


@dataclass
class EngineConfig:
    """Engine: model, precision, device and backend."""

    model: str = option(
        MISSING, "path to a Hugging Face model folder or a .gguf file (local files only); the engine "
                 "service also takes 'demo', the bundled demo model")
    served_model_name: str | None = option(None, "name clients use (None: the folder or file name without suffix)")
    dtype: str = option("auto", "float32, bfloat16, float16 or auto (float32 on the CPU, bfloat16 on a GPU)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    backend: str = option(
        "torch", "model runner: torch (reference, CPU or GPU) or triton (Triton kernels and CUDA graphs "
                 "for decode on a GPU; on the CPU it runs through Triton's interpreter, for tests)")
    cuda_graphs: bool = option(True, "triton backend on a GPU: replay decode steps from captured CUDA graphs")
    quantization: str = option(
        "auto", "weights in memory: auto (what the checkpoint holds: AWQ/GPTQ packed, an FP8 checkpoint's "
                "E4M3 weights, a GGUF's "
                "Q8_0/Q4_x blocks kept on a GPU; else full precision), none, int8 (per channel), int4 "
                "(group 128, zero points), fp8 (E4M3 W8A8, Ada/Hopper GPUs), w4a8 (INT4 weights in groups of "
                "128 times FP8 activations, FBGEMM's kernel on Hopper), gguf, awq or gptq")
    activation_aware: bool = option(
        False, "quantization int4, int8 or w4a8: calibrate on a short text first and scale each linear's "
               "salient input channels before rounding (AWQ's search, folded into the RMSNorm weights "
               "and the previous projection; loads the float model once, then quantizes it)")
    calibration_text: str = option(
        "/usr/share/common-licenses/Apache-2.0",
        "activation_aware: the UTF-8 text whose activations pick the scales (first 2048 tokens; "
        "the default ships with every Debian/Ubuntu image, package base-files)")
    async_scheduling: bool | None = option(
        None, "schedule step N+1 and stage its inputs while step N runs on the device, then detokenize "
              "and check stops for step N while N+1 computes (a decode's input token is read on the "
              "device; same output token for token). None: on for the triton backend on a GPU, off "
              "elsewhere (on the CPU a step's work is the host's anyway)")
    seed: int = option(0, "seed of the engine's generator for unseeded random sampling")
    tensor_parallel_size: int = option(
        1, "split the model over this many GPUs (one worker process per GPU after the first, "
           "Megatron-style sharding; docs/tensor-parallel.md); on the CPU, as many processes "
           "(gloo), for tests")
    enable_expert_parallel: bool = option(
        False, "with tensor_parallel_size N > 1, split the routed experts of a mixture of experts whole over "
               "the N ranks (rank r holds experts [r E/N, (r+1) E/N)); attention and shared experts stay "
               "split by tensor parallelism (docs/moe.md)")
    max_model_len: int | None = option(
        None, "cap the served window (prompt + generated tokens) below the model's own (None: the model's)")
    cache: CacheConfig = group(CacheConfig)
    scheduler: SchedulerConfig = group(SchedulerConfig)
    pooler: PoolerConfig = group(PoolerConfig)
    speculative: SpeculativeConfig = group(SpeculativeConfig)

    def __post_init__(self) -> None:
        require(isinstance(self.model, str) and bool(self.model), f"model must be a path, got {self.model!r}")
        require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        from llmesh.engine.quant.config import QUANTIZATION_CHOICES

        require(self.quantization in QUANTIZATION_CHOICES,
                f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {self.quantization!r}")
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        require(self.max_model_len is None or self.max_model_len >= 2,
                f"max_model_len must be ≥ 2, got {self.max_model_len!r}")
        require(isinstance(self.tensor_parallel_size, int) and 1 <= self.tensor_parallel_size <= 64,
                f"tensor_parallel_size must be an integer in [1, 64], got {self.tensor_parallel_size!r}")
        require(self.tensor_parallel_size == 1 or not self.activation_aware,
                "activation_aware calibrates the whole model in one process; it does not run with "
                "tensor_parallel_size > 1")
        require(self.tensor_parallel_size == 1 or self.speculative.speculative_method != "draft",
                "speculative_method 'draft' does not run with tensor_parallel_size > 1 (the draft model "
                "is not sharded); use ngram or tensor_parallel_size 1")
        require(self.scheduler.enable_chunked_prefill or self.max_model_len is None
                or self.scheduler.max_num_batched_tokens is None
                or self.scheduler.max_num_batched_tokens >= self.max_model_len,
                f"without chunked prefill, max_num_batched_tokens ({self.scheduler.max_num_batched_tokens}) "
                f"must be ≥ max_model_len ({self.max_model_len}) or long prompts could never be scheduled: raise "
                f"max_num_batched_tokens, lower max_model_len or enable chunked prefill")

"""``LLM``: the offline Python API, in the convention users know from vLLM.

    from llmesh.engine import LLM, SamplingParams
    llm = LLM(model="path/to/folder-or.gguf")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from llmesh.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from llmesh.engine.kv_cache.events import KVEventPublisher
from llmesh.engine.llm_engine import LLMEngine
from llmesh.engine.outputs import RequestOutput
from llmesh.engine.request import Priority
from llmesh.engine.sampling_params import SamplingParams


def build_engine_config(
    model: str,
    *,
    served_model_name: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    seed: int = 0,
    max_model_len: int | None = None,
    block_size: int = 16,
    kv_cache_memory: int | None = None,
    num_kv_blocks: int | None = None,
    gpu_memory_utilization: float = 0.9,
    enable_prefix_caching: bool = True,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 64,
    enable_chunked_prefill: bool = True,
    backend: str = "torch",
    cuda_graphs: bool = True,
    async_scheduling: bool | None = None,
    quantization: str = "auto",
) -> EngineConfig:
    """The flat keyword arguments of ``LLM`` (and the engine's CLI flags) → EngineConfig."""
    return EngineConfig(
        model=model,
        served_model_name=served_model_name,
        dtype=dtype,
        device=device,
        backend=backend,
        cuda_graphs=cuda_graphs,
        async_scheduling=async_scheduling,
        quantization=quantization,
        seed=seed,
        max_model_len=max_model_len,
        cache=CacheConfig(
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            num_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            enable_chunked_prefill=enable_chunked_prefill,
        ),
    )


class LLM:
    def __init__(self, model: str, *, publisher: KVEventPublisher | None = None, **kwargs) -> None:
        self.engine = LLMEngine(build_engine_config(model, **kwargs), publisher=publisher)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: int = Priority.INTERACTIVE,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        order: list[str] = []
        results: dict[str, RequestOutput] = {}
        for prompt, p in zip(prompts, params_list):
            req = self.engine.add_request(list(prompt) if not isinstance(prompt, str) else prompt, p,
                                          priority=priority)
            order.append(req.request_id)
            results[req.request_id] = RequestOutput(req.request_id, req.prompt_token_ids,
                                                    logprobs=[] if p.logprobs is not None else None)
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                _accumulate(results[delta.request_id], delta)
                if delta.finished:
                    bar.update(1)
        bar.close()
        return [results[i] for i in order]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        **kwargs,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's own chat template, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.encode_chat(c) for c in convs]
        return self.generate(prompts, sampling_params, **kwargs)


def _accumulate(acc: RequestOutput, delta: RequestOutput) -> None:
    acc.token_ids.extend(delta.token_ids)
    acc.text += delta.text
    if delta.logprobs is not None and acc.logprobs is not None:
        acc.logprobs.extend(delta.logprobs)
    acc.num_cached_tokens = delta.num_cached_tokens
    if delta.finished:
        acc.finished, acc.finish_reason, acc.stop_reason = True, delta.finish_reason, delta.stop_reason

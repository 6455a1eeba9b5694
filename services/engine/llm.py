"""``LLM``: the offline Python API, in the convention users know from vLLM.

    from llmesh.engine import LLM, SamplingParams
    llm = LLM(model="path/to/folder-or.gguf")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].text)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from llmesh.config import build
from llmesh.engine.config import EngineConfig, speculative_options
from llmesh.engine.kv_cache.events import KVEventPublisher
from llmesh.engine.llm_engine import LLMEngine
from llmesh.engine.outputs import EmbeddingOutput, RequestOutput
from llmesh.engine.request import Priority
from llmesh.engine.sampling_params import SamplingParams


def build_engine_config(model: str | os.PathLike, **options: Any) -> EngineConfig:
    """``LLM``'s keyword arguments → EngineConfig: each is an EngineConfig option by its flat
    name (``max_num_seqs``, ``block_size``, ...; the list is in docs/configuration.md). An
    unknown name raises UnknownOptionError (a TypeError) listing the valid ones.
    ``speculative_config`` takes vLLM's dict form, e.g. ``{"method": "ngram", "num_speculative_tokens": 4}``."""
    spec = speculative_options(options.pop("speculative_config", None))
    return build(EngineConfig, {"model": os.fspath(model), **options, **spec}, what="engine config")


class LLM:
    def __init__(self, model: str | os.PathLike, *, publisher: KVEventPublisher | None = None, **options: Any) -> None:
        """``options``: EngineConfig options by name, e.g. ``LLM(path, max_num_seqs=8, dtype="float32")``."""
        self.engine = LLMEngine(build_engine_config(model, **options), publisher=publisher)

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
            # Only the finished text is returned: no text deltas to build step by step.
            req = self.engine.add_request(list(prompt) if not isinstance(prompt, str) else prompt, p,
                                          priority=priority, text_deltas=False)
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

    def embed(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        dimensions: int | None = None,
        priority: int = Priority.INTERACTIVE,
        use_tqdm: bool = False,
    ) -> list[EmbeddingOutput]:
        """The embedding of every prompt (text or token ids), in prompt order, pooled as the
        engine's ``pooling``/``normalize`` options say (vLLM's ``LLM.embed``). ``dimensions``
        shortens the vectors of a ``matryoshka`` model. Raises InvalidRequestError when the
        engine runs without a pooling mode."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        pooling = self.engine.pooling_params(dimensions)
        order: list[str] = []
        prompt_ids: dict[str, list[int]] = {}
        results: dict[str, RequestOutput] = {}
        for prompt in prompts:
            req = self.engine.add_request(list(prompt) if not isinstance(prompt, str) else prompt,
                                          priority=priority, pooling=pooling)
            order.append(req.request_id)
            prompt_ids[req.request_id] = req.prompt_token_ids
        bar = tqdm(total=len(order), desc="embed", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                if delta.finished and delta.request_id in prompt_ids:
                    results[delta.request_id] = delta
                    bar.update(1)
        bar.close()
        out = []
        for i in order:
            r = results[i]
            if r.embedding is None:
                raise RuntimeError(f"embedding request {i} ended without a vector ({r.finish_reason}: {r.error})")
            out.append(EmbeddingOutput(i, prompt_ids[i], r.embedding.tolist(), r.num_cached_tokens))
        return out

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
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    if delta.finished:
        acc.finished, acc.finish_reason, acc.stop_reason = True, delta.finish_reason, delta.stop_reason

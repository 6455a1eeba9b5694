"""Hugging Face transformers as the oracle: greedy tokens and per-step float32 logits."""

from __future__ import annotations

import functools
import inspect

import torch


@functools.lru_cache(maxsize=8)
def load_hf(path: str, gguf_file: str | None = None):
    import transformers

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    return model.eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()):
    """Greedy continuation with HF's KV cache; returns (token ids, [logits per step])."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    kw = _cache_arg(model)
    past, tokens, logits = getattr(out, kw), [], []
    for _ in range(max_new_tokens):
        step_logits = out.logits[0, -1].float()
        logits.append(step_logits)
        nxt = int(torch.argmax(step_logits))
        tokens.append(nxt)
        if nxt in eos:
            break
        out = model(torch.tensor([[nxt]]), **{kw: past}, use_cache=True)
        past = getattr(out, kw)
    return tokens, logits


def _cache_arg(model) -> str:
    """The forward's KV-cache argument and output field: ``cache`` in transformers 5.x, whose
    ``past_key_values`` is a deprecated alias (gone in 5.40); ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

"""Draft-model proposer: a smaller model with the target's tokenizer guesses k tokens.

The draft runs in the engine process beside the target, on the same device, with its own
paged KV pool and block tables (one per request, from a plain free list: the draft's
blocks are never shared or cached). Its KV for a request is kept in step with the
target's accepted tokens: each proposal first finds how many leading tokens of the
request the draft's cache still holds (its own drafts that the target rejected are
not), recomputes from there in one chunk, then decodes k - 1 more tokens greedily.

Drafts are greedy (the draft's argmax), so q is one-hot and the verifier's deterministic
rule is exact (``spec_decode.verify``). Each proposal costs k forward passes of the draft
over the batch of speculating requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmesh.engine.request import Request
from llmesh.engine.sampler import Sampler
from llmesh.engine.sampling_params import SamplingParams
from llmesh.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from llmesh.engine.spec_decode.proposer import Proposal, Proposer

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30)


@dataclass
class _DraftSeq:
    """The draft's view of one request: a shadow Request whose tokens are the target's plus
    the drafts so far, its draft-pool blocks, and the tokens whose KV the draft holds."""

    shadow: Request
    cached: list[int] = field(default_factory=list)


class DraftModelProposer(Proposer):
    method = "draft"

    def __init__(self, config, target) -> None:
        from llmesh.engine.loader import load_model
        from llmesh.engine.model_runner import TorchModelRunner
        from llmesh.engine.quant.config import resolve_quantization

        loaded = load_model(config.speculative_model)
        if loaded.config.vocab_size != target.model_config.vocab_size:
            raise ValueError(f"speculative_model {config.speculative_model!r}: vocabulary of "
                             f"{loaded.config.vocab_size} tokens, the target has {target.model_config.vocab_size}; "
                             "the draft must share the target's tokenizer")
        quant = resolve_quantization("auto", model=config.speculative_model, source_format=loaded.source_format,
                                     checkpoint_method=loaded.checkpoint_method, device=target.device,
                                     backend="torch")
        self.block_size = target.config.cache.block_size
        self.runner = TorchModelRunner(
            loaded.config, loaded.weights_for(quant), device=target.device, dtype=target.dtype,
            block_size=self.block_size, sampler=Sampler(device=target.device), num_blocks=target.runner.num_blocks,
            max_model_len=target.max_model_len, linear_method=quant.linear_method)
        self._free = list(range(self.runner.num_blocks - 1, -1, -1))
        self._seqs: dict[str, _DraftSeq] = {}

    # ---- blocks ---------------------------------------------------------------------------
    def _grow(self, seq: _DraftSeq, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(seq.shadow.block_ids)
        if need > len(self._free):
            return False
        for _ in range(max(0, need)):
            seq.shadow.block_ids.append(self._free.pop())
        return True

    def retain(self, request_ids: set[str]) -> None:
        for rid in [r for r in self._seqs if r not in request_ids]:
            self._free.extend(reversed(self._seqs.pop(rid).shadow.block_ids))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    # ---- proposing -------------------------------------------------------------------------
    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int],
                hidden_states: torch.Tensor | None = None) -> list[Proposal]:
        out = [Proposal() for _ in requests]
        active: list[tuple[int, _DraftSeq, int]] = []
        for i, (req, k) in enumerate(zip(requests, max_tokens)):
            if k <= 0:
                continue
            seq = self._seqs.get(req.request_id)
            if seq is None:
                seq = self._seqs[req.request_id] = _DraftSeq(Request(req.request_id, [0], _GREEDY))
            tokens = req.all_token_ids
            valid = _common_prefix(seq.cached, tokens)
            seq.shadow.prompt_token_ids = list(tokens)
            seq.shadow.num_computed_tokens = min(valid, len(tokens) - 1)
            if not self._grow(seq, len(tokens) + k - 1):
                continue
            active.append((i, seq, k))
        for step in range(max((k for _, _, k in active), default=0)):
            live = [(i, seq) for i, seq, k in active if k > step]
            chunks = []
            for _, seq in live:
                sh = seq.shadow
                chunks.append(ScheduledChunk(sh, sh.num_computed_tokens, sh.num_tokens - sh.num_computed_tokens))
            result = self.runner.execute(SchedulerOutput(tuple(chunks), sum(c.num_new_tokens for c in chunks)))
            for (i, seq), chunk in zip(live, chunks):
                token = result.sampled_token_ids[seq.shadow.request_id][0]
                seq.shadow.num_computed_tokens += chunk.num_new_tokens
                seq.shadow.prompt_token_ids.append(token)
                out[i].token_ids.append(token)
        for _, seq, _ in active:
            seq.cached = seq.shadow.prompt_token_ids[: seq.shadow.num_computed_tokens]
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

"""Draft-model proposer: a smaller model with the target's tokenizer guesses k tokens.

The draft runs in the engine process beside the target, on the same device, with its own
paged KV pool and block tables (one per request, from a plain free list: the draft's
blocks are never shared or cached). Its pool holds as many blocks as the target's, and
the two are sized together from one budget (``model_runner.blocks_for_budget``), so the
draft's weights and KV fit in the memory the target's pool alone would have taken.

Its KV for a request is kept in step with the target's accepted tokens: each proposal
first finds how many leading tokens of the request the draft's cache still holds (its own
drafts that the target rejected are not) and recomputes from there. That catch-up shares
the step's token budget (``max_num_batched_tokens``) across requests, fewest missing
tokens first: a request whose catch-up does not fit computes what does and proposes
nothing this step (after a long prompt it catches up over several steps), so no forward
pass of the draft is larger than a step of the target. A request caught up decodes k - 1
more tokens greedily.

Drafts are greedy (the draft's argmax), so q is one-hot and the verifier's deterministic
rule is exact (``spec_decode.verify``). Each proposal costs at most k forward passes of the
draft over the batch of speculating requests.
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


@dataclass
class DraftForwardStats:
    """The draft's forward passes so far: ``max_tokens`` bounds the time one adds to a step."""

    passes: int = 0
    tokens: int = 0
    max_tokens: int = 0


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
        self.max_step_tokens: int = target.config.scheduler.max_num_batched_tokens
        # Weights now, the pool once the target's is sized from the budget both share.
        self.runner = TorchModelRunner(
            loaded.config, loaded.weights_for(quant), device=target.device, dtype=target.dtype,
            block_size=self.block_size, max_model_len=target.max_model_len,
            sampler=Sampler(device=target.device, max_penalty_rows=target.config.scheduler.max_num_seqs),
            linear_method=quant.linear_method, allocate_kv_pool=False)
        self.kv_bytes_per_block = self.runner.kv_bytes_per_block
        self._free: list[int] = []
        self._seqs: dict[str, _DraftSeq] = {}
        self.forward_stats = DraftForwardStats()

    def init_kv_pool(self, num_blocks: int) -> None:
        self.runner.init_kv_pool(num_blocks)
        self._free = list(range(num_blocks - 1, -1, -1))

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
        pending: list[tuple[int, _DraftSeq, int]] = []
        for i, (req, k) in enumerate(zip(requests, max_tokens)):
            if k <= 0 or req.pooling is not None or req.sampling_params.speculative is False:
                continue
            seq = self._seqs.get(req.request_id)
            if seq is None:
                seq = self._seqs[req.request_id] = _DraftSeq(Request(req.request_id, [0], _GREEDY))
            tokens = req.all_token_ids
            valid = _common_prefix(seq.cached, tokens)
            seq.shadow.prompt_token_ids = list(tokens)
            seq.shadow.num_computed_tokens = min(valid, len(tokens) - 1)
            pending.append((i, seq, k))
        # The first pass catches caches up and samples each caught-up request's first draft,
        # within the step's token budget; requests missing fewest tokens go first, so one
        # long catch-up does not hold back the drafts of the rest.
        pending.sort(key=lambda p: p[1].shadow.num_tokens - p[1].shadow.num_computed_tokens)
        budget = self.max_step_tokens
        first: list[ScheduledChunk] = []
        drafting: list[tuple[int, _DraftSeq, int]] = []
        for i, seq, k in pending:
            sh = seq.shadow
            missing = sh.num_tokens - sh.num_computed_tokens
            n = min(missing, budget)
            if n == 0:
                break
            caught_up = n == missing
            if not self._grow(seq, sh.num_tokens + k - 1 if caught_up else sh.num_computed_tokens + n):
                continue
            budget -= n
            first.append(ScheduledChunk(sh, sh.num_computed_tokens, n))
            if caught_up:
                drafting.append((i, seq, k))
        self._forward(first, out, {seq.shadow.request_id: i for i, seq, _ in drafting})
        for step in range(1, max((k for _, _, k in drafting), default=0)):
            live = [(i, seq) for i, seq, k in drafting if k > step]
            chunks = [ScheduledChunk(seq.shadow, seq.shadow.num_computed_tokens, 1) for _, seq in live]
            self._forward(chunks, out, {seq.shadow.request_id: i for i, seq in live})
        for chunk in first:
            sh = chunk.request
            self._seqs[sh.request_id].cached = sh.prompt_token_ids[: sh.num_computed_tokens]
        return out

    def _forward(self, chunks: list[ScheduledChunk], out: list[Proposal], index: dict[str, int]) -> None:
        """One forward pass of the draft over ``chunks``; a chunk that reaches its shadow's
        end appends the sampled draft to the shadow and to ``out[index[request_id]]``."""
        if not chunks:
            return
        num_tokens = sum(c.num_new_tokens for c in chunks)
        stats = self.forward_stats
        stats.passes += 1
        stats.tokens += num_tokens
        stats.max_tokens = max(stats.max_tokens, num_tokens)
        result = self.runner.execute(SchedulerOutput(tuple(chunks), num_tokens))
        for chunk in chunks:
            sh = chunk.request
            sh.num_computed_tokens += chunk.num_new_tokens
            if chunk.samples:
                token = result.sampled_token_ids[sh.request_id][0]
                sh.prompt_token_ids.append(token)
                out[index[sh.request_id]].token_ids.append(token)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

"""The scheduler: iteration-level (continuous) batching over a paged KV cache.

Each ``schedule()`` builds one step under a token budget (``max_num_batched_tokens``):

1. Running requests first, best priority and earliest arrival first. Each gets
   ``min(tokens left to compute, budget left)``: one token for a decode, a chunk for a
   prefill still in progress. When the pool has no block for one, the worst running
   request (lowest priority, latest arrival) is preempted by recompute — blocks freed,
   computed count reset, back to the front of its priority's waiting queue — and the
   allocation retried; if the request itself is the worst left, it is preempted.
2. Then waiting requests, best priority first and first-come-first-served within a
   priority, while budget, ``max_num_seqs`` and blocks allow. A cached prefix is taken
   from the KV cache; the rest of the prompt is chunked to the budget left. Admission
   stops at the first request that cannot be placed, so a long prompt is never starved
   by shorter ones slipping past it — except that a waiting request may preempt running
   requests of strictly worse priority to get its blocks or its seat, so interactive
   traffic is never stuck behind batch traffic. A choice of a request with n > 1
   (``fork_of``) is admitted only once the first choice's prompt is computed (scheduled:
   later steps run after it on the device) and takes that choice's prompt blocks by
   reference, so the prompt is prefilled once for all n. A step whose running phase had to
   preempt admits nothing: the preempted requests are at the front of the queue and
   the blocks were just short.

Nothing is lost or stuck: every live request is in exactly one of ``waiting`` and
``running``, and its next step always fits in the whole pool — admission refuses a
prompt that does not, and a sequence that grows to fill the pool finishes with LENGTH
(as at the model window) when it receives the token that would overflow it, rather
than being preempted forever. So a request alone can always run, a preempted one can
always come back, and admission in strict order starves nobody.

Speculative decoding: a running decode whose request carries draft tokens
(``Request.spec_token_ids``) becomes a verify chunk of 1 + k tokens, with k taken only
from the budget left after every decode and prefill is placed, and only when the pool
has the lookahead slots without preempting anyone. ``update_from_output`` then appends
the accepted tokens one by one (a stop among them ends the request there), rolls the
computed count back past the rejected drafts and frees the blocks that held only them.

Unknown or already finished ids given to ``finish_request`` / ``abort_request`` return
0 freed blocks; aborting twice is harmless.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Mapping, Sequence

from llmesh.engine.config import SchedulerConfig
from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.kv_cache.manager import ComputedBlocks, KVCacheManager
from llmesh.engine.request import FinishReason, Request, RequestStatus
from llmesh.engine.scheduler_output import ScheduledChunk, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.running: list[Request] = []
        self._waiting: dict[int, deque[Request]] = {}
        """priority → its queue, front first."""
        self._requests: dict[str, Request] = {}
        """Every live (waiting or running) request by id."""
        self._arrival_order: dict[str, int] = {}
        self._counter = itertools.count()
        self._finished_ids: list[str] = []
        """Finished since the last schedule(); reported in its output."""
        self.num_preemptions_total = 0
        """Preemptions since start (a metric)."""
        self.prefix_cache_queries_total = 0
        self.prefix_cache_hits_total = 0
        """Prompt tokens looked up in the prefix cache at first admissions, and those found
        (metrics; counted once per request, as a recomputed preempted request hits again)."""

    # ---- queries ----------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """The live request with this id; None once it finished or was aborted."""
        return self._requests.get(request_id)

    def waiting_requests(self) -> list[Request]:
        """Waiting requests in the order they would be admitted."""
        return [r for p in sorted(self._waiting) for r in self._waiting[p]]

    # ---- lifecycle ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request, refusing one that could never run (InvalidRequestError).

        The request's ``max_model_len`` is capped at the scheduler's window, so
        ``Request.check_stop`` ends it with LENGTH there.
        """
        self._validate(request)
        window = self.config.max_model_len
        if request.max_model_len is None or request.max_model_len > window:
            request.max_model_len = window
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._arrival_order[request.request_id] = next(self._counter)
        queue = self._waiting.setdefault(request.priority, deque())
        index = len(queue)
        while index > 0 and self._key(queue[index - 1]) > self._key(request):
            index -= 1
        queue.insert(index, request)

    def finish_request(self, request_id: str, reason: FinishReason) -> int:
        """End a live request now (stop string, abort); returns how many blocks it freed."""
        request = self._requests.get(request_id)
        return 0 if request is None else self._finish(request, reason)

    def abort_request(self, request_id: str) -> int:
        return self.finish_request(request_id, FinishReason.ABORT)

    # ---- one step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Build the next step and advance each scheduled request's computed count.

        A request may still have a token in flight from the previous step (async
        scheduling): its decode is scheduled all the same, at the position that token
        takes, and the runner reads the token's id on the device. A request whose pending
        token will end it by length is left out: that step would be wasted.
        """
        budget = self.config.max_num_batched_tokens
        chunks: dict[str, ScheduledChunk] = {}
        preempted: list[str] = []
        self.running.sort(key=self._key)

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            if num_new <= 0 or (request.num_pending_tokens and request.will_finish_by_length()):
                index += 1
                continue
            allocated = self.kv.allocate_slots(request, num_new)
            while not allocated:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                refund = chunks.pop(victim.request_id, None)
                budget += refund.num_new_tokens if refund else 0
                if victim is request:
                    break
                allocated = self.kv.allocate_slots(request, num_new)
            if not allocated:
                break
            chunks[request.request_id] = ScheduledChunk(request, request.num_computed_tokens, num_new)
            budget -= num_new
            index += 1

        if not preempted:
            budget = self._admit_waiting(budget, chunks, preempted)
        # Lookahead slots only when memory is not short: not in a step that preempted, nor
        # while a request waits (the slots are better spent admitting it).
        budget = self._add_drafts(chunks, budget, allowed=not preempted and not self.num_waiting)

        decodes, prefills = [], []
        for c in chunks.values():
            (decodes if c.is_decode else prefills).append(c)
            c.request.num_computed_tokens += c.num_new_tokens
            if c.samples:
                c.request.num_pending_tokens += 1
        finished, self._finished_ids = tuple(self._finished_ids), []
        return SchedulerOutput(
            chunks=tuple(decodes + prefills),
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            preempted_request_ids=tuple(preempted),
            finished_request_ids=finished,
        )

    def update_from_output(self, output: SchedulerOutput,
                           sampled: Mapping[str, int | Sequence[int]]) -> list[Request]:
        """Append the tokens a step sampled, register blocks that became full, check stops.

        ``sampled`` maps a request to its token, or for a verify chunk to the tokens it
        emitted (accepted drafts, then the target's own token). Returns the requests that
        received tokens (finished ones included; their blocks are already freed). Tokens
        of requests that finished or were aborted since ``schedule()`` are dropped; a
        request preempted meanwhile keeps its tokens (they were computed from its real
        context before the blocks were given back).
        """
        received: list[Request] = []
        for chunk in output.chunks:
            request = chunk.request
            if not chunk.samples:
                if request.status is RequestStatus.RUNNING:
                    self.kv.cache_computed_blocks(request)
                continue
            request.num_pending_tokens -= 1
            if self._requests.get(request.request_id) is not request:
                continue
            if request.request_id not in sampled:
                raise KeyError(f"no sampled token for request {request.request_id!r}, whose chunk samples")
            tokens = sampled[request.request_id]
            tokens = [tokens] if isinstance(tokens, int) else list(tokens)
            if not 1 <= len(tokens) <= chunk.num_spec_tokens + 1:
                raise ValueError(f"request {request.request_id!r}: {len(tokens)} tokens for a chunk with "
                                 f"{chunk.num_spec_tokens} drafts")
            if request.status is RequestStatus.RUNNING and chunk.num_spec_tokens:
                # the KV of rejected drafts is garbage: the computed count stops at the last
                # accepted token, and blocks holding only rejected slots go back at once
                request.num_computed_tokens -= chunk.num_spec_tokens + 1 - len(tokens)
                self.kv.release_tail(request)
            for token in tokens:
                request.append_output_token(token)
                if request.check_stop():
                    break
            if request.status is RequestStatus.RUNNING:
                if chunk.num_spec_tokens:  # a stop among the accepted tokens leaves later ones unused
                    request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
                self.kv.cache_computed_blocks(request)
            if request.finish_reason is not None:
                self._finish(request, request.finish_reason)
            elif self._outgrows_pool(request):
                self._finish(request, FinishReason.LENGTH)
            received.append(request)
        return received

    # ---- helpers --------------------------------------------------------------------
    def _add_drafts(self, chunks: dict[str, ScheduledChunk], budget: int, allowed: bool) -> int:
        """Widen decodes whose request has drafts into verify chunks, from the spare budget
        only and without preempting anyone for a lookahead slot; returns the budget left.
        Not ``allowed``: the drafts are dropped unused."""
        for request_id, chunk in list(chunks.items()):
            request = chunk.request
            # A proposal is used by the step right after it was made, or dropped: later the
            # context has moved on (an async step landed without a new proposal).
            drafts, request.spec_token_ids = request.spec_token_ids, []
            if not allowed or not drafts or budget <= 0 or not chunk.is_decode or request.num_pending_tokens:
                continue
            # never draft past max_tokens or the window: the target adds one token of its own
            room = min(request.sampling_params.max_tokens - request.num_output_tokens,
                       (request.max_model_len or self.config.max_model_len) - request.num_tokens) - 1
            k = min(len(drafts), budget, room)
            if k <= 0 or not self.kv.allocate_slots(request, 1 + k):
                continue
            chunks[request_id] = ScheduledChunk(request, chunk.start_pos, 1 + k, tuple(drafts[:k]))
            budget -= k
        return budget

    def _admit_waiting(
        self, budget: int, chunks: dict[str, ScheduledChunk], preempted: list[str]
    ) -> int:
        """Admit waiting requests in order while they fit; returns the budget left."""
        while budget > 0:
            request = self._peek_waiting()
            if request is None or request.request_id in preempted or request.num_pending_tokens:
                break
            chunk = None
            if len(self.running) < self.config.max_num_seqs:
                computed = self._prefix_of(request)
                if computed is None:
                    break  # its first choice is still prefilling the shared prompt
                num_new = request.num_tokens - computed.num_computed_tokens
                if num_new > budget:
                    if not self.config.enable_chunked_prefill:
                        break
                    num_new = budget
                chunk = self._try_admit(request, computed, num_new)
            if chunk is None:
                victim = self._worse_running(request)
                if victim is None:
                    break
                refund = chunks.pop(victim.request_id, None)
                budget += refund.num_new_tokens if refund else 0
                self._preempt(victim)
                preempted.append(victim.request_id)
                continue
            chunks[request.request_id] = chunk
            budget -= chunk.num_new_tokens
        return budget

    def _prefix_of(self, request: Request) -> ComputedBlocks | None:
        """The blocks a request starts from: its first choice's prompt blocks for a forked
        choice (None: wait, that prompt is not computed yet), else its cached prefix."""
        parent = self._requests.get(request.fork_of) if request.fork_of else None
        if parent is not None and parent is not request and parent.status is RequestStatus.RUNNING:
            if parent.num_computed_tokens < parent.num_prompt_tokens:
                return None
            forked = self.kv.fork_blocks(parent, request)
            if request.sampling_params.prompt_logprobs is not None:
                request.prompt_logprobs = parent.prompt_logprobs  # one prompt: its logprobs once
            cached = self.kv.get_computed_blocks(request)
            return forked if forked.num_computed_tokens >= cached.num_computed_tokens else cached
        if request.sampling_params.prompt_logprobs is not None and not request.output_token_ids:
            return ComputedBlocks([], 0)  # every prompt position's logits are needed
        if request.pooling is not None and not request.pooling.reads_prefix_cache:
            return ComputedBlocks([], 0)  # mean pooling needs every token's hidden state
        return self.kv.get_computed_blocks(request)

    def _try_admit(self, request: Request, computed: ComputedBlocks, num_new: int) -> ScheduledChunk | None:
        """Move the head waiting request to running with its first chunk, if blocks allow."""
        if not self.kv.allocate_slots(request, num_new, computed):
            return None
        self._waiting[request.priority].popleft()
        if request.status is RequestStatus.WAITING:
            request.num_cached_tokens = computed.num_computed_tokens
            request.scheduled_time = time.monotonic()
            self.prefix_cache_queries_total += request.num_tokens
            self.prefix_cache_hits_total += computed.num_computed_tokens
        request.num_computed_tokens = computed.num_computed_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return ScheduledChunk(request, request.num_computed_tokens, num_new)

    def _key(self, request: Request) -> tuple[int, float, int]:
        """Scheduling order: priority, then arrival time, then insertion order."""
        return (request.priority, request.arrival_time, self._arrival_order[request.request_id])

    def _peek_waiting(self) -> Request | None:
        for priority in sorted(self._waiting):
            if self._waiting[priority]:
                return self._waiting[priority][0]
        return None

    def _worse_running(self, request: Request) -> Request | None:
        """The worst running request if its priority is strictly worse than ``request``'s."""
        if not self.running:
            return None
        victim = max(self.running, key=self._key)
        return victim if victim.priority > request.priority else None

    def _outgrows_pool(self, request: Request) -> bool:
        """The next step would need more blocks than the whole pool has: it can never run."""
        return self.kv.blocks_needed(request.num_tokens) > self.kv.num_total_blocks

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._waiting.setdefault(request.priority, deque()).appendleft(request)

    def _finish(self, request: Request, reason: FinishReason | None) -> int:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self._waiting[request.priority].remove(request)
        freed = self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]
        del self._arrival_order[request.request_id]
        self._finished_ids.append(request.request_id)
        return freed

    def _validate(self, request: Request) -> None:
        n = request.num_prompt_tokens
        window = self.config.max_model_len
        if request.max_model_len is not None:
            window = min(window, request.max_model_len)
        if request.request_id in self._requests:
            raise InvalidRequestError(
                f"request_id {request.request_id!r} is already used by a live request", field="request_id"
            )
        if n == 0:
            raise InvalidRequestError("the prompt is empty: at least one token is needed", field="prompt")
        if n >= window:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the model window (max_model_len) is {window}: "
                f"at most {window - 1} prompt tokens leave room for one new token",
                field="prompt",
            )
        need = self.kv.blocks_needed(n + 1)
        if need > self.kv.num_total_blocks:
            raise InvalidRequestError(
                f"the prompt has {n} tokens and needs {need} KV blocks of {self.kv.block_size} tokens "
                f"(with one new token), but the whole KV cache holds {self.kv.num_total_blocks} blocks: "
                "shorten the prompt or give the engine more KV cache memory",
                field="prompt",
            )

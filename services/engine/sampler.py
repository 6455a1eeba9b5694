"""The sampler: one next token per row of a logits batch, each row by its own request's rules.

Order per row (as vLLM and HF, where they agree): the structured-output grammar's mask
(tokens it does not allow next become -inf) → logit bias → penalties → greedy argmax, or
temperature → top-k → top-p → min-p → sample. Rows with different parameters share
one batch: every step is a tensor op over all rows that need it, and the host reads
results back once, at the end, so the cost of a step does not grow with per-row
Python work on the device's critical path.

Randomness: a row is sampled with the exponential race (``argmax(probs / E)``, see
``sampling_ops.exponential_race``), and its noise ``E`` is drawn from the row's own
``torch.Generator`` when the request has a seed, else from the engine's generator. A
seeded request therefore yields the same tokens whatever else is batched with it and
wherever its row sits; unseeded requests are reproducible given the engine seed and
the same sequence of batches.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmesh.engine.output_counts import OutputTokenCounts
from llmesh.engine.outputs import TokenLogprob
from llmesh.engine.request import Request
from llmesh.engine.sampling_ops import (
    apply_penalties,
    count_tokens,
    exponential_race,
    filter_keep_mask,
    greedy_ids,
    to_device,
    token_logprobs,
    unique_token_ids,
)
from llmesh.engine.structured_output.state import apply_bitmask

_SEED_MASK = (1 << 64) - 1


@dataclass
class SamplerOutput:
    """What one sampler call chose: one entry per row, in row order."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    """None where the request did not ask for logprobs."""


def _plain_greedy(request: Request) -> bool:
    """Greedy with no penalty, bias, grammar or logprobs: the argmax of the raw logits is the answer."""
    p = request.sampling_params
    return (p.greedy and p.logprobs is None and request.grammar is None and not _penalised(request)
            and not p.logit_bias)


def _penalised(request: Request) -> bool:
    p = request.sampling_params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _masked(request: Request) -> bool:
    """The row takes its grammar's mask: not once the request has finished (its grammar
    may be complete; under async scheduling the step after its last one still samples a
    row for it, whose token is dropped)."""
    return request.grammar is not None and not request.is_finished


class Sampler:
    """Picks the next token of every row of a ``[N, V]`` logits batch.

    ``seed`` seeds the engine-wide generator that unseeded random rows draw noise from;
    ``device`` is where that generator lives. Seeded requests keep their own generator
    in ``request.sampler_state`` (created on first use, on the logits' device), so their
    stream of draws continues across steps and survives preemption. Prompts of requests
    with a repetition penalty are kept on the device as distinct ids, weakly keyed by
    the request, since a prompt never changes once admitted. ``max_penalty_rows``: most
    requests with penalties whose output counts stay on the device (the engine's
    max_num_seqs; see OutputTokenCounts).

    Sampling runs in inference mode whoever calls it: the engine samples a step after
    its forward was launched, outside the runner's inference mode, and the logits are
    inference tensors (no autograd bookkeeping either).
    """

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu", max_penalty_rows: int = 256) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        # Keyed weakly by request: an entry goes when the engine drops its request.
        self._prompt_cache: weakref.WeakKeyDictionary[Request, torch.Tensor] = (
            weakref.WeakKeyDictionary()
        )
        self.output_counts = OutputTokenCounts(self.device, max_penalty_rows)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        # logits: [N, V], row i belongs to requests[i]
        return self.sample(logits, requests).to_host()

    def release(self, request_ids: Sequence[str]) -> None:
        """Drop the per-request device state of finished (or aborted) requests."""
        self.output_counts.release(request_ids)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: Sequence[Request],
               drafts: Sequence[Sequence[int]] | None = None) -> SampledBatch:
        """All of the device work for a batch; nothing is read back yet (see SampledBatch).

        With ``drafts`` (speculative decoding), request i owns ``1 + len(drafts[i])``
        consecutive rows, its verify positions: row j is sampled as if ``drafts[i][:j]``
        had been appended to its output (penalties count them, the grammar has accepted
        them), so each row draws from exactly the distribution a plain step would.
        """
        # logits: [R, V]; without drafts row i belongs to requests[i]
        prior: list[tuple[int, ...]] | None = None
        verifying: set[Request] = set()
        if drafts is not None and any(drafts):
            rows = [r for r, d in zip(requests, drafts) for _ in range(len(d) + 1)]
            prior = [tuple(d[:j]) for d in drafts for j in range(len(d) + 1)]
            verifying = {r for r, d in zip(requests, drafts) if d}
            grammar_rows = []
            first = 0
            for r, d in zip(requests, drafts):
                if _masked(r):
                    grammar_rows.append((first, r.grammar, tuple(d)))
                first += len(d) + 1
        else:
            rows = list(requests)
            grammar_rows = [(i, r.grammar, ()) for i, r in enumerate(rows) if _masked(r)]
        requests = rows
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [N, V] with N = {len(requests)} rows, "
                             f"got {tuple(logits.shape)}")
        if not requests:
            return SampledBatch(torch.empty(0, dtype=torch.long, device=logits.device), [], None, 0)
        if all(_plain_greedy(r) for r in requests):
            # The usual serving batch: nothing to build but the argmax (ties → lowest id).
            return SampledBatch(greedy_ids(logits), list(requests), None, 0)
        raw = logits.float()
        # The grammar mask comes first: a disallowed token must not be chosen, nor count in
        # top-p's mass or min-p's reference; logprobs are then over the allowed tokens, as vLLM's.
        apply_bitmask(raw, grammar_rows)
        penalised, counted = self._penalise(self._bias(raw, requests), requests, prior, verifying)

        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        rewinds: dict[Request, list[torch.Tensor]] = {}
        if len(random_rows) == len(requests):
            token_ids = self._sample(penalised, requests, rewinds)
        else:
            token_ids = greedy_ids(penalised)  # [N]; ties → lowest id
            if random_rows:
                idx = to_device(random_rows, torch.long, raw.device)
                token_ids[idx] = self._sample(penalised[idx], [requests[i] for i in random_rows], rewinds)
        if counted is not None:
            rows_idx, slots, counted_requests = counted
            self.output_counts.add(counted_requests, slots, token_ids[rows_idx])
        batch = self._collect(raw, token_ids, requests)
        batch.rewinds = rewinds
        batch.verify_counts = {r: self.output_counts for r in verifying if _penalised(r)}
        return batch

    # ---- logit bias ------------------------------------------------------------------
    @staticmethod
    def _bias(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Logits plus each row's own ``logit_bias``; untouched (not copied) when no row has one.

        Every (row, id, bias) triple goes to the device in one copy and lands with one
        scatter, so a batch mixing biased and unbiased rows costs one op, not one per row.
        """
        # logits: [N, V]
        vocab = logits.shape[1]
        cells = [(i, t, b) for i, r in enumerate(requests) for t, b in r.sampling_params.logit_bias.items()
                 if t < vocab]
        if not cells:
            return logits
        host = np.asarray(cells, dtype=np.float64)  # [C, 3]: row, id, bias
        triples = to_device(host, torch.float64, logits.device)
        flat = triples[:, 0].long() * vocab + triples[:, 1].long()  # [C]
        out = logits.clone().view(-1)
        out.index_add_(0, flat, triples[:, 2].to(logits.dtype))
        return out.view_as(logits)

    # ---- penalties -------------------------------------------------------------------
    def _penalise(self, logits: torch.Tensor, requests: Sequence[Request],
                  prior: Sequence[tuple[int, ...]] | None = None, verifying: set[Request] = frozenset()
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, list[Request]] | None]:
        """Logits after repetition/presence/frequency penalties; untouched (not copied)
        when no row uses any, and computed only over the rows that do. ``prior[i]``: draft
        tokens row i counts as output after the request's own.

        Also returns what to count once the rows are sampled: (rows, their slots in
        ``output_counts``, their requests) for every penalised row outside a verify chunk
        (a verify chunk's tokens are counted once accepted); None when no row is.
        A finished request's row (async scheduling samples it once more; its token is
        dropped) is left alone: its counts may already be released."""
        rows = [i for i, r in enumerate(requests) if _penalised(r) and not r.is_finished]
        if not rows:
            return logits, None
        device = logits.device
        vocab = logits.shape[1]
        params = [requests[i].sampling_params for i in rows]
        idx = to_device(rows, torch.long, device)
        slots = self.output_counts.rows([requests[i] for i in rows], vocab)  # [P]
        counts = self.output_counts.gather(slots)  # [P, V] int32
        if prior and any(prior[i] for i in rows):
            counts += count_tokens([prior[i] for i in rows], vocab, device)
        no_tokens = torch.empty(0, dtype=torch.long, device=device)
        sub = apply_penalties(
            logits[idx],
            [self._prompt_ids(requests[i], device) if p.repetition_penalty != 1.0 else no_tokens
             for i, p in zip(rows, params)],
            counts,
            to_device([p.repetition_penalty for p in params], torch.float32, device),
            to_device([p.presence_penalty for p in params], torch.float32, device),
            to_device([p.frequency_penalty for p in params], torch.float32, device),
        )
        single = [j for j, i in enumerate(rows) if requests[i] not in verifying]
        counted = None
        if single:
            j_idx = to_device(single, torch.long, device)
            counted = (idx[j_idx], slots[j_idx], [requests[rows[j]] for j in single])
        if len(rows) == len(requests):
            return sub, counted
        out = logits.clone()
        out[idx] = sub
        return out, counted

    def _prompt_ids(self, request: Request, device: torch.device) -> torch.Tensor:
        """The request's distinct prompt ids on ``device``, converted once per request."""
        ids = self._prompt_cache.get(request)
        if ids is None or ids.device != device:
            ids = unique_token_ids(request.prompt_token_ids, device)
            self._prompt_cache[request] = ids
        return ids

    # ---- random sampling ---------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, requests: Sequence[Request],
                rewinds: dict[Request, list[torch.Tensor]]) -> torch.Tensor:
        """Sampled token ids ``[R]`` for rows that all have temperature > 0."""
        # logits: [R, V]
        device = logits.device
        params = [r.sampling_params for r in requests]
        temperature = to_device([p.temperature for p in params], torch.float32, device)
        # Shifting by the row max first keeps tiny temperatures from overflowing to inf.
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature.unsqueeze(1)
        keep = filter_keep_mask(
            scaled, [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params]
        )
        if keep is not None:
            scaled = scaled.masked_fill(~keep, float("-inf"))
        probs = scaled.softmax(dim=-1)  # [R, V]
        return exponential_race(probs, self._noise(requests, logits.shape[1], device, rewinds))

    def _noise(self, requests: Sequence[Request], vocab: int, device: torch.device,
               rewinds: dict[Request, list[torch.Tensor]]) -> torch.Tensor:
        """Exp(1) noise ``[R, V]``: seeded rows from their own generator, the rest from the
        engine's, so a seeded row's noise never depends on its neighbours.

        A seeded request with several rows (a verify chunk) draws one row per position, as
        that many plain steps would; ``rewinds[request]`` gets its generator's state before
        each draw, so that the draws of rejected positions can be given back
        (``SampledBatch.accept``) and its tokens do not depend on how far it speculated."""
        unseeded = [j for j, r in enumerate(requests) if r.sampling_params.seed is None]
        drawn = None
        if unseeded:
            drawn = torch.empty(len(unseeded), vocab, device=self.generator.device)
            drawn = drawn.exponential_(generator=self.generator).to(device)
            if len(unseeded) == len(requests):
                return drawn
        noise = torch.empty(len(requests), vocab, device=device)
        if drawn is not None:
            noise[to_device(unseeded, torch.long, device)] = drawn
        rows_of = collections.Counter(requests)
        for j, request in enumerate(requests):
            if request.sampling_params.seed is not None:
                gen = self._request_generator(request, device)
                if rows_of[request] > 1:
                    rewinds.setdefault(request, []).append(gen.get_state())
                if gen.device.type == device.type:
                    noise[j].exponential_(generator=gen)
                else:  # the request moved devices: keep its stream, copy the draws over
                    noise[j] = torch.empty(vocab, device=gen.device).exponential_(generator=gen)
        return noise

    @staticmethod
    def _request_generator(request: Request, device: torch.device) -> torch.Generator:
        state = request.sampler_state
        if not isinstance(state, torch.Generator):
            state = torch.Generator(device=device)
            # Reduced to 64 bits as torch does for negative seeds; torch rejects larger ones.
            state.manual_seed(request.sampling_params.seed & _SEED_MASK)
            request.sampler_state = state
        return state

    # ---- results -----------------------------------------------------------------------
    @staticmethod
    def _collect(raw: torch.Tensor, token_ids: torch.Tensor, requests: Sequence[Request]) -> SampledBatch:
        """Token ids, and the logprobs of the rows that asked, packed for one readback.

        Logprobs come from the raw logits (before penalties and temperature), as vLLM
        reports them by default.
        """
        # raw: [N, V]; token_ids: [N]
        lp_rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        if not lp_rows:
            return SampledBatch(token_ids, list(requests), None, 0)
        idx = to_device(lp_rows, torch.long, raw.device)
        num_top = min(raw.shape[1], max(requests[i].sampling_params.logprobs for i in lp_rows))
        chosen, rank, top_ids, top_lps = token_logprobs(
            raw[idx].log_softmax(dim=-1), token_ids[idx], num_top
        )
        # A grammar's mask leaves -inf logprobs among the alternatives; -9999 is what OpenAI
        # reports for those, and unlike -inf it is valid JSON.
        top_lps = top_lps.clamp_min(-9999.0)
        # Everything in one float64 vector: ids and ranks are exact below 2**53, and
        # float32 logprobs widen exactly.
        packed = torch.cat([
            token_ids.double(), chosen.double(), rank.double(),
            top_ids.double().flatten(), top_lps.double().flatten(),
        ])
        return SampledBatch(token_ids, list(requests), packed, num_top, lp_rows)


class SampledBatch:
    """One step's sampled tokens, on the device, on their way to the host.

    ``token_ids`` stays on the device so the next step can feed it as input before the
    host has seen it (async scheduling). ``start_copy`` queues the device-to-host copy
    behind the sampling kernels without waiting; ``to_host`` waits for that copy alone —
    never for work queued after it — and unpacks Python values.
    """

    def __init__(self, token_ids: torch.Tensor, requests: list[Request], packed: torch.Tensor | None,
                 num_top: int, lp_rows: list[int] | None = None) -> None:
        self.token_ids = token_ids  # [N] int64, device
        self.requests = requests
        self._packed = packed if packed is not None else token_ids
        self._num_top = num_top
        self._lp_rows = lp_rows or []
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self.rewinds: dict[Request, list[torch.Tensor]] = {}
        """Seeded requests with several rows → their generator's state before each row's draw."""
        self.verify_counts: dict[Request, OutputTokenCounts] = {}
        """Penalised requests with several rows → the counts their accepted tokens go to."""

    def accept(self, request: Request, tokens: Sequence[int]) -> None:
        """``request`` keeps ``tokens`` of its verify rows: its penalty counts take them, and
        the draws of the rows past them (rejected positions) are given back, so its next
        step draws what a plain step at that position would."""
        counts = self.verify_counts.get(request)
        if counts is not None:
            counts.add_host(request, tokens)
        states = self.rewinds.get(request)
        if states and len(tokens) < len(states):
            request.sampler_state.set_state(states[len(tokens)])

    def start_copy(self) -> None:
        if self._host is not None or self._packed.device.type != "cuda":
            return
        self._host = torch.empty(self._packed.shape, dtype=self._packed.dtype, pin_memory=True)
        self._host.copy_(self._packed, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def to_host(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
            values = self._host.tolist()
        else:
            values = self._packed.tolist()
        num_rows = len(self.requests)
        if not self._lp_rows:
            return SamplerOutput(token_ids=[int(t) for t in values], logprobs=[None] * num_rows)
        ids = [int(t) for t in values[:num_rows]]
        n_lp, num_top = len(self._lp_rows), self._num_top
        chosen_lp = values[num_rows:num_rows + n_lp]
        ranks = values[num_rows + n_lp:num_rows + 2 * n_lp]
        start = num_rows + 2 * n_lp
        top_id_vals = values[start:start + n_lp * num_top]
        top_lp_vals = values[start + n_lp * num_top:]
        logprobs: list[TokenLogprob | None] = [None] * num_rows
        for j, i in enumerate(self._lp_rows):
            n = min(self.requests[i].sampling_params.logprobs, num_top)
            row = slice(j * num_top, j * num_top + n)
            logprobs[i] = TokenLogprob(
                token_id=ids[i],
                logprob=chosen_lp[j],
                rank=int(ranks[j]),
                top=tuple(zip((int(t) for t in top_id_vals[row]), top_lp_vals[row])),
            )
        return SamplerOutput(token_ids=ids, logprobs=logprobs)

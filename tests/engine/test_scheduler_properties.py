"""Property tests: random add / step / abort sequences over small pools keep the books exact.

After every operation: no reference count is negative, every block is either free or
held by exactly the running requests whose tables name it, free + used == total, every
accepted request is either live (in exactly one queue) or finished with a reason. Each
step respects the token budget and the seat cap. Finally, stepping with no new arrivals
drains everything within a bound (so nothing waits forever) and leaves every block free.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.request import Priority, Request, RequestStatus
from llmesh.engine.scheduler import Scheduler
from llmesh.engine.scheduler_output import SchedulerOutput
from tests.engine.factories import check_invariants, fake_sample, make_request, make_scheduler

VOCAB = 40
EOS = 0


@dataclass(frozen=True)
class Add:
    base: int
    suffix: tuple[int, ...]
    max_tokens: int
    priority: int
    salt: str | None


@dataclass(frozen=True)
class Step:
    abort_index: int | None = None
    """Abort the n-th scheduled request between schedule() and update_from_output()."""


@dataclass(frozen=True)
class Abort:
    index: int


tokens = st.integers(1, VOCAB - 1)
adds = st.builds(
    Add,
    base=st.integers(0, 2),
    suffix=st.lists(tokens, max_size=20).map(tuple),
    max_tokens=st.integers(1, 24),
    priority=st.sampled_from([Priority.INTERACTIVE, Priority.BATCH]),
    salt=st.sampled_from([None, None, "t1"]),
)
steps = st.builds(Step, abort_index=st.none())
_by_kind = {
    "add": adds,
    "step": steps,
    "step_abort": st.builds(Step, abort_index=st.integers(0, 8)),
    "abort": st.builds(Abort, index=st.integers(0, 30)),
}
# Mostly arrivals and steps, so requests run to their end; aborts now and then.
ops = st.sampled_from(["add"] * 4 + ["step"] * 10 + ["step_abort", "abort"]).flatmap(_by_kind.__getitem__)


@st.composite
def scenarios(draw):
    chunked = draw(st.booleans()) or draw(st.booleans())
    max_model_len = draw(st.integers(4, 48))
    budget = draw(st.integers(1, 64)) if chunked else draw(st.integers(max_model_len, 64))
    s = make_scheduler(
        num_blocks=draw(st.integers(4, 40)),
        block_size=draw(st.integers(1, 8)),
        budget=budget,
        max_seqs=draw(st.integers(1, 8)),
        max_model_len=max_model_len,
        chunked=chunked,
        caching=draw(st.booleans()) or draw(st.booleans()),
    )
    bases = [(), tuple(draw(st.lists(tokens, min_size=1, max_size=24))),
             tuple(draw(st.lists(tokens, min_size=1, max_size=12)))]
    return s, bases, draw(st.lists(ops, min_size=20, max_size=80))


def accepts(s: Scheduler, prompt: tuple[int, ...]) -> bool:
    return 0 < len(prompt) < s.config.max_model_len and s.kv.blocks_needed(len(prompt) + 1) <= s.kv.num_total_blocks


def check_output(s: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_batched_tokens == sum(c.num_new_tokens for c in out.chunks)
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    assert len(out.chunks) <= s.config.max_num_seqs
    assert len({c.request_id for c in out.chunks}) == len(out.chunks)
    kinds = [c.request.num_tokens - c.start_pos == 1 for c in out.chunks]
    assert kinds == sorted(kinds, reverse=True), "decodes first"
    for c in out.chunks:
        assert c.num_new_tokens >= 1 and c.request.status is RequestStatus.RUNNING
        assert c.start_pos + c.num_new_tokens == c.request.num_computed_tokens
        assert c.start_pos + c.num_new_tokens <= c.request.num_tokens
        assert len(c.request.block_ids) * s.kv.block_size >= c.start_pos + c.num_new_tokens


def do_step(s: Scheduler, abort_index: int | None = None) -> SchedulerOutput:
    out = s.schedule()
    check_output(s, out)
    sampled = fake_sample(out, VOCAB)
    if abort_index is not None and out.chunks:
        s.abort_request(out.chunks[abort_index % len(out.chunks)].request_id)
    s.update_from_output(out, sampled)
    return out


def check_accounts(s: Scheduler, accepted: list[Request]) -> None:
    check_invariants(s)
    for r in accepted:
        if r.is_finished:
            assert r.finish_reason is not None and r.block_ids == [] and s.get_request(r.request_id) is not r
        else:
            assert s.get_request(r.request_id) is r


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads_keep_block_accounts_and_drain(scenario):
    s, bases, operations = scenario
    accepted: list[Request] = []
    for n, op in enumerate(operations):
        if isinstance(op, Add):
            prompt = bases[op.base] + op.suffix
            r = make_request(f"r{n}", tokens=prompt, max_tokens=op.max_tokens, priority=op.priority,
                             cache_salt=op.salt, eos_token_ids=[EOS])
            if accepts(s, prompt):
                s.add_request(r)
                accepted.append(r)
            else:
                try:
                    s.add_request(r)
                except InvalidRequestError:
                    pass
                else:
                    raise AssertionError(f"accepted a request that can never run: {len(prompt)} tokens")
        elif isinstance(op, Step):
            do_step(s, op.abort_index)
        elif accepted:
            s.abort_request(accepted[op.index % len(accepted)].request_id)
        check_accounts(s, accepted)

    # Drain: each live request needs at most max_model_len tokens computed per admission;
    # every preemption is paid by progress of a better-placed request, so a bound
    # quadratic in the work is generous, and a livelock would run far past it.
    live = [r for r in accepted if not r.is_finished]
    work = sum(s.config.max_model_len for _ in live)
    bound = 10 + work * (len(live) + 1)
    idle_in_a_row = 0
    for _ in range(bound):
        if not s.has_unfinished_requests():
            break
        out = do_step(s)
        idle_in_a_row = 0 if out.chunks else idle_in_a_row + 1
        assert idle_in_a_row < 2, "two steps in a row scheduled nothing while requests wait"
        check_accounts(s, accepted)
    assert not s.has_unfinished_requests(), f"not drained in {bound} steps"
    assert all(r.is_finished and r.finish_reason is not None for r in accepted)
    assert s.kv.num_used_blocks == 0 and s.kv.num_free_blocks == s.kv.num_total_blocks
    assert all(b.ref_cnt == 0 for b in s.kv.pool.blocks)
    assert s.schedule().is_empty

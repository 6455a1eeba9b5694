"""Scheduler: budgets, chunked prefill, priorities, FCFS, preemption, aborts, refusals."""

from __future__ import annotations

import pytest

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.request import FinishReason, Priority, RequestStatus
from llmesh.engine.scheduler import Scheduler
from llmesh.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tests.engine.factories import (
    check_invariants,
    drain,
    fake_sample,
    fake_token,
    make_request,
    make_scheduler,
    request_tokens,
    step,
)

BATCH = Priority.BATCH


def shape(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request_id, c.start_pos, c.num_new_tokens) for c in out.chunks]


def run_all(s: Scheduler, *reqs, max_steps: int = 1000) -> None:
    for r in reqs:
        s.add_request(r)
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return
        step(s)
        check_invariants(s)
    raise AssertionError("did not drain")


def test_chunked_prefill_with_budget_7():
    s = make_scheduler(budget=7)
    s.add_request(make_request("long", 20, max_tokens=2))
    s.add_request(make_request("short", 5, max_tokens=1))
    out, got = step(s)
    assert shape(out) == [("long", 0, 7)] and out.num_batched_tokens == 7
    assert not out.chunks[0].samples and got == []
    out, _ = step(s)
    assert shape(out) == [("long", 7, 7)]
    out, got = step(s)
    assert shape(out) == [("long", 14, 6), ("short", 0, 1)] and out.num_batched_tokens == 7
    assert [c.samples for c in out.chunks] == [True, False]
    assert [r.request_id for r in got] == ["long"]
    out, got = step(s)
    assert shape(out) == [("long", 20, 1), ("short", 1, 4)], "decodes come first"
    assert {r.request_id for r in got} == {"long", "short"}
    assert all(r.is_finished and r.finish_reason is FinishReason.LENGTH for r in got)
    assert not s.has_unfinished_requests() and s.kv.num_used_blocks == 0


def test_decodes_before_prefills_and_budget_counts_each_decode_once():
    s = make_scheduler(budget=10)
    for rid in ("a", "b"):
        s.add_request(make_request(rid, 3, max_tokens=5))
    step(s)
    s.add_request(make_request("c", 30, max_tokens=1))
    out, _ = step(s)
    assert shape(out) == [("a", 3, 1), ("b", 3, 1), ("c", 0, 8)]
    assert out.num_batched_tokens == 10


def test_max_num_seqs_caps_running_requests():
    s = make_scheduler(max_seqs=2)
    for rid, n in (("a", 1), ("b", 3), ("c", 1)):
        s.add_request(make_request(rid, 4, max_tokens=n))
    out, _ = step(s)
    assert [c.request_id for c in out.chunks] == ["a", "b"]
    assert s.num_running == 1 and s.num_waiting == 1, "a finished after its first token"
    out, _ = step(s)  # c takes a's seat
    assert [c.request_id for c in out.chunks] == ["b", "c"]


def test_interactive_before_batch_and_fcfs_within_a_priority():
    s = make_scheduler(max_seqs=1)
    s.add_request(make_request("b1", 4, max_tokens=1, priority=BATCH))
    s.add_request(make_request("b2", 4, max_tokens=1, priority=BATCH))
    s.add_request(make_request("late", 4, max_tokens=1, arrival_time=1e9))
    s.add_request(make_request("early", 4, max_tokens=1, arrival_time=-1.0))
    s.add_request(make_request("tie", 4, max_tokens=1, arrival_time=1e9))
    assert [r.request_id for r in s.waiting_requests()] == ["early", "late", "tie", "b1", "b2"]
    order = [step(s)[0].chunks[0].request_id for _ in range(5)]
    assert order == ["early", "late", "tie", "b1", "b2"]


def test_a_batch_head_that_cannot_fit_does_not_block_interactive_requests():
    s = make_scheduler(num_blocks=8, block_size=4)
    s.add_request(make_request("i0", 16, max_tokens=50))  # 4 blocks, then 5
    step(s)
    s.add_request(make_request("big", 20, max_tokens=1, priority=BATCH))  # needs 5 of the 4 left
    s.add_request(make_request("i1", 4, max_tokens=1))
    out, _ = step(s)
    assert [c.request_id for c in out.chunks] == ["i0", "i1"]
    assert s.get_request("big").status is RequestStatus.WAITING


def test_waiting_interactive_preempts_running_batch_for_blocks():
    s = make_scheduler(num_blocks=4, block_size=4)
    s.add_request(make_request("batch", 12, max_tokens=50, priority=BATCH))
    step(s)
    assert s.kv.num_free_blocks == 1
    s.add_request(make_request("inter", 8, max_tokens=2))
    out, _ = step(s)
    assert shape(out) == [("inter", 0, 8)], "the batch decode was taken out of the step"
    assert out.preempted_request_ids == ("batch",)
    batch = s.get_request("batch")
    assert batch.status is RequestStatus.PREEMPTED and batch.num_preemptions == 1
    assert batch.num_computed_tokens == 0 and batch.block_ids == []
    assert s.waiting_requests() == [batch]
    check_invariants(s)
    drain(s)
    # recomputed, then it grew until its next token would not fit the 16-token pool
    assert batch.finish_reason is FinishReason.LENGTH and batch.num_tokens == 17


def test_waiting_interactive_preempts_running_batch_for_a_seat():
    s = make_scheduler(max_seqs=1)
    s.add_request(make_request("batch", 4, max_tokens=5, priority=BATCH))
    step(s)
    s.add_request(make_request("inter", 4, max_tokens=1))
    out, _ = step(s)
    assert shape(out) == [("inter", 0, 4)] and out.preempted_request_ids == ("batch",)
    out, _ = step(s)
    assert out.preempted_request_ids == () and out.chunks[0].request_id == "batch"


def test_equal_priority_never_preempts_for_waiting_requests():
    s = make_scheduler(max_seqs=1)
    s.add_request(make_request("a", 4, max_tokens=3))
    step(s)
    s.add_request(make_request("b", 4, max_tokens=1))
    out, _ = step(s)
    assert shape(out) == [("a", 4, 1)] and out.preempted_request_ids == ()


def test_running_request_that_cannot_grow_preempts_the_latest_arrival():
    s = make_scheduler(num_blocks=4, block_size=2, budget=64)
    a, b = make_request("a", 4, max_tokens=4), make_request("b", 4, max_tokens=4)
    s.add_request(a)
    s.add_request(b)
    step(s)
    out, _ = step(s)  # a needs a third block: the pool is full, b (later) goes
    assert out.preempted_request_ids == ("b",) and shape(out) == [("a", 4, 1)]
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    out, _ = step(s)
    assert out.chunks[0].request_id == "a" and s.num_waiting == 1, "no admission in a step that preempted"


def test_a_request_preempts_itself_when_it_is_the_worst():
    s = make_scheduler(num_blocks=2, block_size=4)
    s.add_request(make_request("a", 3, max_tokens=3))  # room for its next token
    s.add_request(make_request("b", 4, max_tokens=3))  # needs a second block next
    step(s)
    out, _ = step(s)
    assert shape(out) == [("a", 3, 1)] and out.preempted_request_ids == ("b",)


def test_preemption_recomputes_to_the_same_tokens():
    def outputs(num_blocks: int, caching: bool) -> tuple[dict[str, list[int]], int]:
        s = make_scheduler(num_blocks=num_blocks, block_size=2, budget=5, caching=caching)
        reqs = [make_request(f"r{i}", tokens=request_tokens("shared", 3) + [i], max_tokens=8) for i in range(4)]
        run_all(s, *reqs)
        assert s.kv.num_used_blocks == 0
        return {r.request_id: r.output_token_ids for r in reqs}, sum(r.num_preemptions for r in reqs)

    reference, preemptions = outputs(64, caching=False)
    assert preemptions == 0 and all(len(toks) == 8 for toks in reference.values())
    for caching in (False, True):
        got, preemptions = outputs(8, caching)
        assert preemptions > 0
        assert got == reference


def test_abort_frees_blocks_at_once_and_reports_the_count():
    s = make_scheduler(block_size=4)
    r = make_request("r", 10, max_tokens=5)
    w = make_request("w", 10, max_tokens=5, priority=BATCH)
    s.add_request(r)
    step(s)
    s.add_request(w)
    assert s.kv.num_used_blocks == 3
    assert s.abort_request("r") == 3
    assert s.kv.num_used_blocks == 0 and r.block_ids == []
    assert r.status is RequestStatus.FINISHED and r.finish_reason is FinishReason.ABORT
    assert s.get_request("r") is None
    assert s.abort_request("r") == 0 and s.abort_request("nobody") == 0
    assert s.abort_request("w") == 0 and s.num_waiting == 0
    out = s.schedule()
    assert out.is_empty and out.finished_request_ids == ("r", "w")
    assert s.schedule().finished_request_ids == ()


def test_abort_between_schedule_and_update_is_skipped():
    s = make_scheduler()
    s.add_request(make_request("a", 5))
    s.add_request(make_request("b", 5))
    out = s.schedule()
    sampled = fake_sample(out)
    assert s.abort_request("a") > 0
    got = s.update_from_output(out, sampled)
    assert [r.request_id for r in got] == ["b"]
    assert s.kv.num_used_blocks == len(s.get_request("b").block_ids)
    check_invariants(s)


def test_finish_request_with_stop_for_stop_strings():
    s = make_scheduler()
    s.add_request(make_request("a", 5, max_tokens=10))
    step(s)
    assert s.finish_request("a", FinishReason.STOP) == 2
    assert not s.has_unfinished_requests()


def test_update_requires_a_token_for_each_sampling_chunk():
    s = make_scheduler()
    s.add_request(make_request("a", 5))
    with pytest.raises(KeyError, match="no sampled token"):
        s.update_from_output(s.schedule(), {})


def test_stop_token_and_length_limits():
    s = make_scheduler(max_model_len=10)
    probe = make_request("probe", 5)
    stopper = make_request("stopper", tokens=probe.prompt_token_ids, max_tokens=10,
                           stop_token_ids=[fake_token(probe)])
    window = make_request("window", 8, max_tokens=100)
    run_all(s, stopper, window)
    assert stopper.finish_reason is FinishReason.STOP and stopper.num_output_tokens == 1
    assert window.finish_reason is FinishReason.LENGTH and window.num_tokens == 10


def test_a_sequence_that_fills_the_whole_pool_finishes_with_length():
    s = make_scheduler(num_blocks=2, block_size=2)
    r = make_request("r", 3, max_tokens=10)
    run_all(s, r)
    assert r.finish_reason is FinishReason.LENGTH and r.num_tokens == 5
    assert r.num_output_tokens == 2 and s.kv.num_used_blocks == 0


def test_prefix_hit_sets_cached_tokens_and_skips_them():
    s = make_scheduler(block_size=4)
    prompt = request_tokens("p", 14)
    run_all(s, make_request("a", tokens=prompt, max_tokens=1))
    b = make_request("b", tokens=prompt, max_tokens=2)
    s.add_request(b)
    out, _ = step(s)
    assert shape(out) == [("b", 12, 2)]
    assert b.num_cached_tokens == 12
    drain(s)
    assert b.num_cached_tokens == 12


def test_without_chunked_prefill_a_prompt_waits_for_room_in_the_budget():
    s = make_scheduler(budget=16, max_model_len=16, chunked=False)
    s.add_request(make_request("a", 10, max_tokens=3))
    s.add_request(make_request("b", 10, max_tokens=1))
    out, _ = step(s)
    assert shape(out) == [("a", 0, 10)]
    out, _ = step(s)
    assert shape(out) == [("a", 10, 1), ("b", 0, 10)]


def test_refuses_requests_that_could_never_run():
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(InvalidRequestError, match="32 tokens but the model window") as e:
        s.add_request(make_request("long", 32))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match=r"16 tokens and needs 5 KV blocks .* holds 4 blocks"):
        s.add_request(make_request("big", 16))
    with pytest.raises(InvalidRequestError, match="empty"):
        s.add_request(make_request("empty", tokens=[]))
    with pytest.raises(InvalidRequestError, match="model window"):
        s.add_request(make_request("own-window", 8, max_model_len=8))
    s.add_request(make_request("ok", 15, max_tokens=1))
    with pytest.raises(InvalidRequestError, match="already used") as e:
        s.add_request(make_request("ok", 3))
    assert e.value.field == "request_id"
    assert s.num_waiting == 1
    drain(s)
    s.add_request(make_request("ok", 3))  # a finished id may be reused


def test_scheduled_chunk_samples_is_fixed_at_creation():
    r = make_request("r", 4)
    chunk = ScheduledChunk(r, 0, 4)
    assert chunk.samples
    r.append_output_token(1)
    assert chunk.samples and not ScheduledChunk(r, 0, 4).samples


def test_queries():
    s = make_scheduler()
    assert not s.has_unfinished_requests() and s.schedule().is_empty
    r = make_request("r", 4)
    s.add_request(r)
    assert s.get_request("r") is r and s.num_waiting == 1 and s.num_running == 0
    assert r.max_model_len == 256, "the scheduler's window applies"
    step(s)
    assert s.num_waiting == 0 and s.num_running == 1

"""Async scheduling with grammar and penalty requests: step N+1's forward is queued before
step N lands, and its sampling waits for the matchers to advance (masks) while penalties
count tokens on the device. Outputs equal the synchronous engine's, token for token,
for mixed batches with staggered arrivals, aborts and requests ended by their grammar;
no KV block leaks; the device's output counts equal a recount of the tokens."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from llmesh.engine import LLM, FinishReason, SamplingParams, StructuredOutputSpec
from llmesh.engine.request import Request
from llmesh.engine.sampler import Sampler

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
CHOICES = ("yes", "no", "it depends")
PROMPTS = ["The quick brown fox", "Once upon a time", "What is the capital of France?", "def fibonacci(n",
           "Lorem ipsum dolor", "In the beginning", "SELECT * FROM", "Dear Sir or Madam"]


def _spec(kind):
    if kind == "json":
        return StructuredOutputSpec.json_schema(SCHEMA)
    if kind == "regex":
        return StructuredOutputSpec("regex", REGEX)
    return StructuredOutputSpec("choice", choices=CHOICES)


# (arrival step, request id, prompt, params, abort at step or None)
WORKLOAD = [
    (0, "json-greedy", PROMPTS[0], SamplingParams(max_tokens=80, temperature=0.0, structured_output=_spec("json")),
     None),
    (0, "plain", PROMPTS[1], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), None),
    (0, "freq", PROMPTS[2], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, frequency_penalty=1.5,
                                          presence_penalty=0.5), None),
    (2, "choice", PROMPTS[3], SamplingParams(max_tokens=20, temperature=1.0, seed=4, ignore_eos=True,
                                            structured_output=_spec("choice")), None),
    (3, "rep-seeded", PROMPTS[4], SamplingParams(max_tokens=25, temperature=0.8, seed=9, ignore_eos=True,
                                                repetition_penalty=1.4), None),
    (5, "json-seeded", PROMPTS[5], SamplingParams(max_tokens=80, temperature=0.9, seed=3,
                                                 structured_output=_spec("json")), None),
    (6, "regex", PROMPTS[6], SamplingParams(max_tokens=30, temperature=1.0, seed=5, structured_output=_spec("regex"),
                                           frequency_penalty=0.7), None),
    (7, "aborted-json", PROMPTS[7], SamplingParams(max_tokens=80, temperature=0.0, structured_output=_spec("json"),
                                                  repetition_penalty=1.2), 12),
    (9, "choice-greedy", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0, structured_output=_spec("choice")),
     None),
]


def _engine(tiny_llama, async_scheduling: bool) -> LLM:
    llm = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=96, max_model_len=256,
              async_scheduling=async_scheduling)
    # Compile every grammar first: a cache hit is admitted at the next step in both
    # engines, so both see the same batches.
    llm.generate(PROMPTS[:3], [SamplingParams(max_tokens=1, temperature=0.0, structured_output=_spec(k))
                               for k in ("json", "regex", "choice")])
    return llm


def _drive(llm: LLM, launches: list[tuple[bool, bool]] | None = None) -> dict[str, tuple[list[int], str, FinishReason]]:
    """Run WORKLOAD step by step; request id → (tokens, text, finish reason). ``launches``
    gets (a step was in flight, a row takes a grammar mask) for every launch."""
    eng = llm.engine
    core = eng.core
    if launches is not None:
        launch = core.runner.launch

        def observed(scheduled):
            launches.append((core._inflight is not None,
                             any(c.samples and c.request.grammar is not None for c in scheduled.chunks)))
            return launch(scheduled)

        core.runner.launch = observed
    tokens: dict[str, list[int]] = {}
    text: dict[str, str] = {}
    reasons: dict[str, FinishReason] = {}
    for step in range(600):
        for arrival, rid, prompt, params, abort_at in WORKLOAD:
            if arrival == step:
                eng.add_request(prompt, params, request_id=rid)
            if abort_at == step:
                eng.abort_request(rid)
        if step > max(w[0] for w in WORKLOAD) and not eng.has_unfinished_requests():
            break
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            text[out.request_id] = text.get(out.request_id, "") + out.text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    else:
        raise AssertionError("the workload did not finish in 600 steps")
    if launches is not None:
        core.runner.launch = launch
    assert eng.kv.num_used_blocks == 0 and not eng.has_unfinished_requests()
    return {rid: (tokens.get(rid, []), text.get(rid, ""), reasons[rid]) for _, rid, *_ in WORKLOAD}


@pytest.fixture(scope="module")
def runs(tiny_llama):
    sync = _drive(_engine(tiny_llama, False))
    launches: list[tuple[bool, bool]] = []
    async_llm = _engine(tiny_llama, True)
    assert async_llm.engine.async_scheduling
    return sync, _drive(async_llm, launches), launches


def test_async_equals_sync_for_grammar_penalty_and_plain_requests(runs):
    sync, async_, _ = runs
    for rid in sync:
        if rid != "aborted-json":
            assert async_[rid] == sync[rid], rid
    assert async_["aborted-json"][2] is FinishReason.ABORT and sync["aborted-json"][2] is FinishReason.ABORT


def test_constrained_outputs_are_valid_and_end_by_their_grammar(runs):
    _, async_, _ = runs
    for rid in ("json-greedy", "json-seeded"):
        _, text, reason = async_[rid]
        assert reason is FinishReason.STOP, text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert async_["regex"][2] is FinishReason.STOP and re.fullmatch(REGEX, async_["regex"][1])
    # ignore_eos: only the grammar's end stops this one, right after the choice's last token
    for rid in ("choice", "choice-greedy"):
        assert async_[rid][2] is FinishReason.STOP and async_[rid][1] in CHOICES, async_[rid]


def test_grammar_batches_launch_before_the_step_in_flight_lands(runs):
    """The point of the change: a step with grammar rows is scheduled and its forward
    queued while the previous step is still in flight."""
    _, _, launches = runs
    assert sum(1 for inflight, masked in launches if inflight and masked) >= 10, launches


def test_penalty_rows_are_counted_on_the_device(tiny_llama):
    """Under async scheduling a penalised request's row is built from the host once; every
    later token is counted on the device."""
    llm = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=32, max_model_len=256, async_scheduling=True)
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, frequency_penalty=1.0)] * 3
    llm.generate(PROMPTS[:3], params)
    assert llm.engine.runner.sampler.output_counts.rebuilds == 3


def test_penalties_change_the_output(tiny_llama, runs):
    """The penalised rows really are penalised (the comparison above would pass if
    penalties were ignored in both engines)."""
    sync, _, _ = runs
    llm = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=32, max_model_len=256)
    free = llm.generate(PROMPTS[2], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    assert free.token_ids != sync["freq"][0]


def test_device_output_counts_include_tokens_not_yet_on_the_host():
    """Step N+1 samples before step N's token reaches the host (num_pending_tokens 2):
    the counts already hold it, so the row is penalised as a plain synchronous step's."""
    vocab = 32
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 1, vocab, generator=gen)
    second[0, int(first[0].argmax())] = second[0].max() + 0.5  # last step's token leads, unless counted
    params = SamplingParams(temperature=0.0, max_tokens=8, frequency_penalty=2.0, presence_penalty=0.5)

    sampler = Sampler()
    r = Request("r", [1, 2], params, output_token_ids=[3, 3])
    r.num_pending_tokens = 1
    t1 = sampler.sample(first, [r]).to_host().token_ids[0]
    r.num_pending_tokens = 2  # step N+1 scheduled; step N not landed
    t2 = sampler.sample(second, [r]).to_host().token_ids[0]

    landed = Request("p", [1, 2], params, output_token_ids=[3, 3, t1])
    assert t2 == Sampler().sample(second, [landed]).to_host().token_ids[0]
    assert t2 != t1
    r.output_token_ids += [t1, t2]
    r.num_pending_tokens = 1
    slot = sampler.output_counts.rows([r], vocab)
    recount = torch.bincount(torch.tensor(r.output_token_ids), minlength=vocab).to(torch.int32)
    assert torch.equal(sampler.output_counts.gather(slot)[0], recount)


def test_counts_table_is_bounded_and_takes_back_least_recent_rows():
    """The table never grows past max_rows; a new request past it takes the row of the
    request sampled longest ago, and that request's row is rebuilt from the host when it
    samples again (same tokens as a fresh sampler's)."""
    vocab = 16
    params = SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.5, frequency_penalty=0.5)
    sampler = Sampler(max_penalty_rows=4)
    counts = sampler.output_counts
    first = [Request(f"r{i}", [1], params, output_token_ids=[i, i]) for i in range(3)]
    sampler.sample(torch.zeros(3, vocab), first)
    for step in range(5):
        batch = [Request(f"n{step}-{i}", [1], params, output_token_ids=[i + 3]) for i in range(3)]
        sampler.sample(torch.zeros(3, vocab), batch)
        assert counts._table.shape[0] <= 4 and counts.num_rows <= 4
    assert counts._table.shape[0] == 4
    rebuilds = counts.rebuilds
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    got = sampler.sample(logits, first).to_host().token_ids  # their rows were taken back
    assert counts.rebuilds == rebuilds + 3
    assert got == Sampler().sample(logits, first).to_host().token_ids
    with pytest.raises(RuntimeError, match="more than 4 requests with penalties"):
        sampler.sample(torch.zeros(5, vocab), [Request(f"x{i}", [1], params) for i in range(5)])


def test_sampling_runs_in_inference_mode_outside_the_runners():
    """The engine samples a step after launch() returned, outside its inference mode, from
    inference-tensor logits (float32: ``logits.float()`` is the same tensor): the sampler
    enters inference mode itself, and the counts it keeps take updates outside it."""
    vocab = 32
    with torch.inference_mode():
        logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0, max_tokens=8, frequency_penalty=1.0, logprobs=2),
              SamplingParams(temperature=0.9, seed=3, max_tokens=8, presence_penalty=0.5, logit_bias={5: 2.0}),
              SamplingParams(temperature=0.0, max_tokens=8)]
    reqs = [Request(f"r{i}", [1, 2], p, output_token_ids=[4]) for i, p in enumerate(params)]
    sampler = Sampler()
    assert not torch.is_inference_mode_enabled()
    batch = sampler.sample(logits, reqs)
    assert batch.token_ids.is_inference()
    batch.to_host()
    sampler.output_counts.add_host(reqs[0], [7, 7])  # a verify chunk's accepted tokens
    sampler.release(["r1"])
    reqs[0].output_token_ids += [int(batch.token_ids[0]), 7, 7]
    slot = sampler.output_counts.rows([reqs[0]], vocab)
    recount = torch.bincount(torch.tensor(reqs[0].output_token_ids), minlength=vocab).to(torch.int32)
    assert torch.equal(sampler.output_counts.gather(slot)[0], recount)


def _recount_rows(core) -> int:
    """Every live request's device counts row equals a bincount of its tokens on the host,
    plus the token of the step in flight (sampled, not landed): returns the rows checked."""
    counts = core.runner.sampler.output_counts
    checked = 0
    for request_id, row in counts._rows.items():
        req = row.request
        if core.scheduler.get_request(request_id) is not req:
            continue
        on_device = counts._table[row.slot]
        host = torch.bincount(torch.tensor(req.output_token_ids, dtype=torch.long),
                              minlength=on_device.shape[0]).to(torch.int32)
        diff = on_device - host
        assert int(diff.min()) >= 0, request_id
        assert int(diff.sum()) == row.tokens - req.num_output_tokens in (0, 1), request_id
        checked += 1
    return checked


def test_preemption_with_grammar_and_penalty_requests_matches_sync(tiny_llama):
    """A pool too small for the batch preempts grammar and penalty requests mid-output:
    async equals sync; at every step boundary each live row's device counts equal a recount
    of its tokens; finished and aborted requests give their rows back."""
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=16, block_size=4, max_model_len=96,
              max_num_batched_tokens=24, max_num_seqs=6)
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, frequency_penalty=1.2),
              SamplingParams(max_tokens=20, temperature=0.9, seed=7, ignore_eos=True, repetition_penalty=1.3,
                             presence_penalty=0.4),
              SamplingParams(max_tokens=20, temperature=0.0, structured_output=_spec("choice")),
              SamplingParams(max_tokens=24, temperature=1.0, seed=2, structured_output=_spec("regex"),
                             frequency_penalty=0.6),
              SamplingParams(max_tokens=40, temperature=0.0, structured_output=_spec("json"), presence_penalty=0.3),
              SamplingParams(max_tokens=22, temperature=0.0, ignore_eos=True, presence_penalty=0.8),
              SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, frequency_penalty=0.9)]

    def drive(async_scheduling):
        llm = LLM(tiny_llama, async_scheduling=async_scheduling, **kw)
        llm.generate(PROMPTS[:3], [SamplingParams(max_tokens=1, temperature=0.0, structured_output=_spec(k))
                                   for k in ("json", "regex", "choice")])
        eng, core = llm.engine, llm.engine.core
        for i, p in enumerate(params):
            eng.add_request(PROMPTS[i], p, request_id=f"q{i}")
        tokens, reasons, checked = {}, {}, 0
        for step in range(400):
            if step == 9:
                eng.abort_request("q6")
            for out in eng.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
            checked += _recount_rows(core)
            if not eng.has_unfinished_requests():
                break
        eng.step()  # the rows of the last requests to finish go back at the next schedule
        assert core.runner.sampler.output_counts.num_rows == 0 and eng.kv.num_used_blocks == 0
        assert core.runner.sampler.output_counts._table.shape[0] <= kw["max_num_seqs"]
        return tokens, reasons, core, checked

    want, want_reasons, _, _ = drive(False)
    got, got_reasons, core, checked = drive(True)
    assert core.stats().num_preemptions > 0, "the pool was meant to force preemption"
    assert checked > 20
    assert got_reasons["q6"] is FinishReason.ABORT
    assert {k: v for k, v in got.items() if k != "q6"} == {k: v for k, v in want.items() if k != "q6"}
    assert {k: v for k, v in got_reasons.items() if k != "q6"} == {k: v for k, v in want_reasons.items() if k != "q6"}


def test_engine_samples_in_inference_mode(tiny_llama):
    """Async grammar and penalty batches are sampled after launch() returned: every
    sampled batch is still an inference tensor (sampling ran in inference mode)."""
    llm = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=32, max_model_len=128, async_scheduling=True)
    sampler = llm.engine.runner.sampler
    sample, modes = sampler.sample, []

    def observed(*args, **kwargs):
        batch = sample(*args, **kwargs)
        modes.append(batch.token_ids.is_inference())
        return batch

    sampler.sample = observed
    llm.generate(PROMPTS[:3], [SamplingParams(max_tokens=8, temperature=0.0, structured_output=_spec("regex")),
                               SamplingParams(max_tokens=8, temperature=0.7, seed=1, frequency_penalty=1.0),
                               SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, repetition_penalty=1.2)])
    assert modes and all(modes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a GPU matter")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grammar_and_penalty_sampling_adds_no_host_sync(tiny_llama, dtype):
    """On a GPU, sampling a grammar + penalty + seeded batch queues device work only: the
    one intended sync is the read-back of the sampled tokens (outside the sampler)."""
    kw = dict(dtype=dtype, device="cuda", num_kv_blocks=64, max_model_len=128)
    params = [SamplingParams(max_tokens=12, temperature=0.0, structured_output=_spec("json"), frequency_penalty=0.5),
              SamplingParams(max_tokens=12, temperature=1.0, seed=5, structured_output=_spec("regex")),
              SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=20, seed=3, ignore_eos=True,
                             repetition_penalty=1.3, presence_penalty=0.4, logprobs=2),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=1.0)]
    want = LLM(tiny_llama, async_scheduling=False, **kw).generate(PROMPTS[:4], params)
    llm = LLM(tiny_llama, async_scheduling=True, **kw)
    sampler = llm.engine.runner.sampler
    sample, calls = sampler.sample, []

    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return sample(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            calls.append(1)

    sampler.sample = checked
    got = llm.generate(PROMPTS[:4], params)
    assert len(calls) >= 10
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_triton_backend_async_equals_torch_backend_sync(tiny_llama):
    """The triton runner's split launch (forward, then sampling) gives the torch backend's
    synchronous tokens for grammar, penalty and plain rows (on the GPU when there is one, else
    on the CPU through Triton's interpreter; both backends on the same device)."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    kw = dict(dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu", num_kv_blocks=64,
              max_model_len=128)
    params = [SamplingParams(max_tokens=10, temperature=0.0, structured_output=_spec("json")),
              SamplingParams(max_tokens=10, temperature=1.0, seed=5, structured_output=_spec("regex")),
              SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, structured_output=_spec("choice")),
              SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, frequency_penalty=1.5),
              SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)]
    want = LLM(tiny_llama, async_scheduling=False, **kw).generate(PROMPTS[:5], params)
    triton = LLM(tiny_llama, backend="triton", async_scheduling=True, **kw)
    assert triton.engine.async_scheduling
    got = triton.generate(PROMPTS[:5], params)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert got[2].text in CHOICES and triton.engine.kv.num_used_blocks == 0


def test_penalty_counts_take_accepted_drafts(tmp_path):
    """Verify steps (speculative decoding, synchronous) count a request's accepted drafts in
    its device row: speculating, penalised greedy outputs equal the plain engine's."""
    from tests.fixtures.tiny_models import build_tiny_model

    path = build_tiny_model(str(tmp_path / "repetitive"), "llama", hidden_size=32, intermediate_size=64)
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=256, async_scheduling=True)
    prompts = [[(7 * i + j) % 40 + 3 for j in range(24)] for i in range(3)]
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, presence_penalty=0.05 * i,
                             frequency_penalty=0.02, repetition_penalty=1.0 + 0.05 * i) for i in range(3)]
    want = LLM(path, **kw).generate(prompts, params)
    spec = LLM(path, speculative_config=ngram, **kw)
    got = spec.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert spec.engine.core.spec_stats.accepted > 0
    # each row was built once, at its request's first step: later steps' tokens, accepted
    # drafts included, were added to it
    assert spec.engine.runner.sampler.output_counts.rebuilds == len(prompts)

"""Structured output in the engine: every constrained output parses and validates (JSON
schema, JSON object, regex, choice, EBNF), greedy and sampled, in batches mixed with
unconstrained requests (which are unchanged), under async scheduling, with prefix-cache
hits; a complete grammar ends the request with STOP; a bad grammar is refused naming the
field and leaves the engine serving."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llmesh.engine import LLM, FinishReason, InvalidRequestError, SamplingParams, StructuredOutputSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["The quick brown fox", "Once upon a time", "What is the capital of France?", "def fibonacci(n"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=96, max_model_len=256)


def _json(spec=SCHEMA, **kw) -> SamplingParams:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 120)
    return SamplingParams(structured_output=StructuredOutputSpec.json_schema(spec), **kw)


def test_json_schema_output_validates_greedy_and_sampled(llm):
    params = [_json(), _json(temperature=1.0, seed=3), _json(temperature=0.9, top_p=0.9, seed=11), _json()]
    for out in llm.generate(PROMPTS, params):
        assert out.finish_reason is FinishReason.STOP, out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_regex_choice_and_ebnf(llm):
    regex = r"[a-z]{2,5}-[0-9]{1,3}"
    choices = ("yes", "no", "it depends")
    ebnf = 'root ::= "(" num (" + " num){0,3} ")"\nnum ::= [1-9] [0-9]?'
    outs = llm.generate(PROMPTS[:3], [
        SamplingParams(max_tokens=60, temperature=1.0, seed=5, structured_output=StructuredOutputSpec("regex", regex)),
        SamplingParams(max_tokens=60, temperature=1.0, seed=6,
                       structured_output=StructuredOutputSpec("choice", choices=choices)),
        SamplingParams(max_tokens=60, temperature=0.0, structured_output=StructuredOutputSpec("grammar", ebnf)),
    ])
    assert all(o.finish_reason is FinishReason.STOP for o in outs), [(o.text, o.finish_reason) for o in outs]
    assert re.fullmatch(regex, outs[0].text)
    assert outs[1].text in choices
    assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?){0,3}\)", outs[2].text)


def test_demo_model_json_mode_and_schema():
    """The demo instruct model, asked for JSON, writes an object that parses (JSON mode) and
    one that validates against a schema."""
    from llmesh.engine.loader import find_demo_model

    demo = LLM(find_demo_model(), dtype="float32", device="cpu", max_model_len=512)
    tok = demo.get_tokenizer()
    prompt = tok.encode_chat([{"role": "user", "content": "Describe a cat as a JSON object with its name and age."}])
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    outs = demo.generate([prompt, prompt], [
        SamplingParams(max_tokens=80, temperature=0.0, structured_output=StructuredOutputSpec("json_object")),
        _json(person, max_tokens=80)])
    assert [o.finish_reason for o in outs] == [FinishReason.STOP] * 2, [o.text for o in outs]
    assert isinstance(json.loads(outs[0].text), dict)
    jsonschema.validate(json.loads(outs[1].text), person)


def test_mixed_batch_leaves_unconstrained_rows_unchanged(llm):
    free = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)]
    alone = llm.generate(PROMPTS[:2], free)
    mixed = llm.generate(PROMPTS, free + [_json(), _json(temperature=1.0, seed=2)])
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]
    for out in mixed[2:]:
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_constrained_tokens_differ_from_free_ones(llm):
    """The mask is applied: the tiny random model alone never writes this JSON."""
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0.0))[0]
    constrained = llm.generate(PROMPTS[0], _json())[0]
    assert not free.text.startswith('{"name"') and constrained.text.startswith('{"name": "')


def test_async_scheduling_and_prefix_hits_give_the_same_output(tiny_llama, llm):
    async_llm = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=96, max_model_len=256,
                    async_scheduling=True)
    assert async_llm.engine.async_scheduling
    params = [_json(), _json(temperature=1.0, seed=3), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)]
    prompts = [PROMPTS[2] * 3, PROMPTS[2] * 3 + " again", PROMPTS[1]]  # the second shares a cached prefix
    sync_out = llm.generate(prompts, params)
    first = async_llm.generate(prompts, params)
    again = async_llm.generate(prompts, params)  # prefix-cache hits this time
    assert again[0].num_cached_tokens > 0
    expected = [(o.token_ids, o.finish_reason) for o in sync_out]
    assert [(o.token_ids, o.finish_reason) for o in first] == expected
    assert [(o.token_ids, o.finish_reason) for o in again] == expected
    assert async_llm.engine.kv.num_used_blocks == 0


def test_grammar_completion_stops_even_with_ignore_eos(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True,
                                                  structured_output=StructuredOutputSpec("choice", choices=("a", "b"))))[0]
    assert out.finish_reason is FinishReason.STOP and out.text in ("a", "b")


def test_compiled_grammars_are_cached_per_spec(llm):
    core = llm.engine.core
    llm.generate(PROMPTS[:2], [_json(), _json(temperature=1.0, seed=1)])
    size = len(core._grammars)
    llm.generate(PROMPTS[2:], [_json(), _json()])
    assert len(core._grammars) == size


@pytest.mark.parametrize("spec, field", [
    (StructuredOutputSpec("json_schema", '{"type": "object", "properties": {"a": {"type": "strnig"}}}'),
     "structured_output.json_schema"),
    (StructuredOutputSpec("regex", "a(("), "structured_output.regex"),
    (StructuredOutputSpec("grammar", 'root ::= "a" |'), "structured_output.grammar"),
])
def test_bad_grammar_is_refused_naming_the_field(llm, spec, field):
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, structured_output=spec))
    assert err.value.field == field
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0].token_ids


@pytest.mark.parametrize("kwargs, field", [
    ({"kind": "xml"}, "structured_output"),
    ({"kind": "json_schema", "value": "{not json"}, "structured_output.json_schema"),
    ({"kind": "json_schema", "value": "[1]"}, "structured_output.json_schema"),
    ({"kind": "choice", "choices": ()}, "structured_output.choice"),
    ({"kind": "regex", "value": ""}, "structured_output.regex"),
])
def test_malformed_spec_is_refused_naming_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        StructuredOutputSpec(**kwargs)
    assert err.value.field == field


def test_logprobs_of_a_constrained_request_are_finite(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0.0, logprobs=5,
                                                  structured_output=StructuredOutputSpec("choice", choices=("a",))))[0]
    assert out.text == "a" and out.logprobs
    for lp in out.logprobs:
        assert all(-9999.0 <= v <= 0.0 for _, v in lp.top) and lp.logprob > -9999.0


def test_batched_mask_fill_equals_one_matcher_at_a_time(llm):
    """Rows without drafts are filled by xgrammar's batch matcher (threads): the same bits as
    each matcher's own fill, with a row holding drafts and an unconstrained row beside them."""
    import torch
    import xgrammar as xgr

    from llmesh.engine.structured_output.state import GrammarState, apply_bitmask

    core = llm.engine.core
    vocab = llm.engine.model_config.vocab_size
    compiled = core._grammar_cache().get(StructuredOutputSpec.json_schema(SCHEMA)).result(timeout=60)
    regex = core._grammar_cache().get(StructuredOutputSpec("regex", "(ab|cd)+x")).result(timeout=60)
    states = [GrammarState(compiled, [0]) for _ in range(3)] + [GrammarState(regex, [0])]
    tok = llm.get_tokenizer()
    for t in tok.encode('{"name": "b', add_special_tokens=False):
        states[1].accept(t)  # matchers in different states
    drafts = tuple(tok.encode("ab", add_special_tokens=False))
    assert states[3].valid_prefix(list(drafts)) == len(drafts)
    rows = [(0, states[0], ()), (2, states[1], ()), (3, states[2], ()), (4, states[3], drafts)]
    logits = torch.zeros(5 + len(drafts), vocab)
    apply_bitmask(logits, rows)
    want = xgr.allocate_token_bitmask(logits.shape[0], vocab)
    for i, state, d in rows:
        state.fill_rows(want, i, d)
    expect = torch.zeros_like(logits)
    xgr.apply_token_bitmask_inplace(expect, want, vocab_size=vocab,
                                    indices=[0, 2, 3, *range(4, 5 + len(drafts))])
    assert torch.equal(logits, expect)
    assert torch.isinf(logits[0]).any() and not torch.isinf(logits[1]).any()  # row 1: unconstrained
    assert not torch.equal(logits[0], logits[2])  # different matcher states, different masks

"""The user-facing Python API: LLM.generate, SamplingParams, stop handling, errors."""

from __future__ import annotations

import pytest

from llmesh.engine import LLM, FinishReason, InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=64)


def test_generate_returns_per_prompt_outputs_in_order(llm):
    outs = llm.generate(["hello world", "the quick brown fox", [5, 6, 7]],
                        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5, 5]
    assert all(o.finish_reason is FinishReason.LENGTH for o in outs)
    tok = llm.get_tokenizer()
    for o in outs:
        assert o.text == tok.decode(o.token_ids)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate(["a seeded prompt"], p)[0].token_ids
    crowd = llm.generate(["other", "a seeded prompt", "and more"],
                         [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True), p,
                          SamplingParams(max_tokens=3, temperature=0.7, ignore_eos=True)])[1].token_ids
    assert alone == crowd


def test_stop_string_is_never_emitted(llm):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = llm.generate(["stop string probe"], greedy)[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate(["stop string probe"],
                       SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]


def test_stop_token_id(llm):
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ids = llm.generate(["stop token probe"], greedy)[0].token_ids
    out = llm.generate(["stop token probe"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                            stop_token_ids=[ids[2]]))[0]
    assert out.token_ids == ids[: ids.index(ids[2]) + 1]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == ids[2]


def test_logprobs_with_alternatives(llm):
    out = llm.generate(["logprob probe"], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3,
                                                         ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.rank == 1 and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)


def test_window_is_enforced(llm):
    with pytest.raises(InvalidRequestError, match="256"):
        llm.generate([[5] * 300], SamplingParams(max_tokens=4))
    out = llm.generate([[5] * 250], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 6


def test_bad_input_is_refused_with_the_field_named(llm):
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[1, 2, 100_000]])
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]])
    assert llm.engine.kv.num_used_blocks == 0


def _run(llm, prompts, params, text_deltas):
    """Each request's deltas through LLMEngine.step, added with or without text deltas."""
    eng = llm.engine
    ids = [eng.add_request(p, params, text_deltas=text_deltas).request_id for p in prompts]
    deltas = {i: [] for i in ids}
    while eng.has_unfinished_requests():
        for d in eng.step():
            deltas[d.request_id].append(d)
    return [deltas[i] for i in ids]


def test_text_whole_at_the_end_equals_the_streamed_text(llm):
    """LLM.generate reads only the final text: its requests are detokenized once at the end,
    and that text equals what the per-step deltas add up to, special tokens and all."""
    prompts = ["hello world", "the quick brown fox", [5, 6, 7], [1, 2, 3, 4, 5, 6]]
    for skip in (True, False):
        params = SamplingParams(max_tokens=17, temperature=1.0, seed=7, ignore_eos=True, skip_special_tokens=skip)
        streamed = _run(llm, prompts, params, text_deltas=True)
        whole = _run(llm, prompts, params, text_deltas=False)
        for s, w in zip(streamed, whole):
            assert [t for d in w for t in d.token_ids] == [t for d in s for t in d.token_ids]
            assert all(d.text == "" for d in w[:-1]) and w[-1].finished
            assert w[-1].text == "".join(d.text for d in s)
            assert w[-1].text == llm.get_tokenizer().decode([t for d in w for t in d.token_ids],
                                                            skip_special_tokens=skip)
        outs = llm.generate(prompts, params)
        assert [o.text for o in outs] == ["".join(d.text for d in s) for s in streamed]


def test_stop_strings_still_end_requests_whose_text_comes_at_the_end(llm):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = _run(llm, ["stop string probe"], greedy, text_deltas=False)[0][-1].text
    stop = full[4:7]
    (deltas,) = _run(llm, ["stop string probe"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                                stop=[stop]), text_deltas=False)
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].stop_reason == stop
    assert "".join(d.text for d in deltas) == full[: full.index(stop)]

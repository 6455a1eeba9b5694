"""Chat templates render exactly as transformers renders them, in a sandbox, with errors a
user can act on. Each template here is also rendered by HF's ``apply_chat_template``."""

from __future__ import annotations

import pytest

from llmesh.engine.errors import InvalidRequestError, UnsupportedModelError
from llmesh.engine.text.chat_template import compile_chat_template, render_chat_template
from llmesh.engine.text.tokenizer import Tokenizer
from tests.fixtures.tiny_tokenizer import build_tiny_tokenizer

LLAMA3_STYLE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for m in messages %}
    {%- if m['role'] == 'system' %}
        {%- set ns.system = m['content'] %}
        {%- continue %}
    {%- endif %}
    {%- if loop.index0 > 8 %}{% break %}{% endif %}
    {{- '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}
{%- endfor %}
{%- if ns.system %}[system: {{ ns.system }}]{% endif %}
Today is a day of {{ strftime_now('%Y') | length }} digits.
{% if add_generation_prompt %}
    <|im_start|>assistant
{% endif %}"""

TOOLS_STYLE = """{%- if tools %}
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{{ tool | tojson(indent=2) }}
{%- endfor %}
</tools>
{%- endif %}
{%- for m in messages %}
<{{ m.role }}{% if 'name' in m %} name="{{ m.name }}"{% endif %}>{{ m.content }}
{%- endfor %}
{%- if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{{ eos_token }}"""

ALTERNATING = """{%- for m in messages %}
{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
{{- m['role'] }}: {{ m['content'] }}
{% endfor %}"""

GENERATION_MARKS = """{% for m in messages %}
{% if m.role == 'assistant' %}
    {% generation %}{{ m.content }}<|im_end|>{% endgeneration %}
{% else %}
    {{ m.role }}: {{ m.content }}
{% endif %}
{% endfor %}"""

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & 'here'",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

CONVS = [
    [{"role": "user", "content": "  Hi there!  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "和 3+3? 😀"}],
    [{"role": "user", "content": "x", "name": "bob"}, {"role": "assistant", "content": "y", "name": None}],
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("tiny-tok"))
    build_tiny_tokenizer(path)
    return Tokenizer.from_hf_folder(path), AutoTokenizer.from_pretrained(path)


def _hf_render(hf, template, conv, **kw):
    return hf.apply_chat_template(conv, chat_template=template, tokenize=False, **kw)


def _ours(tok: Tokenizer, template: str, conv, **kw):
    return render_chat_template(template, conv, bos_token=tok.bos_token, eos_token=tok.eos_token, **kw)


@pytest.mark.parametrize("template", [LLAMA3_STYLE, TOOLS_STYLE, GENERATION_MARKS],
                         ids=["llama3-style", "tools-style", "generation-marks"])
@pytest.mark.parametrize("gen", [True, False])
def test_matches_hf(pair, template, gen):
    ours, hf = pair
    for conv in CONVS:
        assert _ours(ours, template, conv, add_generation_prompt=gen) == _hf_render(
            hf, template, conv, add_generation_prompt=gen)


def test_tools_and_extra_variables_match_hf(pair):
    ours, hf = pair
    conv = CONVS[0]
    got = _ours(ours, TOOLS_STYLE, conv, tools=[TOOL], enable_thinking=False)
    assert got == _hf_render(hf, TOOLS_STYLE, conv, tools=[TOOL], enable_thinking=False)
    assert "<now> & 'here'" in got  # tojson does not HTML-escape
    assert '\n  "type": "function"' in got  # tojson(indent=2)


def test_tokenizer_method_uses_model_template(pair):
    ours, hf = pair
    for conv in CONVS[:2]:
        assert ours.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False,
                                                                        add_generation_prompt=True)


def test_raise_exception_becomes_invalid_request():
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_chat_template(ALTERNATING, ok) == "user: a\nassistant: b\n"
    with pytest.raises(InvalidRequestError, match="roles must alternate") as err:
        render_chat_template(ALTERNATING, [{"role": "assistant", "content": "b"}])
    assert err.value.field == "messages"


@pytest.mark.parametrize("messages, field", [
    ("hello", "messages"),
    ([], "messages"),
    (["hello"], "messages[0]"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "user"}], "messages[1].content"),
    ([{"role": "user", "content": ["parts"]}], "messages[0].content"),
    ([{"role": 3, "content": "x"}], "messages[0].role"),
])
def test_message_validation_names_the_field(messages, field):
    with pytest.raises(InvalidRequestError) as err:
        render_chat_template("{{ messages }}", messages)
    assert err.value.field == field
    assert field in str(err.value) or field == "messages"


def test_no_template_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="no chat template"):
        render_chat_template(None, [{"role": "user", "content": "x"}])


def test_invalid_template_is_the_models_fault():
    with pytest.raises(UnsupportedModelError, match="not valid Jinja"):
        render_chat_template("{% for m in messages %}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{% set x = messages.append({'role': 'x'}) %}",
    "{% set ns = namespace(_secret=1) %}{{ ns._secret }}",
], ids=["dunder-chain", "mutation", "namespace-underscore"])
def test_sandbox_blocks_unsafe_templates(template):
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def test_sandbox_hides_internals():
    template = "{{ dict.__init__ }}{{ '{0.__class__}'.format(1) }}{{ strftime_now.__globals__ }}"
    assert render_chat_template(template, [{"role": "user", "content": "x"}]) == ""


def test_undefined_variable_use_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        render_chat_template("{{ messages[0]['missing'].upper() }}", [{"role": "user", "content": "x"}])


def test_templates_compile_once():
    assert compile_chat_template(ALTERNATING) is compile_chat_template(ALTERNATING)


def test_caller_messages_are_not_changed():
    conv = [{"role": "user", "content": "x", "name": None}]
    render_chat_template("{{ messages | length }}", conv)
    assert conv == [{"role": "user", "content": "x", "name": None}]

"""Render a model's own Jinja chat template the way Hugging Face transformers does.

Chat templates ship inside model files, so they are untrusted code: they run in Jinja's
``ImmutableSandboxedEnvironment`` with the same options, globals and filters as
transformers' ``apply_chat_template`` (``trim_blocks``, ``lstrip_blocks``, the
``loopcontrols`` extension, ``{% generation %}`` blocks, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not HTML-escape, a ``namespace`` that refuses
underscore attributes). Rendering the same messages therefore gives byte-for-byte the
prompt the model was trained on.

Templates are compiled once per distinct source string (an LRU cache), since every chat
request of a model renders the same template.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmesh.engine.errors import InvalidRequestError, UnsupportedModelError

__all__ = ["compile_chat_template", "render_chat_template", "validate_messages"]


class ChatTemplateRaisedError(InvalidRequestError):
    """The template itself rejected the conversation via ``raise_exception``."""


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot render (e.g. roles out of
    # order); the message is the template author's and is meant for the user.
    raise ChatTemplateRaisedError(str(message), field="messages")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and "'", which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` for templates: builds dicts but exposes no type internals."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` for templates: underscore-prefixed attributes are refused."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes, got {name!r}"
            )


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged.

    Some templates mark the assistant's tokens this way for training masks
    (transformers' AssistantTracker); serving only needs the text.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile ``template`` once; a template that does not parse is the model's fault."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UnsupportedModelError(
            f"the model's chat template is not valid Jinja (line {e.lineno}: {e.message}); "
            "fix chat_template in the model's tokenizer files"
        ) from e


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the conversation shape and return fresh dict copies the template can read.

    Each message must be a mapping with a string ``role`` and a string ``content``;
    other keys (``name``, ``tool_calls``...) pass through. Like transformers, keys whose
    value is None are dropped, since templates test for a key's presence.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects",
                                  field="messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}",
                field=f"messages[{i}]",
            )
        for key in ("role", "content"):
            value = msg.get(key)
            if not isinstance(value, str):
                what = "is missing" if value is None else f"must be a string, got {type(value).__name__}"
                raise InvalidRequestError(f"messages[{i}].{key} {what}", field=f"messages[{i}].{key}")
        out.append({k: v for k, v in msg.items() if v is not None})
    return out


def render_chat_template(
    template: str | None,
    messages: Any,
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with the model's ``template`` into one prompt string.

    Variables seen by the template: ``messages``, ``add_generation_prompt``,
    ``bos_token``, ``eos_token``, ``tools`` and ``documents`` (None unless given), and any
    extra ``kwargs`` (e.g. ``enable_thinking``), which override the special tokens as in
    transformers.
    """
    if not template:
        raise InvalidRequestError(
            "this model has no chat template; send a plain prompt instead of chat messages",
            field="messages",
        )
    compiled = compile_chat_template(template)
    variables: dict[str, Any] = {"tools": None, "documents": None}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    variables.update(kwargs)
    variables["messages"] = validate_messages(messages)
    variables["add_generation_prompt"] = add_generation_prompt
    try:
        return compiled.render(**variables)
    except ChatTemplateRaisedError:
        raise
    except jinja2.TemplateError as e:
        # Undefined fields, sandbox violations, filters used wrongly: the conversation
        # does not fit this model's template.
        raise InvalidRequestError(f"the model's chat template failed on these messages: {e}",
                                  field="messages") from e
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise InvalidRequestError(f"the model's chat template failed on these messages: {e!r}",
                                  field="messages") from e

"""Specs → xgrammar grammars: checked at the front end, compiled once per spec in the core.

A grammar is compiled against one tokenizer (which token strings each grammar state
allows), which takes from milliseconds to seconds; ``GrammarCache`` keeps the compiled
grammars of one engine (one tokenizer, one vocabulary) in an LRU keyed by the spec and
compiles new ones on a worker thread, so the core's step loop never waits for one.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterable

import xgrammar as xgr

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.structured_output.spec import StructuredOutputSpec
from llmesh.engine.text.tokenizer import Tokenizer

_XGR_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")

JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""JSON mode: any JSON object (OpenAI's ``json_object`` asks for an object, not any value)."""


def build_grammar(spec: StructuredOutputSpec) -> xgr.Grammar:
    """Parse ``spec`` into a grammar; raises InvalidRequestError naming the field.

    JSON is generated without free whitespace (``any_whitespace=False``): allowing any
    amount lets a small model emit spaces and newlines until max_tokens, and the compact
    form is what ``json.dumps`` writes anyway.
    """
    try:
        if spec.kind in ("json_object", "json_schema"):
            schema = JSON_OBJECT_SCHEMA if spec.kind == "json_object" else spec.value
            return _without_raw_control_chars(
                xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            alternatives = " | ".join(_ebnf_literal(c) for c in spec.choices)
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        return xgr.Grammar.from_ebnf(spec.value)
    except (RuntimeError, ValueError, TypeError) as e:
        message = _XGR_LOG_PREFIX.sub("", str(e).strip())
        raise InvalidRequestError(f"{spec.field} is not a valid {spec.kind.replace('_', ' ')}: {message}",
                                  field=spec.field) from None


_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def _without_raw_control_chars(grammar: xgr.Grammar) -> xgr.Grammar:
    """xgrammar writes the characters of a length-bounded string (minLength/maxLength) as
    "anything but quote, backslash, CR, LF", which lets tabs and other control characters
    through raw; JSON forbids them unescaped (json.loads refuses the output). Such rules
    are rewritten to JSON's own character class."""
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


def _ebnf_literal(text: str) -> str:
    # JSON string escapes (\" \\ \n \uXXXX) are also EBNF string-literal escapes.
    return json.dumps(text, ensure_ascii=False)


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> xgr.TokenizerInfo:
    """What xgrammar needs to know of a tokenizer: every id's string, and how strings encode.

    ``vocab_size`` is the model's (the logits' width), which may exceed the tokenizer's
    (padded rows, never allowed) or fall short of it (added tokens the model cannot emit).
    """
    encoded = [""] * vocab_size
    for token, idx in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if idx < vocab_size:
            encoded[idx] = token
    # xgrammar's own detection of the byte encoding (byte-level, byte-fallback or raw)
    # from the tokenizer.json text, as its from_huggingface does.
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
    return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=sorted(set(stop_token_ids)), add_prefix_space=meta["add_prefix_space"])


class GrammarCache:
    """One engine's compiled grammars: an LRU of ``capacity`` specs, compiled off-thread."""

    def __init__(self, info: xgr.TokenizerInfo, capacity: int = 256, threads: int = 2) -> None:
        self.info = info
        self.capacity = capacity
        # xgrammar's own cache is off: this LRU is the one place compiled grammars live.
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._entries: OrderedDict[StructuredOutputSpec, Future] = OrderedDict()

    def get(self, spec: StructuredOutputSpec) -> Future:
        """The compiled grammar of ``spec``, as a future (already done on a cache hit)."""
        with self._lock:
            future = self._entries.get(spec)
            if future is not None:
                self._entries.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._entries[spec] = future
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return future

    def _compile(self, spec: StructuredOutputSpec) -> xgr.CompiledGrammar:
        try:
            return self._compiler.compile_grammar(build_grammar(spec))
        except BaseException:
            with self._lock:  # a failure is not cached: the next request with this spec retries
                self._entries.pop(spec, None)
            raise

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

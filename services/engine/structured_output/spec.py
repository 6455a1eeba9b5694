"""What a request's structured output asks for: a JSON object, a JSON schema, a regex, one
of several strings, or an EBNF grammar. Torch- and xgrammar-free, so the gateway and the
proto conversion can build and check it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmesh.engine.errors import InvalidRequestError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
"""``grammar`` is EBNF in xgrammar's (GBNF-like) syntax, with a ``root`` rule."""
FIELD = "structured_output"


@dataclass(frozen=True)
class StructuredOutputSpec:
    """One constraint on a request's output; ``kind`` picks which of the others is used.

    ``value`` is the schema's JSON text (json_schema), the pattern (regex) or the EBNF
    source (grammar); ``choices`` the allowed outputs (choice). Frozen and hashable: it is
    the key of the core's compiled-grammar cache.
    """

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"{FIELD} kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}",
                                      field=FIELD)
        field = self.field
        if self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise InvalidRequestError(f"{field} must be a non-empty list of non-empty strings", field=field)
            object.__setattr__(self, "choices", tuple(self.choices))
        elif self.kind != "json_object":
            if not isinstance(self.value, str) or not self.value.strip():
                raise InvalidRequestError(f"{field} must be a non-empty string", field=field)
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.value)
            except ValueError as e:
                raise InvalidRequestError(f"{field} is not valid JSON ({e})", field=field) from None
            if not isinstance(schema, dict):
                raise InvalidRequestError(f"{field} must be a JSON object (a schema), got "
                                          f"{type(schema).__name__}", field=field)

    @property
    def field(self) -> str:
        """The request field this constraint came from, for error messages."""
        return f"{FIELD}.{self.kind}"

    @classmethod
    def json_schema(cls, schema: dict | str) -> StructuredOutputSpec:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

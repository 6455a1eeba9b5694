"""Service configs: one dataclass per service, built once from flags and environment.

Each field carries its help text in ``metadata["help"]``. ``load_config`` turns the
fields into ``--field-name`` flags whose defaults come from ``LLMESH_<SERVICE>_<FIELD>``
variables, then from the dataclass; ``__post_init__`` of the dataclass validates.
Precedence: flag > environment > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(tp: type, optional: bool):
    base = {bool: _parse_bool, int: int, float: float, str: str}.get(tp)
    if base is None:
        if typing.get_origin(tp) is list:
            return lambda s: [x for x in s.split(",") if x]
        raise TypeError(f"unsupported config field type {tp!r}")
    if not optional:
        return base
    return lambda s: None if s.strip().lower() in ("", "none", "null") else base(s)


def load_config(cls: type[T], argv: list[str] | None, *, service: str, description: str = "") -> T:
    """Build ``cls`` from ``argv`` (None: sys.argv) and ``LLMESH_<SERVICE>_*`` variables."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=f"llmesh-{service}", description=description or cls.__doc__)
    prefix = f"LLMESH_{service.upper().replace('-', '_')}_"
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        conv = _converter(tp, optional)
        env = prefix + f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if env in os.environ:
            try:
                default = conv(os.environ[env])
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"{env}={os.environ[env]!r}: {e}") from None
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=conv, default=default,
                            metavar=tp.__name__.upper() if isinstance(tp, type) else "VALUE",
                            # argparse %-formats help strings: escape literal percent signs
                            help=f"{f.metadata.get('help', '')} (env {env}; default: {default!r})".replace("%", "%%"))
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except ValueError as e:
        parser.error(str(e))
        raise


def require(cond: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: a ValueError with a user-facing message."""
    if not cond:
        raise ValueError(message)

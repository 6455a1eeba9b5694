"""Configs: typed dataclasses, built once from flags, environment, files or keyword arguments.

Each field carries its help text in ``metadata["help"]`` (``option``). A config may nest
per-area dataclasses (an engine's cache and scheduler settings); users never see the
nesting: every leaf field is one flat *option* named after the field, so one name works
as a ``--flag-name`` flag, a ``LLMESH_<SERVICE>_<NAME>`` variable, a key of a file and a
keyword argument. ``options`` lists them, ``build`` makes a config from flat values
(naming unknown keys and wrong types), ``load_config`` from flags and environment with
precedence flag > environment > default. ``__post_init__`` of each dataclass validates.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

MISSING: Any = dataclasses.MISSING


def option(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its help text; ``MISSING`` as default makes it required."""
    meta = {"help": help, **kw}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def derived(default: Any, help: str) -> Any:  # noqa: A002
    """A field the code fills in (say, a limit resolved from the model): no flag, no key, no kwarg."""
    return dataclasses.field(default=default, metadata={"help": help, "option": False})


def group(cls: type, **defaults: Any) -> Any:
    """A nested config area whose options join the parent's; ``defaults`` replace the area's
    own for this embedding only (say, the engine service serves the demo model by default)."""
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata={"defaults": defaults})


@dataclasses.dataclass(frozen=True)
class Option:
    """One leaf field of a (possibly nested) config, as users name it."""

    name: str
    path: tuple[str, ...]
    """Attribute path from the root config, e.g. ("cache", "block_size")."""
    type: type
    optional: bool
    """None is a valid value."""
    default: Any
    """MISSING when the option is required."""
    help: str
    area: type
    """The dataclass that declares it (its docstring titles the option's group in --help)."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def env(self, service: str) -> str:
        return env_prefix(service) + self.name.upper()

    def check(self, value: Any, what: str) -> None:
        """TypeError unless ``value`` has this option's type (files and kwargs are not parsed from text)."""
        if value is None and self.optional:
            return
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}.get(self.type, lambda v: True)
        if not ok(value):
            want = self.type.__name__ + (" or None" if self.optional else "")
            raise TypeError(f"{what}: {self.name} must be {want}, got {value!r}")


class UnknownOptionError(TypeError):
    """A key that names no option; the message lists the valid ones."""


def env_prefix(service: str) -> str:
    return f"LLMESH_{service.upper().replace('-', '_')}_"


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def options(cls: type) -> dict[str, Option]:
    """Every option of ``cls`` by flat name, nested areas included, in declaration order."""
    found: dict[str, Option] = {}
    _collect(cls, (), {}, found)
    return found


def _collect(cls: type, path: tuple[str, ...], overrides: Mapping[str, Any], found: dict[str, Option]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            _collect(tp, (*path, f.name), {**f.metadata.get("defaults", {}), **overrides}, found)
            continue
        if not f.metadata.get("option", True):
            continue
        if f.name in found:
            raise TypeError(f"{cls.__name__}.{f.name}: option name already used by "
                            f"{'.'.join(found[f.name].path)}; flat names must be unique")
        default = (f.default if f.default is not MISSING else
                   f.default_factory() if f.default_factory is not MISSING else MISSING)
        found[f.name] = Option(f.name, (*path, f.name), tp, optional, overrides.get(f.name, default),
                               f.metadata.get("help", ""), cls)


def _unknown_message(what: str, unknown: list[str], valid: list[str]) -> str:
    hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, valid, 1)) else repr(k)
             for k in unknown]
    return f"{what}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; valid: {', '.join(valid)}"


def check_values(cls: type, values: Mapping[str, Any], *, what: str,
                 exclude: Mapping[str, str] | None = None) -> None:
    """Raise UnknownOptionError/TypeError unless every key names an option of ``cls`` (not one
    of ``exclude``, which maps a key to why it cannot be set here) and has its type."""
    opts, exclude = options(cls), exclude or {}
    for key, why in exclude.items():
        if key in values:
            raise UnknownOptionError(f"{what}: {key} cannot be set here: {why}")
    valid = [n for n in opts if n not in exclude]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise UnknownOptionError(_unknown_message(what, unknown, valid))
    for key, value in values.items():
        opts[key].check(value, what)


def build(cls: type[T], values: Mapping[str, Any], *, what: str) -> T:
    """``cls`` from flat option values; unset options keep their dataclass defaults."""
    check_values(cls, values, what=what)
    return _construct(cls, values)


def _construct(cls: type[T], values: Mapping[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _construct(tp, {**f.metadata.get("defaults", {}), **values})
        elif f.metadata.get("option", True) and f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


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


def _title(area: type) -> str:
    return (area.__doc__ or area.__name__).strip().splitlines()[0].rstrip(".")


def build_parser(cls: type, *, service: str, description: str = "") -> argparse.ArgumentParser:
    """One ``--flag`` per option of ``cls``; defaults from ``LLMESH_<SERVICE>_*`` variables, then the dataclass."""
    parser = argparse.ArgumentParser(prog=f"llmesh-{service}", description=description or cls.__doc__)
    groups: dict[type, Any] = {}
    for opt in options(cls).values():
        conv = _converter(opt.type, opt.optional)
        env = opt.env(service)
        default = opt.default
        if env in os.environ:
            try:
                default = conv(os.environ[env])
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"{env}={os.environ[env]!r}: {e}") from None
        target = parser
        if opt.area is not cls:
            target = groups.get(opt.area) or groups.setdefault(opt.area, parser.add_argument_group(_title(opt.area)))
        shown = "required" if default is MISSING else f"default: {default!r}"
        # a bare boolean flag means true, as in vLLM (``--enable-chunked-prefill``)
        bare = {"nargs": "?", "const": True} if opt.type is bool else {}
        target.add_argument(opt.flag, dest=opt.name, type=conv, default=None if default is MISSING else default,
                            required=default is MISSING, **bare,
                            metavar=opt.type.__name__.upper() if isinstance(opt.type, type) else "VALUE",
                            # argparse %-formats help strings: escape literal percent signs
                            help=f"{opt.help} (env {env}; {shown})".replace("%", "%%"))
    return parser


def load_config(cls: type[T], argv: list[str] | None, *, service: str, description: str = "") -> T:
    """Build ``cls`` from ``argv`` (None: sys.argv) and ``LLMESH_<SERVICE>_*`` variables."""
    parser = build_parser(cls, service=service, description=description)
    ns = parser.parse_args(argv)
    try:
        return _construct(cls, vars(ns))
    except ValueError as e:
        parser.error(str(e))
        raise


def require(cond: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: a ValueError with a user-facing message."""
    if not cond:
        raise ValueError(message)

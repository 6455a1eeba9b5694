"""llmesh.config: nested config areas flatten into one namespace of options."""

from __future__ import annotations

import dataclasses

import pytest

from llmesh.config import MISSING, UnknownOptionError, build, derived, group, load_config, option, options


@dataclasses.dataclass
class Inner:
    """Inner area."""

    size: int = option(4, "a size")
    resolved: int | None = derived(None, "filled in later")


@dataclasses.dataclass
class Outer:
    """Outer config."""

    name: str = option(MISSING, "a name")
    ratio: float = option(0.5, "a ratio")
    inner: Inner = group(Inner)


@dataclasses.dataclass
class Wrapper:
    """Embeds Outer with another default for one option."""

    port: int = option(0, "a port")
    outer: Outer = group(Outer, name="default-name")


def test_options_flatten_nested_areas_and_skip_derived_fields():
    opts = options(Outer)
    assert list(opts) == ["name", "ratio", "size"]
    assert opts["size"].path == ("inner", "size") and opts["size"].area is Inner
    assert opts["name"].default is MISSING
    assert options(Wrapper)["name"].default == "default-name"


def test_build_sets_nested_fields_and_keeps_other_defaults():
    cfg = build(Outer, {"name": "x", "size": 8}, what="outer")
    assert cfg == Outer(name="x", ratio=0.5, inner=Inner(size=8))
    with pytest.raises(UnknownOptionError, match="outer: unknown option 'resolved'; valid: name, ratio, size"):
        build(Outer, {"name": "x", "resolved": 3}, what="outer")
    with pytest.raises(TypeError, match="outer: ratio must be float, got True"):
        build(Outer, {"name": "x", "ratio": True}, what="outer")


def test_load_config_parses_nested_options_with_embedding_defaults(monkeypatch):
    monkeypatch.setenv("LLMESH_TESTSVC_SIZE", "16")
    cfg = load_config(Wrapper, ["--ratio", "0.25"], service="testsvc")
    assert cfg == Wrapper(port=0, outer=Outer(name="default-name", ratio=0.25, inner=Inner(size=16)))
    with pytest.raises(SystemExit):
        load_config(Wrapper, ["--resolved", "3"], service="testsvc")


def test_a_flat_name_used_twice_is_refused():
    @dataclasses.dataclass
    class Clash:
        size: int = option(1, "clashes with Inner.size")
        inner: Inner = group(Inner)

    with pytest.raises(TypeError, match="option name already used"):
        options(Clash)

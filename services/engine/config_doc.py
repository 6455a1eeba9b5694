"""docs/configuration.md's option tables, generated from the config dataclasses.

    python -m llmesh.engine.config_doc            # rewrite the tables in docs/configuration.md
    python -m llmesh.engine.config_doc --check    # exit 1 if they are stale (a test runs this)

Only the text between the ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers is generated;
the prose around it is written by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from llmesh.config import MISSING, Option, options
from llmesh.engine.config import EngineConfig
from llmesh.engine.service.config import EngineServiceConfig

SERVICE = "engine"
DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _default(opt: Option) -> str:
    return "required" if opt.default is MISSING else f"`{opt.default!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def engine_table() -> str:
    """One row per EngineConfig option: the same name everywhere, the default of the dataclass."""
    from llmesh.models_file import SET_BY_SPEC

    rows = ["| option (`LLM` kwarg) | flag | env var | models-file `engine:` key | default | meaning |",
            "|---|---|---|---|---|---|"]
    service = options(EngineServiceConfig)
    for opt in options(EngineConfig).values():
        default = _default(opt)
        if service[opt.name].default != opt.default:
            default += f" (engine service: {_default(service[opt.name])})"
        key = f"— (the model's `{'path' if opt.name == 'model' else 'name'}`)" if opt.name in SET_BY_SPEC \
            else f"`{opt.name}`"
        rows.append(f"| `{opt.name}` | `{opt.flag}` | `{opt.env(SERVICE)}` | {key} | {default} "
                    f"| {_cell(opt.help)} |")
    return "\n".join(rows)


def service_table() -> str:
    """The engine process's own options (ports, TLS, index, health): flags and env vars only."""
    engine_names = set(options(EngineConfig))
    rows = ["| flag | env var | default | meaning |", "|---|---|---|---|"]
    for opt in options(EngineServiceConfig).values():
        if opt.name not in engine_names:
            rows.append(f"| `{opt.flag}` | `{opt.env(SERVICE)}` | {_default(opt)} | {_cell(opt.help)} |")
    return "\n".join(rows)


TABLES = {"engine-options": engine_table, "engine-service-options": service_table}


def render(text: str) -> str:
    """``text`` with every marked table regenerated; a ValueError names a missing marker."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{DOC}: no <!-- BEGIN {name} --> ... <!-- END {name} --> section")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmesh.engine.config_doc", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the tables are stale instead of rewriting")
    args = p.parse_args(argv)
    current = DOC.read_text()
    fresh = render(current)
    if fresh == current:
        return 0
    if args.check:
        print(f"{DOC} is stale: run python -m llmesh.engine.config_doc", file=sys.stderr)
        return 1
    DOC.write_text(fresh)
    print(f"rewrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

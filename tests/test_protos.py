"""The committed generated code is what `python -m llmesh.protos` writes now (CI fails when stale),
and every RPC and field of the contract has a doc comment."""

from __future__ import annotations

import re
from pathlib import Path

from llmesh.protos import proto_files, stale_files


def test_generated_code_is_fresh():
    assert stale_files() == [], "run `python -m llmesh.protos` and commit llmesh/v1/"


def test_every_rpc_message_and_field_is_documented():
    undocumented = []
    for path in proto_files():
        lines = Path(path).read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_decl = (s.startswith(("rpc ", "message ", "service ", "enum "))
                       or re.match(r"^(optional |repeated )?[\w.<>, ]+ \w+ = \d+;", s)
                       or re.match(r"^[A-Z_0-9]+ = \d+;", s) or s.startswith("oneof "))
            if is_decl and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{Path(path).name}:{i + 1}: {s}")
    assert not undocumented, "\n".join(undocumented)

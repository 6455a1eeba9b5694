"""Generate the Python code of the gRPC contract: ``python -m llmesh.protos``.

The contract lives in ``protos/llmesh/v1/*.proto``; protoc mirrors that path, so the
generated modules land in ``llmesh/v1/`` and import each other as ``llmesh.v1.*`` with
no rewriting of generated imports. ``--check`` regenerates into a temporary folder and
fails when the committed code differs (CI runs it through the test suite).
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_PACKAGE = Path("llmesh") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "llmesh" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root``; returns the generated files."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
            *(str(p.relative_to(PROTO_DIR)) for p in proto_files())]
    import os
    cwd = os.getcwd()
    os.chdir(PROTO_DIR)
    try:
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
    finally:
        os.chdir(cwd)
    pkg = out_root / OUT_PACKAGE
    (pkg / "__init__.py").write_text('"""Generated gRPC contract (python -m llmesh.protos). Do not edit."""\n')
    return sorted(p for p in pkg.iterdir() if p.is_file())


def stale_files() -> list[str]:
    """Names of generated files that differ from what protoc would write now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = ROOT / OUT_PACKAGE
        names = {p.name for p in fresh} | {p.name for p in committed.glob("*.py*") if p.is_file()}
        stale = []
        for name in sorted(names):
            a, b = Path(tmp) / OUT_PACKAGE / name, committed / name
            if not a.exists() or not b.exists() or not filecmp.cmp(a, b, shallow=False):
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        stale = stale_files()
        if stale:
            print(f"generated code is stale: {', '.join(stale)}; run `python -m llmesh.protos`", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for p in generate(ROOT):
        print("wrote", p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Put the per-device tables a benchmark measured into the modules that read them.

Several benchmarks end by printing a literal such as ``DENSE_CAUSAL_BACKEND['h200'] = {...}`` and
keep it in their result file's workload; the kernel module holds it as source, so a fresh clone
dispatches as that device measured. This script takes those literals from result files and
writes each into its module: an existing ``NAME[tag] = ...`` statement (one line or several) is
replaced unless it already holds the same table, a new one goes right after the table's
declaration and docstring. A literal that does not parse as ``NAME[tag] = <expression>``, or
names a table this script or its module does not know, is an error, and then nothing is written.
Run it on the device after the measuring run, so the rerun that records the headline dispatches
through the tables just measured (bench/run_gpu.sh's causal-tables stage), and commit the
modules it changed with the result files.

Usage: python bench/paste_tables.py RESULT.json [RESULT.json ...] [--root DIR] [--check]
--root: the repository whose modules are written (default: this one); --check: say what would
change and write nothing.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD_KEYS = ("dense_causal_table", "extend_table", "literal", "tuned_literal", "fused_slower_literal")
"""Where result files keep their literals (kernels_gpu.py's two; block_fp8_gpu.py's, decode_tile_sweep.py's
and decode_partition_sweep.py's "literal"; gemm_sweep.py's "tuned_literal", and with --ab-fused
"fused_slower_literal")."""

TABLES = {  # table name -> the module that holds it
    "DENSE_CAUSAL_BACKEND": "llmesh/kernels/dense_causal_attention.py",
    "EXTEND_BACKEND": "llmesh/kernels/extend_attention.py",
    "BLOCK_FP8_TILE": "llmesh/kernels/block_fp8_gemm.py",
    "BLOCK_FP8_LIBRARY": "llmesh/kernels/block_fp8_gemm.py",
    "PAGED_DECODE_TILE": "llmesh/kernels/attention_config.py",
    "DECODE_PARTITION": "llmesh/kernels/attention_config.py",
    "TUNED": "llmesh/kernels/skinny_gemm_config.py",
    "FUSED_SLOWER": "llmesh/kernels/skinny_gemm_config.py",
}


def literals(doc: dict) -> list[tuple[str, str]]:
    """(module path, one ``NAME[tag] = ...`` statement) for each table literal a result file holds."""
    work = doc.get("workload", {})
    out = []
    for key in WORKLOAD_KEYS:
        text = work.get(key)
        for stmt in ast.parse(text).body if text else ():
            target = _target(stmt)
            if target is None or target[0] not in TABLES:
                raise ValueError(f"{key}: not an entry of a known table ({', '.join(TABLES)}): "
                                 f"{ast.get_source_segment(text, stmt)[:120]!r}")
            out.append((TABLES[target[0]], ast.get_source_segment(text, stmt)))
    return out


def _target(stmt: ast.stmt) -> tuple[str, object] | None:
    """(table name, device key) of ``NAME[key] = ...`` with a literal key, else None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Subscript)):
        return None
    sub = stmt.targets[0]
    if not isinstance(sub.value, ast.Name):
        return None
    try:
        return sub.value.id, ast.literal_eval(sub.slice)
    except ValueError:
        return None


def double_quoted(statement: str) -> str:
    """``statement`` with its single-quoted string literals double-quoted (the benchmarks print
    their tables with repr; the modules quote with double quotes), other tokens as they are."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(statement).readline):
        text = tok.string
        simple = text[:1] == "'" and text[:3] != "'" * 3 and '"' not in text and "\\" not in text
        if tok.type == tokenize.STRING and simple:  # same length: the tokens keep their columns
            tok = tok._replace(string='"' + text[1:-1] + '"')
        out.append(tok)
    return tokenize.untokenize(out)


def wrapped(statement: str, width: int = 120) -> str:
    """A dict literal longer than ``width`` one entry a line (the modules' line length)."""
    stmt = ast.parse(statement).body[0]
    if len(statement) <= width or not isinstance(stmt.value, ast.Dict) or None in stmt.value.keys:
        return statement
    head = ast.get_source_segment(statement, stmt.targets[0])
    entries = [f"    {ast.get_source_segment(statement, k)}: {ast.get_source_segment(statement, v)},"
               for k, v in zip(stmt.value.keys, stmt.value.values)]
    return "\n".join([f"{head} = {{", *entries, "}"])


def paste(source: str, statement: str) -> str:
    """``source`` with ``statement`` (``NAME[tag] = ...``) in place of the module's own entry for
    that tag, or after NAME's declaration and its docstring where the module has none."""
    parsed = ast.parse(statement).body
    target = _target(parsed[0]) if len(parsed) == 1 else None
    if target is None:
        raise ValueError(f"not a table entry (NAME[tag] = ...): {statement[:120]!r}")
    name = target[0]
    statement = wrapped(double_quoted(statement))
    lines = source.splitlines(keepends=True)
    body = ast.parse(source).body
    for stmt in body:
        if _target(stmt) == target:
            if ast.dump(stmt.value) == ast.dump(parsed[0].value):
                return source  # the same table already: the module's layout and comments stay
            return "".join(lines[:stmt.lineno - 1]) + statement + "\n" + "".join(lines[stmt.end_lineno:])
    for i, stmt in enumerate(body):
        names = [stmt.target] if isinstance(stmt, ast.AnnAssign) else getattr(stmt, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == name for t in names):  # NAME's declaration
            end = stmt.end_lineno
            following = body[i + 1] if i + 1 < len(body) else None
            if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                end = following.end_lineno  # the table's docstring stays with its declaration
            return "".join(lines[:end]) + statement + "\n" + "".join(lines[end:])
    raise ValueError(f"{name} is not declared in this module")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    pending: dict[str, list[str]] = {}
    for path in args.results:
        for module, statement in literals(json.loads(path.read_text())):
            pending.setdefault(module, []).append(statement)
    if not pending:
        print(f"[paste] no table literals in {', '.join(map(str, args.results))}", file=sys.stderr)
        return 1
    changed: dict[Path, str] = {}
    for module, statements in pending.items():  # every module worked out before any is written
        path = args.root / module
        old = path.read_text()
        new = old
        for statement in statements:
            new = paste(new, statement)
        compile(new, str(path), "exec")
        print(f"[paste] {module}: " + ("unchanged" if new == old else "; ".join(s.split(" =")[0] for s in statements)))
        if new != old:
            changed[path] = new
    for path, new in changed.items() if not args.check else ():
        path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

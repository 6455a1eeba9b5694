"""Text output: a run's summary table, and ``bench compare`` of two result files."""

from __future__ import annotations

import json
from pathlib import Path

_SHOWN = ("req_s", "out_tok_s", "goodput_req_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms",
          "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "completed_n", "failed_n")

# Metrics where a larger value is better; for the others (latencies, failures) smaller is.
_HIGHER_IS_BETTER = ("_tok_s", "req_s", "_frac", "_x", "completed_n")


def format_summary(label: str, metrics: dict[str, float]) -> str:
    lines = [f"== {label}"]
    for k in _SHOWN:
        if k in metrics:
            lines.append(f"  {k:<16} {metrics[k]:12.2f}")
    lines += [f"  {k:<16} {v:12.0f}" for k, v in metrics.items() if k.startswith("errors_")]
    return "\n".join(lines)


def load_result(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc.get("metrics"), dict):
        raise ValueError(f"{path} is not a benchmark result (no 'metrics' object)")
    return doc


def _better(name: str, delta: float) -> str:
    if delta == 0:
        return ""
    higher = any(name.endswith(s) for s in _HIGHER_IS_BETTER)
    return "better" if (delta > 0) == higher else "worse"


def compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """A table of every metric in either file: A, B, B - A, relative change, which way."""
    ma, mb = a["metrics"], b["metrics"]
    keys = list(ma) + [k for k in mb if k not in ma]
    width = max([len(k) for k in keys] + [6])
    out = [f"A: {name_a}  ({a.get('device', '?')}, {a.get('commit', '?')}, {a.get('date', '?')})",
           f"B: {name_b}  ({b.get('device', '?')}, {b.get('commit', '?')}, {b.get('date', '?')})"]
    if a.get("workload") != b.get("workload"):
        diff = sorted(k for k in set(a.get("workload", {})) | set(b.get("workload", {}))
                      if a.get("workload", {}).get(k) != b.get("workload", {}).get(k))
        out.append(f"note: the workloads differ in {', '.join(diff)}")
    out.append(f"{'metric':<{width}} {'A':>12} {'B':>12} {'B-A':>12} {'change':>8}")
    for k in keys:
        va, vb = ma.get(k), mb.get(k)
        if va is None or vb is None:
            shown = "-" if va is None else f"{va:12.3f}"
            out.append(f"{k:<{width}} {shown:>12} {'-' if vb is None else f'{vb:.3f}':>12}")
            continue
        rel = f"{100 * (vb - va) / abs(va):+7.1f}%" if va else ""
        out.append(f"{k:<{width}} {va:12.3f} {vb:12.3f} {vb - va:+12.3f} {rel:>8} {_better(k, vb - va)}")
    return "\n".join(out)

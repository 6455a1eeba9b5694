"""Per-request timings → the flat metrics of a result file (DESIGN.md names and units).

Percentiles are over successful requests; ITL is over every gap between streamed
messages of every successful request; throughput divides by the run's wall time
(first send to last finish). Goodput counts requests that met both SLOs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

from llmesh.bench.loadgen import RequestResult, RunResult

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class Slo:
    """A request is good when its TTFT and its TPOT are both within these (ms)."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 200.0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _good(r: RequestResult, slo: Slo) -> bool:
    tpot = r.tpot
    return r.ok and r.ttft is not None and 1000 * r.ttft <= slo.ttft_ms and (tpot is None or 1000 * tpot <= slo.tpot_ms)


def latency_samples(run: RunResult) -> dict[str, list[float]]:
    """Milliseconds per metric over the successful requests (what the CDF plots show)."""
    ok = [r for r in run.requests if r.ok and r.ttft is not None]
    return {"ttft": [1000 * r.ttft for r in ok],
            "tpot": [1000 * r.tpot for r in ok if r.tpot is not None],
            "itl": [1000 * g for r in ok for g in r.itls],
            "e2e": [1000 * r.e2e for r in ok]}


def errors_by_status(run: RunResult) -> dict[str, int]:
    return dict(Counter(r.error for r in run.requests if not r.ok))


def summarize(run: RunResult, slo: Slo | None = None) -> dict[str, float]:
    """The run's metrics: counts, throughput, latency percentiles, goodput, errors."""
    ok = [r for r in run.requests if r.ok and r.ttft is not None]
    dur = max(run.duration_s, 1e-9)
    out_tokens = sum(r.output_len for r in ok)
    m: dict[str, float] = {
        "requests_n": len(run.requests), "completed_n": len(ok), "failed_n": len(run.requests) - len(ok),
        "duration_s": run.duration_s, "req_s": len(ok) / dur,
        "in_tok_s": sum(r.prompt_len for r in ok) / dur, "out_tok_s": out_tokens / dur,
        "out_tokens_n": out_tokens,
    }
    for name, values in latency_samples(run).items():
        m[f"{name}_mean_ms"] = sum(values) / len(values) if values else 0.0
        for q in PERCENTILES:
            m[f"{name}_p{q}_ms"] = percentile(values, q)
    good = sum(_good(r, slo or Slo()) for r in run.requests)
    m["goodput_req_s"] = good / dur
    m["goodput_frac"] = good / len(run.requests) if run.requests else 0.0
    for status, n in errors_by_status(run).items():
        m[f"errors_{re.sub(r'[^a-z0-9]+', '_', status.lower())}_n"] = n
    return m


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}" if prefix else k: v for k, v in metrics.items()}

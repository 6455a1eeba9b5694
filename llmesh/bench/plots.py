"""PNG plots beside a result file: latency CDFs, and throughput / latency against rate.

matplotlib is optional (``pip install 'llmesh[bench]'``): without it the functions
return None and the benchmark still writes its JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from llmesh.bench.loadgen import RunResult
from llmesh.bench.metrics import latency_samples, percentile

_PANELS = (("ttft", "time to first token"), ("tpot", "time per output token"),
           ("itl", "inter-token latency"), ("e2e", "end-to-end latency"))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    return _pyplot() is not None


def cdf_legend(label: str, values: Sequence[float]) -> str:
    """A CDF line's legend: its p50 from the same percentile function as the result file."""
    return f"{label} (p50 {percentile(list(values), 50):.1f} ms)"


def plot_latency_cdfs(runs: Sequence[RunResult], path: Path, title: str = "") -> Path | None:
    """One panel per latency metric, one CDF line per run (e.g. direct vs mesh)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, _PANELS, strict=True):
        for run in runs:
            values = sorted(latency_samples(run)[key])
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=cdf_legend(run.label, values))
        ax.set_title(label)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "latency CDFs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rate_sweep(series: Mapping[str, Sequence[tuple[float, Mapping[str, float]]]], path: Path,
                    title: str = "") -> Path | None:
    """Throughput and latency against request rate; ``series``: label → [(rate, metrics)]."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (ax_tp, ax_ttft, ax_tpot) = plt.subplots(1, 3, figsize=(14, 4.2))
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        rates = [r for r, _ in points]
        ax_tp.plot(rates, [m["out_tok_s"] for _, m in points], "o-", label=f"{label} output tok/s")
        ax_tp.plot(rates, [m["goodput_req_s"] for _, m in points], "s--", label=f"{label} goodput req/s")
        for ax, key in ((ax_ttft, "ttft"), (ax_tpot, "tpot")):
            ax.plot(rates, [m[f"{key}_p50_ms"] for _, m in points], "o-", label=f"{label} p50")
            ax.plot(rates, [m[f"{key}_p99_ms"] for _, m in points], "^--", label=f"{label} p99")
    for ax, name in ((ax_tp, "throughput"), (ax_ttft, "TTFT (ms)"), (ax_tpot, "TPOT (ms)")):
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "rate sweep")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

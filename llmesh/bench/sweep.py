"""Load points of a sweep: a Poisson rate, a fixed concurrency, or both; one run each.

``bench serve`` and ``bench/serve_gpu.py`` run their points through :func:`run_point`, so a
point is named, labelled and measured one way everywhere: ``r16`` / "rate 16 req/s" for a
Poisson rate, ``c256`` / "concurrency 256" for a concurrency-limited run with every request
ready at once, ``r16_c64`` for both, ``rinf`` for all at once without a cap.
"""

from __future__ import annotations

import dataclasses
import math
import time

from llmesh.bench.loadgen import RunResult, Target, run_load
from llmesh.bench.metrics import Slo, summarize
from llmesh.bench.process_tree import cpu_fracs, cpu_snapshot
from llmesh.bench.workloads import WorkloadConfig, build_requests


def _num(x: float) -> str:
    return f"{x:g}".replace(".", "p")


@dataclasses.dataclass(frozen=True)
class LoadPoint:
    rate: float = math.inf
    """Poisson arrivals in req/s; inf = every request ready at the start."""
    max_concurrency: int | None = None
    """Cap on requests in flight (None: no cap)."""
    num_requests: int | None = None
    """Requests of this point (None: the workload's ``num_requests``)."""

    @property
    def key(self) -> str:
        """Metric-name prefix: r16, c256, r16_c64, rinf."""
        rate = "inf" if math.isinf(self.rate) else _num(self.rate)
        parts = [] if math.isinf(self.rate) and self.max_concurrency else [f"r{rate}"]
        if self.max_concurrency:
            parts.append(f"c{self.max_concurrency}")
        return "_".join(parts)

    @property
    def label(self) -> str:
        parts = [] if math.isinf(self.rate) and self.max_concurrency else [
            "all at once" if math.isinf(self.rate) else f"rate {self.rate:g} req/s"]
        if self.max_concurrency:
            parts.append(f"concurrency {self.max_concurrency}")
        return ", ".join(parts)


@dataclasses.dataclass
class PointResult:
    point: LoadPoint
    run: RunResult
    metrics: dict[str, float]
    """``summarize``'s metrics plus ``client_cpu_frac``: the load generator's own CPU time
    over the run's wall time (near 1.0 means the client, not the target, set the pace)."""


async def run_point(target: Target, workload: WorkloadConfig, point: LoadPoint, *, content_seed: int | None = None,
                    slo: Slo | None = None, timeout: float = 600.0, progress: bool = True,
                    label: str = "", watch: dict[str, int] | None = None) -> PointResult:
    """Send the workload's requests (token contents from ``content_seed``) at ``point``.
    ``watch``: service processes (name -> pid) whose CPU share over the run is reported as
    ``<name>_cpu_frac`` (process trees: a gateway's workers, an engine's core)."""
    if point.num_requests is not None:
        workload = dataclasses.replace(workload, num_requests=point.num_requests)
    requests = build_requests(workload, content_seed=content_seed)
    cpu0 = time.process_time()
    services0 = cpu_snapshot(watch or {})
    run = await run_load(target, requests, rate=point.rate, max_concurrency=point.max_concurrency,
                         seed=workload.seed, ignore_eos=workload.ignore_eos, timeout=timeout,
                         label=label or point.label, progress=progress)
    metrics = summarize(run, slo)
    metrics["client_cpu_frac"] = (time.process_time() - cpu0) / max(run.duration_s, 1e-9)
    metrics.update(cpu_fracs(services0, cpu_snapshot(watch or {}), run.duration_s))
    return PointResult(point, run, metrics)

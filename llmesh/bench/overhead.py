"""Mesh overhead: one workload straight to an engine and through gateway + router.

Both legs run in one process against one mesh, so they share the machine, the engine
and its warm state. Legs alternate in ABBA order over ``rounds`` (drift in background
load then hits both alike) and each leg gets its own token contents with the same
lengths and arrival times, so neither leg is served from the prefix cache the other
filled. Reported: added TTFT (mesh − direct, p50 and p99) and the throughput ratio.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from llmesh.bench.loadgen import EngineTarget, GatewayTarget, RouterTarget, RunResult, Target, run_load
from llmesh.bench.metrics import Slo, percentile, prefixed, summarize
from llmesh.bench.workloads import WorkloadConfig, build_requests
from llmesh.ports import free_port, free_port_base


@dataclasses.dataclass(frozen=True)
class OverheadResult:
    direct: RunResult
    mesh: RunResult
    metrics: dict[str, float]
    workload: WorkloadConfig
    """What was sent (vocabulary and window clipped to the engine's)."""


ENGINE_PORTS = 8
"""Engines of a benchmark mesh take consecutive ports from one base; room for this many."""


def free_metrics_base(engines: int = 1) -> int:
    """A base port whose every metrics port (``llmesh.launcher``'s offsets) is free now."""
    from llmesh.launcher import ENGINE_METRICS_OFFSET, METRICS_OFFSETS

    return free_port_base([*METRICS_OFFSETS.values(), *(ENGINE_METRICS_OFFSET + n for n in range(engines))])


def start_mesh(device: str = "cpu", models_file: str | None = None, run_dir: str | None = None,
               auth: bool = False, timeout: float = 300.0, gateway_workers: int | None = None,
               metrics: bool = False):
    """A ``Mesh`` on free loopback ports, started; the caller stops it. API keys are off unless
    ``auth`` (then ``mesh.api_key`` is the local admin key); ``gateway_workers`` None: the
    launcher's choice for ``device``; /metrics only with ``metrics`` (each service's port is
    its spec's ``metrics_port``)."""
    from llmesh.launcher import Mesh, UpConfig

    cfg = UpConfig(models_file=models_file, host="127.0.0.1", gateway_port=free_port(), router_port=free_port(),
                   prefix_cache_port=free_port(), redis_port=free_port(),
                   engine_base_port=free_port_base(range(ENGINE_PORTS)),
                   metrics_base_port=free_metrics_base() if metrics else 0, device=device, run_dir=run_dir,
                   auth=auth, gateway_workers=gateway_workers,
                   data_dir=tempfile.mkdtemp(prefix="llmesh-bench-data-"))  # beside a running `llmesh up`
    mesh = Mesh(cfg, quiet=True)
    try:
        mesh.start(timeout=timeout)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def mesh_addresses(mesh) -> tuple[str, str, str]:
    """(gateway address, first engine's address, its model name) of a started Mesh."""
    spec = mesh.models.models[0]
    return f"{mesh.cfg.host}:{mesh.cfg.gateway_port}", spec.addresses[0], spec.name


def router_address(mesh) -> str:
    return f"{mesh.cfg.host}:{mesh.cfg.router_port}"


async def idle_probe(targets: dict[str, Target], workload: WorkloadConfig, probes: int,
                      timeout: float) -> dict[str, float]:
    """TTFT of one-token requests sent one at a time, legs alternating request by request:
    the fixed cost of the extra hops with no queueing and little drift in between."""
    spec = dataclasses.replace(workload, kind="fixed", num_requests=probes, input_len=16, output_len=1)
    ttfts: dict[str, list[float]] = {leg: [] for leg in targets}
    # Each leg its own tokens: the second leg must not be served from the first leg's cache.
    sends = {leg: build_requests(spec, content_seed=3000 + k) for k, leg in enumerate(targets)}
    legs = list(targets)
    for i in range(probes):
        for leg in legs[i % len(legs):] + legs[:i % len(legs)]:  # rotate who goes first
            r = (await run_load(targets[leg], [sends[leg][i]], timeout=timeout, progress=False)).requests[0]
            if r.ok and r.ttft is not None:
                ttfts[leg].append(1000 * r.ttft)
    p50 = {leg: percentile(v, 50) for leg, v in ttfts.items()}
    out = {f"idle_{leg}_ttft_p50_ms": v for leg, v in p50.items()}
    out["mesh_idle_added_ttft_p50_ms"] = p50["mesh"] - p50["direct"]
    for leg in p50:  # further meshes to compare ("mesh_w4": a second gateway) -> w4_mesh_idle_...
        if leg.startswith("mesh_"):
            out[f"{leg.removeprefix('mesh_')}_mesh_idle_added_ttft_p50_ms"] = p50[leg] - p50["direct"]
    if "router" in p50:  # where the added time goes: router hop, then gateway hop
        out["router_hop_idle_added_ttft_p50_ms"] = p50["router"] - p50["direct"]
        out["gateway_hop_idle_added_ttft_p50_ms"] = p50["mesh"] - p50["router"]
    return out


def _merge(label: str, runs: list[RunResult]) -> RunResult:
    return RunResult(label, runs[0].rate, runs[0].max_concurrency, sum(r.duration_s for r in runs),
                     [q for r in runs for q in r.requests])


async def measure_overhead(gateway: str, engine: str, model: str, workload: WorkloadConfig, *,
                           router: str | None = None,
                           rate: float, max_concurrency: int | None = None, rounds: int = 1,
                           warmup: int = 4, probes: int = 0, api_key: str | None = None, slo: Slo | None = None,
                           timeout: float = 600.0, progress: bool = True,
                           credential: list[tuple[str, str]] | None = None) -> OverheadResult:
    """``credential``: the mesh secret's metadata, for the direct engine and router calls."""
    direct_t, mesh_t = EngineTarget(engine, credential), GatewayTarget(gateway, model, api_key)
    targets: dict[str, Target] = {"direct": direct_t, "mesh": mesh_t}
    for t in targets.values():
        await t.open()
    try:
        info = await direct_t.info()
        await mesh_t.resolve_model()
        workload = dataclasses.replace(workload, vocab_size=min(workload.vocab_size, info.vocab_size),
                                       max_model_len=min(workload.max_model_len, info.max_model_len))
        warm = dataclasses.replace(workload, num_requests=warmup, kind="fixed", output_len=4)
        for i, t in enumerate(targets.values()):
            await run_load(t, build_requests(warm, content_seed=1000 + i), timeout=timeout, progress=False)
        probe_targets = dict(targets)
        if router:
            probe_targets["router"] = RouterTarget(router, mesh_t.model, credential)
            await probe_targets["router"].open()
        try:
            idle = await idle_probe(probe_targets, workload, probes, timeout) if probes else {}
        finally:
            if router:
                await probe_targets["router"].close()
        runs: dict[str, list[RunResult]] = {"direct": [], "mesh": []}
        order = [leg for r in range(rounds) for leg in (("direct", "mesh") if r % 2 == 0 else ("mesh", "direct"))]
        for i, leg in enumerate(order):
            requests = build_requests(workload, content_seed=2000 + i)
            runs[leg].append(await run_load(targets[leg], requests, rate=rate, max_concurrency=max_concurrency,
                                            seed=workload.seed, ignore_eos=workload.ignore_eos, timeout=timeout,
                                            label=f"{leg} {i // 2 + 1}/{rounds}", progress=progress))
    finally:
        for t in targets.values():
            await t.close()
    direct, mesh = _merge("direct", runs["direct"]), _merge("mesh", runs["mesh"])
    md, mm = summarize(direct, slo or Slo()), summarize(mesh, slo or Slo())
    metrics = {"mesh_added_ttft_p50_ms": mm["ttft_p50_ms"] - md["ttft_p50_ms"],
               "mesh_added_ttft_p99_ms": mm["ttft_p99_ms"] - md["ttft_p99_ms"],
               "mesh_added_tpot_p50_ms": mm["tpot_p50_ms"] - md["tpot_p50_ms"],
               "mesh_throughput_ratio_frac": mm["out_tok_s"] / md["out_tok_s"] if md["out_tok_s"] else 0.0,
               **idle, **prefixed("direct", md), **prefixed("mesh", mm)}
    return OverheadResult(direct, mesh, metrics, workload)


def plot_overhead(result: OverheadResult, out_dir: Path, name: str) -> list[Path]:
    from llmesh.bench.plots import plot_latency_cdfs

    path = plot_latency_cdfs([result.direct, result.mesh], out_dir / f"{name}_cdf.png",
                             title="engine direct vs through gateway + router")
    return [path] if path else []

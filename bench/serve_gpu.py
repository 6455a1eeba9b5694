"""The whole mesh on a GPU: gateway -> router -> engine, against the engine's own port.

Starts what ``llmesh up --device cuda --models-file bench/models.serve_gpu.yaml`` starts
(Redis, the prefix-cache index, one engine with random:llama3-8b on the triton backend, the
router, the gateway with API keys on), then runs the same load points against the gateway
and against the engine's gRPC port directly: Poisson rates (default 4, 16, 64 req/s) and a
saturating concurrency (256 streams). Both targets get the same request shapes and arrival
times; each run has its own token contents (same lengths), so no run is served from the
prefix cache another one filled. The two targets alternate per point, the first of the pair
switching each time (ABBA), so drift hits both alike.

Headlines:
  gpu_mesh_throughput_ratio_frac  gateway out tok/s / engine out tok/s at the concurrency point
  gpu_mesh_added_ttft_p50_ms      gateway TTFT p50 - engine TTFT p50 at the moderate rate (16 req/s)
and for every target and point ``<target>_<point>_<metric>`` (TTFT / TPOT / ITL p50 and p99,
out tok/s, req/s, completed / failed, the CPU share of the load generator and of the gateway,
router and engine process trees: 1.0 is one core busy, so a gateway worker near 1.0 is
the limit).

Usage: python bench/serve_gpu.py [--smoke] [--results-dir DIR] [--gateway-routing direct|proxy]
                                [--gateway-workers N] [--connections N]
--gateway-routing: the gateway's routing mode (docs/routing.md), recorded in the workload;
proxy writes serve_gpu_<dev>_proxy.json so that a run of each mode compares the two.
--gateway-workers N: the gateway as N processes on one port (its --workers; default: what
``llmesh up`` starts, 4 on a GPU host of 16 cores), reached over --connections TCP connections
(default 4 per worker, 1 with one); a given N writes serve_gpu_<dev>_wN.json. An A/B of worker
counts passes the same --connections to both.
--compare-gateway-workers M: a second gateway with M workers beside the mesh's, same router,
engine, Redis and keys, measured as a third target (``gateway_wM``) in the same rotation:
the A/B of worker counts in one run, on one warm engine. Its figures carry the prefix
``wM_`` (``wM_gpu_mesh_throughput_ratio_frac``, ...); both gateways get --connections
(default 4 x M) connections.
--compare-route-reuse-ms R: the second gateway (with the mesh's worker count unless
--compare-gateway-workers says otherwise) asks a second router whose decision_reuse_ms is R
(0: every request asks; docs/routing.md); the target is ``gateway_wM_reuseR`` and its
prefix ``wM_reuseR_``.
--smoke: random:tiny-llama3 (Llama-3's vocabulary, a toy body) on the CPU, torch backend,
short runs: checks the script in under 2 minutes; its numbers mean nothing.
The file (serve_gpu_<dev>.json) is rewritten after every point, so a timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from llmesh.bench.loadgen import EngineTarget, GatewayTarget, Target, run_loop
from llmesh.bench.metrics import Slo
from llmesh.bench.overhead import idle_probe, mesh_addresses, start_mesh
from llmesh.bench.report import format_summary
from llmesh.bench.sweep import LoadPoint, PointResult, run_point
from llmesh.bench.workloads import WorkloadConfig
from llmesh.bench_results import write_result
from llmesh.ports import free_port
from llmesh.router.config import RouterConfig

KEPT = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms",
        "out_tok_s", "req_s", "completed_n", "failed_n", "duration_s")
"""Per target and point, besides every ``*_cpu_frac`` (client and watched services)."""
MODEL_NAME = "llama3-8b-random"


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    device: str
    engine: dict
    workload: WorkloadConfig
    rates: tuple[float, ...]
    moderate_rate: float
    concurrency: int
    seconds_per_rate: float
    concurrency_requests: int
    warmup_requests: int
    probes: int


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return Plan(model="random:tiny-llama3", device="cpu",
                    engine={"backend": "torch", "dtype": "float32", "max_num_seqs": 16,
                            "max_num_batched_tokens": 1024, "num_kv_blocks": 512},
                    workload=WorkloadConfig(kind="lognormal", input_len=32, output_len=16, sigma=0.5,
                                            vocab_size=128000, max_model_len=512, seed=0),
                    rates=(16.0,), moderate_rate=16.0, concurrency=8, seconds_per_rate=1.0,
                    concurrency_requests=16, warmup_requests=4, probes=2)
    models = yaml.safe_load(Path(args.models_file).read_text())
    spec = models["models"][0]
    return Plan(model=spec["path"], device="cuda", engine=dict(spec.get("engine", {})),
                workload=WorkloadConfig(kind="lognormal", input_len=200, output_len=180, sigma=0.5,
                                        vocab_size=128000, max_model_len=4096, seed=0),
                rates=tuple(args.rates), moderate_rate=args.moderate_rate, concurrency=args.concurrency,
                seconds_per_rate=args.seconds_per_rate, concurrency_requests=args.concurrency_requests,
                warmup_requests=args.warmup_requests, probes=args.probes)


def load_points(plan: Plan) -> list[LoadPoint]:
    """The headline points first (the moderate rate, then the concurrency), the other rates
    after, so a start that eats the time budget costs the sweep's edges, not the headlines."""
    rates = sorted(plan.rates, key=lambda r: (r != plan.moderate_rate, r))
    points = [LoadPoint(rate=r, num_requests=max(8, round(r * plan.seconds_per_rate))) for r in rates]
    return points[:1] + [LoadPoint(max_concurrency=plan.concurrency, num_requests=plan.concurrency_requests)] + points[1:]


def gateway_prefix(target: str) -> str:
    """The metric prefix of a gateway target: "" for the mesh's own, "w4_" for ``gateway_w4``."""
    return "" if target == "gateway" else target.removeprefix("gateway_") + "_"


def headline(results: dict[tuple[str, str], PointResult], plan: Plan) -> dict[str, float]:
    """The two headline figures per gateway target, from whichever of their points ran."""
    out: dict[str, float] = {}
    sat = LoadPoint(max_concurrency=plan.concurrency).key
    points = {p.point.key for p in results.values()}
    for target in sorted({t for t, _ in results if t.startswith("gateway")}):
        pre = gateway_prefix(target)
        eng, gw = results.get(("engine", sat)), results.get((target, sat))
        if eng and gw and eng.metrics["out_tok_s"] > 0:
            out[f"{pre}gpu_mesh_throughput_ratio_frac"] = gw.metrics["out_tok_s"] / eng.metrics["out_tok_s"]
        for point in points:
            eng, gw = results.get(("engine", point)), results.get((target, point))
            if eng and gw:
                out[f"{pre}{point}_mesh_added_ttft_p50_ms"] = gw.metrics["ttft_p50_ms"] - eng.metrics["ttft_p50_ms"]
                out[f"{pre}{point}_mesh_added_tpot_p50_ms"] = gw.metrics["tpot_p50_ms"] - eng.metrics["tpot_p50_ms"]
        moderate = f"{pre}{LoadPoint(rate=plan.moderate_rate).key}_mesh_added_ttft_p50_ms"
        if moderate in out:
            out[f"{pre}gpu_mesh_added_ttft_p50_ms"] = out[moderate]
    return out


def all_metrics(results: dict[tuple[str, str], PointResult], plan: Plan, extra: dict[str, float]) -> dict:
    m = headline(results, plan)
    m.update(extra)
    for (target, key), res in results.items():
        m.update({f"{target}_{key}_{k}": v for k, v in res.metrics.items() if k in KEPT or k.endswith("_cpu_frac")})
    return m


async def measure(gateways: dict[str, str], engine: str, api_key: str | None, plan: Plan, save, say,
                  deadline: float, credential: list[tuple[str, str]] | None = None, connections: int = 1,
                  watch: dict[str, int] | None = None, readings=None) -> int:
    """``gateways``: target name ("gateway", "gateway_w4") -> address. ``watch``: the mesh's
    service processes (name -> pid) whose CPU share each point records. ``readings``: called
    after each point, figures read from the services themselves (merged into the file)."""
    targets: dict[str, Target] = {"engine": EngineTarget(engine, credential)}
    targets.update({name: GatewayTarget(address, MODEL_NAME, api_key, connections=connections)
                    for name, address in gateways.items()})
    for t in targets.values():
        await t.open()
    results: dict[tuple[str, str], PointResult] = {}
    extra: dict[str, float] = {}
    skipped: list[str] = []
    slo = Slo()
    try:
        info = await targets["engine"].info()
        window = await targets["gateway"].resolve_model()
        work = dataclasses.replace(plan.workload, vocab_size=min(plan.workload.vocab_size, info.vocab_size),
                                   max_model_len=min(plan.workload.max_model_len, info.max_model_len, window))
        # Warm-up (not recorded): prefill shapes compile their kernels here, not in the first point.
        warm = LoadPoint(max_concurrency=max(1, plan.warmup_requests // 2), num_requests=plan.warmup_requests)
        for i, t in enumerate(targets.values()):
            res = await run_point(t, dataclasses.replace(work, output_len=8), warm, content_seed=100 + i,
                                  progress=False, label="warm-up")
            if res.metrics["failed_n"]:
                say(f"warm-up against {t.name} failed: {res.run.requests[0].error} {res.run.requests[0].detail}")
                return 1
        if plan.probes:
            extra.update(await idle_probe({"direct": targets["engine"], "mesh": targets["gateway"],
                                           **{f"mesh_{gateway_prefix(g)[:-1]}": targets[g]
                                              for g in gateways if g != "gateway"}},
                                          work, plan.probes, timeout=60.0))
        order = list(targets)
        spent: list[float] = []
        for i, point in enumerate(load_points(plan)):
            # The point is skipped when the mean time of the earlier ones would cross the deadline.
            if spent and time.monotonic() + sum(spent) / len(spent) > deadline:
                skipped.append(point.key)
                say(f"skipping {point.label}: the time budget is spent")
                continue
            t0 = time.monotonic()
            # Two targets: ABBA. More: each point starts one further along (ABC, BCA, CAB).
            n = len(order)
            turn = (order if i % 2 == 0 else order[::-1]) if n == 2 else order[i % n:] + order[:i % n]
            for name in turn:
                res = await run_point(targets[name], work, point, content_seed=1000 + 10 * i + order.index(name),
                                      slo=slo, timeout=120.0, progress=False, watch=watch)
                results[(name, point.key)] = res
                say(format_summary(f"{name}, {point.label} ({len(res.run.requests)} requests)", res.metrics)
                    + "".join(f"\n  {k:<20}{v:12.2f}" for k, v in res.metrics.items() if k.endswith("_cpu_frac")))
            spent.append(time.monotonic() - t0)
            if readings is not None:
                extra.update(readings())
            save(all_metrics(results, plan, extra), work, skipped)
    finally:
        for t in targets.values():
            await t.close()
    failed = sum(r.metrics["failed_n"] for r in results.values())
    if failed:
        say(f"{failed:.0f} requests failed")
    return 1 if failed or skipped else 0


def start_second_gateway(mesh, workers: int, reuse_ms: int | None, timeout: float) -> tuple[str, int]:
    """A gateway beside the mesh's own, with its settings (router, Redis, keys, mesh secret)
    but ``workers`` processes, its own gRPC and /metrics ports, no HTTP front; with
    ``reuse_ms`` (not None), behind a second router like the first but with that
    ``decision_reuse_ms``. Returns
    the gateway's address and pid (its router's CPU is not watched); ``mesh.stop()`` stops both."""
    from llmesh.launcher import ProcessSpec

    first = mesh.specs["gateway"]
    env = {**first.env, "LLMESH_GATEWAY_HTTP_PORT": "0", "LLMESH_GATEWAY_METRICS_PORT": str(free_port()),
           "LLMESH_GATEWAY_WORKERS": str(workers)}
    if reuse_ms is not None:
        router = mesh.specs["router"]
        port = free_port()
        spec = ProcessSpec("router-reuse", router.argv, env={
            **router.env, "LLMESH_ROUTER_PORT": str(port), "LLMESH_ROUTER_METRICS_PORT": "0",
            "LLMESH_ROUTER_DECISION_REUSE_MS": str(reuse_ms)}, address=f"{mesh.cfg.host}:{port}")
        mesh.start_extra(spec, timeout)
        env["LLMESH_GATEWAY_ROUTER"] = spec.address
    port = free_port()
    env["LLMESH_GATEWAY_PORT"] = str(port)
    spec = ProcessSpec(f"gateway-w{workers}", first.argv, env=env, address=f"{mesh.cfg.host}:{port}")
    mesh.start_extra(spec, timeout)
    return spec.address, mesh.children[spec.name].proc.pid


def route_sources(mesh, name: str) -> dict[str, float]:
    """``llmesh_gateway_route_decisions_total`` of the gateway ``name``, summed by source
    ("router", "reused"): whether reuse happened, read from the gateway itself."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = mesh.specs[name].env["LLMESH_GATEWAY_METRICS_PORT"]  # the supervisor's sum over workers
    with urllib.request.urlopen(f"http://{mesh.cfg.host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {"router": 0.0, "reused": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llmesh_gateway_route_decisions_total":
                out[sample.labels["source"]] = out.get(sample.labels["source"], 0.0) + sample.value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, short runs (checks the script)")
    ap.add_argument("--models-file", default=str(Path(__file__).with_name("models.serve_gpu.yaml")))
    ap.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, 64.0], help="Poisson rates (req/s)")
    ap.add_argument("--moderate-rate", type=float, default=16.0, help="the rate of gpu_mesh_added_ttft_p50_ms")
    ap.add_argument("--concurrency", type=int, default=256, help="the saturating point's streams in flight")
    ap.add_argument("--seconds-per-rate", type=float, default=10.0, help="requests at a rate = rate x this")
    ap.add_argument("--concurrency-requests", type=int, default=768, help="requests of the concurrency point")
    ap.add_argument("--warmup-requests", type=int, default=64)
    ap.add_argument("--probes", type=int, default=16, help="one-token requests one at a time per target")
    ap.add_argument("--start-timeout-s", type=float, default=240.0, help="bound on the mesh's start")
    ap.add_argument("--budget-s", type=float, default=300.0, help="no point starts that would end past this")
    ap.add_argument("--run-dir", default=None, help="mesh logs (default: a temporary folder)")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--gateway-routing", choices=("direct", "proxy"), default="direct",
                    help="direct: the gateway streams from the engine after the router's Route; proxy: through "
                         "the router's Generate")
    ap.add_argument("--gateway-workers", type=int, default=None,
                    help="gateway processes sharing its port (the gateway's --workers; default: llmesh up's "
                         "choice for the device; docs/operations.md)")
    ap.add_argument("--connections", type=int, default=None,
                    help="TCP connections of the gateway target (default: 1 with one gateway worker, as the "
                         "earlier runs; 4 per worker with more, since the kernel balances them by connection)")
    ap.add_argument("--compare-gateway-workers", type=int, default=0, metavar="M",
                    help="also measure a second gateway with M workers on the same mesh (0: off)")
    ap.add_argument("--compare-route-reuse-ms", type=int, default=None, metavar="R",
                    help="the second gateway asks its own router, whose decision_reuse_ms is R (0: no reuse)")
    args = ap.parse_args()
    plan = make_plan(args)
    t_start = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="serve-gpu-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["LLMESH_GATEWAY_ROUTING"] = args.gateway_routing  # the launcher's gateway inherits it
    os.environ["XDG_CONFIG_HOME"] = str(run_dir)  # the launcher's admin key goes here, not to ~/.config
    models_path = run_dir / "models.yaml"
    models_path.write_text(yaml.safe_dump({"default_model": MODEL_NAME, "models": [
        {"name": MODEL_NAME, "path": plan.model, "size_class": "large", "replicas": 1, "engine": plan.engine}]}))
    import torch

    from llmesh.bench_results import device_tag

    dev = device_tag("cuda" if plan.device == "cuda" and torch.cuda.is_available() else "cpu")
    results_dir = args.results_dir or (Path(tempfile.mkdtemp(prefix="serve-gpu-results-")) if args.smoke else None)
    describe = {"model": plan.model, "engine": plan.engine, "device": plan.device,
                "gateway_routing": args.gateway_routing, "compare_gateway_workers": args.compare_gateway_workers,
                "compare_route_reuse_ms": args.compare_route_reuse_ms,
                # the router's grant of reused routes (docs/routing.md), as its children read it
                "router_decision_reuse_ms": int(os.environ.get(
                    "LLMESH_ROUTER_DECISION_REUSE_MS", RouterConfig.decision_reuse_ms)),
                "targets": {"gateway": ("Inference.Generate through gateway (API key on), Router.Route (or a reused route), engine"
                                        if args.gateway_routing == "direct" else
                                        "Inference.Generate through gateway (API key on) -> router -> engine"),
                            "engine": "Engine.Generate on the engine's own gRPC port"},
                "points": [p.key for p in load_points(plan)],
                "requests_per_point": {p.key: p.num_requests for p in load_points(plan)},
                "moderate_rate_req_s": plan.moderate_rate, "order": "per point: engine/gateway alternating (ABBA)",
                "contents": "same lengths and arrival times per point, fresh token ids per run (no prefix hits)",
                "smoke": args.smoke}

    def save(metrics: dict, work: WorkloadConfig, skipped: list[str]) -> None:
        suffix = ("_proxy" if args.gateway_routing == "proxy" else "") + (
            f"_w{args.gateway_workers}" if args.gateway_workers else "")
        path = write_result(f"serve_gpu_{dev}{suffix}", {**describe, **work.describe(), "skipped": skipped}, metrics,
                            results_dir=results_dir)
        say(f"wrote {path}")

    say(f"starting the mesh: {plan.model} on {plan.device} ({plan.engine}); logs in {run_dir}")
    try:
        mesh = start_mesh(device=plan.device, models_file=str(models_path), run_dir=str(run_dir), auth=True,
                          timeout=args.start_timeout_s, gateway_workers=args.gateway_workers, metrics=True)
    except (RuntimeError, TimeoutError) as e:
        say(f"the mesh did not start: {e}")
        return 1
    try:
        gateway, engine, _ = mesh_addresses(mesh)
        # what the launcher chose for the device (or was told), as the gateway reads it
        workers = int(mesh.specs["gateway"].env.get("LLMESH_GATEWAY_WORKERS")
                      or os.environ.get("LLMESH_GATEWAY_WORKERS") or 1)
        reuse = args.compare_route_reuse_ms
        second = args.compare_gateway_workers or (workers if reuse is not None else 0)
        connections = args.connections or (1 if max(workers, second) == 1 else 4 * max(workers, second))
        describe.update(gateway_workers=workers, gateway_connections=connections)
        say(f"mesh up: gateway {gateway} ({workers} workers), engine {engine}")
        watch = {kind: child.proc.pid for name, child in mesh.children.items() if child.proc is not None
                 for kind in ("gateway", "router", "engine") if name.startswith(kind)}
        gateways = {"gateway": gateway}
        services = {"gateway": "gateway"}  # target -> the mesh's process name

        def readings() -> dict[str, float]:
            out = {}
            for target, proc in services.items():
                src = route_sources(mesh, proc)
                out[f"{gateway_prefix(target)}route_reused_frac"] = src["reused"] / max(1.0, sum(src.values()))
            return out
        if second:
            name = f"gateway_w{second}" + ("" if reuse is None else f"_reuse{reuse}")
            gateways[name], watch[name] = start_second_gateway(mesh, second, reuse, args.start_timeout_s)
            say(f"second gateway ({second} workers, its router's route reuse "
                f"{'as the first' if reuse is None else f'{reuse} ms'}) up on {gateways[name]}")
            services[name] = f"gateway-w{second}"
        deadline = t_start + args.budget_s
        rc = run_loop(measure(gateways, engine, mesh.api_key, plan, save, say, deadline, mesh.credential(),
                               connections, watch, readings))
    finally:
        mesh.stop()
    say(f"done (rc={rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())

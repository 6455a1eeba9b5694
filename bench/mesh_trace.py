"""Where the mesh's added time to first token goes, from the services' own spans.

Starts the mesh as ``bench/serve_gpu.py`` does (``llmesh up``'s services, API keys on), with
every service printing its spans (``OTEL_TRACES_EXPORTER=console``), sends one-token requests
one at a time, alternating between the engine's own port and the gateway (as serve_gpu's idle
probe), stops the mesh (which flushes the spans into its logs) and lines each gateway request's
spans up on the host's clock:

  trace_mesh_added_ttft_p50_ms      the client's view: gateway TTFT p50 - engine TTFT p50
  trace_gateway_pre_engine_p50_ms   gateway server span start -> its Engine.Generate call starts
                                    (auth, checks, limits, route, the Route call when made)
  trace_route_called_frac           requests that asked the router (the rest reused a route)
  trace_route_rtt_p50_ms            the Route call, client side (when made)
  trace_router_handler_p50_ms       the router's handler (server span)
  trace_engine_hop_p50_ms           the gateway's Engine.Generate call starts -> the engine's
                                    server span starts (one gRPC hop, interceptors on both sides)
  trace_gateway_end_lag_p50_ms      the engine's server span ends -> the gateway's ends
                                    (the last message's way back through the gateway)
  trace_gateway_ttft_p50_ms         the gateway's own TTFT (its usage log line: from the
                                    request's start in the gateway to the first token there)
  trace_outside_gateway_p50_ms      mesh TTFT p50 - gateway TTFT p50: the client -> gateway hop
                                    and the first token's way from the gateway to the client

Span export costs every service CPU, so these figures describe a traced mesh; the untraced
ones are serve_gpu's. Writes bench/results/mesh_trace_<dev>.json.
Usage: python bench/mesh_trace.py [--requests 48] [--route-reuse-ms R] [--results-dir DIR] [--smoke]
--smoke: random:tiny-llama3 on the CPU, 6 requests: checks the script
(tests/bench/test_mesh_trace_smoke.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from llmesh.bench.loadgen import EngineTarget, GatewayTarget, run_load, run_loop
from llmesh.bench.overhead import mesh_addresses, start_mesh
from llmesh.bench.workloads import WorkloadConfig, build_requests
from llmesh.bench_results import device_tag, write_result

MODEL_NAME = "traced-model"
GATEWAY = "/llmesh.v1.Inference/Generate"
ENGINE = "/llmesh.v1.Engine/Generate"
ROUTE = "/llmesh.v1.Router/Route"
WARMUP = 4
"""Requests per leg sent first and left out of every figure."""


def read_spans(log_path: Path) -> list[dict]:
    """The spans ConsoleSpanExporter printed into a service's log (indented JSON objects
    between a line "{" and a line "}"; the one-line JSON log records are skipped)."""
    spans, buf = [], None
    for line in log_path.read_text(errors="replace").splitlines():
        if buf is None:
            if line == "{":
                buf = [line]
            continue
        buf.append(line)
        if line == "}":
            try:
                spans.append(json.loads("\n".join(buf)))
            except json.JSONDecodeError:
                pass  # a span cut short by the process's end
            buf = None
    return spans


def read_usage_ttfts(log_path: Path) -> dict[str, float]:
    """trace id -> ttft_ms of the gateway's usage log lines (one JSON record a line)."""
    out = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"msg": "usage"' in line:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("ttft_ms") is not None and rec.get("trace_id"):
                out[rec["trace_id"]] = float(rec["ttft_ms"])
    return out


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def phases(spans: list[dict], usage_ttfts: dict[str, float], skip: int = 0) -> dict[str, list[float]]:
    """Per gateway request (one trace), the intervals of the module docstring, in ms; the
    first ``skip`` requests (the warm-up) left out."""
    traces: dict[str, list[dict]] = {}
    for s in spans:
        traces.setdefault(s["context"]["trace_id"].removeprefix("0x"), []).append(s)  # the logs' form
    starts = sorted(_t(s["start_time"]) for s in spans if s["name"] == GATEWAY and s["kind"] == "SpanKind.SERVER")
    after = starts[skip] if len(starts) > skip else float("inf")
    out: dict[str, list[float]] = {k: [] for k in ("pre_engine", "route_rtt", "router_handler", "engine_hop",
                                                   "end_lag", "route_called", "gateway_ttft")}
    for trace_id, ss in traces.items():
        def one(name: str, kind: str) -> dict | None:
            return next((s for s in ss if s["name"] == name and s["kind"] == f"SpanKind.{kind}"), None)

        gw, call, eng = one(GATEWAY, "SERVER"), one(ENGINE, "CLIENT"), one(ENGINE, "SERVER")
        if gw is None or call is None or eng is None or _t(gw["start_time"]) < after:
            continue  # not a gateway request, a span lost at shutdown, or the warm-up
        out["pre_engine"].append(1000 * (_t(call["start_time"]) - _t(gw["start_time"])))
        out["engine_hop"].append(1000 * (_t(eng["start_time"]) - _t(call["start_time"])))
        out["end_lag"].append(1000 * (_t(gw["end_time"]) - _t(eng["end_time"])))
        if trace_id in usage_ttfts:
            out["gateway_ttft"].append(usage_ttfts[trace_id])
        route, handler = one(ROUTE, "CLIENT"), one(ROUTE, "SERVER")
        out["route_called"].append(1.0 if route is not None else 0.0)
        if route is not None:
            out["route_rtt"].append(1000 * (_t(route["end_time"]) - _t(route["start_time"])))
        if handler is not None:
            out["router_handler"].append(1000 * (_t(handler["end_time"]) - _t(handler["start_time"])))
    return out


async def probe(gateway: str, engine: str, api_key: str | None, credential, requests: int,
                work: WorkloadConfig) -> dict[str, list[float]]:
    targets = {"direct": EngineTarget(engine, credential), "mesh": GatewayTarget(gateway, MODEL_NAME, api_key)}
    for t in targets.values():
        await t.open()
    try:
        info = await targets["direct"].info()
        spec = WorkloadConfig(kind="fixed", num_requests=requests + WARMUP, input_len=16, output_len=1,
                              vocab_size=min(work.vocab_size, info.vocab_size), max_model_len=256)
        sends = {leg: build_requests(spec, content_seed=7000 + k) for k, leg in enumerate(targets)}
        ttfts: dict[str, list[float]] = {leg: [] for leg in targets}
        for i in range(requests + WARMUP):  # the first WARMUP of each leg warm up, unrecorded
            for leg in (list(targets) if i % 2 == 0 else list(targets)[::-1]):
                r = (await run_load(targets[leg], [sends[leg][i]], timeout=60, progress=False)).requests[0]
                if i >= WARMUP and r.ok and r.ttft is not None:
                    ttfts[leg].append(1000 * r.ttft)
        return ttfts
    finally:
        for t in targets.values():
            await t.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few requests")
    ap.add_argument("--requests", type=int, default=None, help="one-token requests per leg (48; smoke: 6)")
    ap.add_argument("--route-reuse-ms", type=int, default=None,
                    help="the router's decision_reuse_ms (default: the router's own default)")
    ap.add_argument("--models-file", default=str(Path(__file__).with_name("models.serve_gpu.yaml")))
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        model, device, requests = "random:tiny-llama3", "cpu", args.requests or 6
        engine = {"backend": "torch", "dtype": "float32", "max_num_seqs": 4, "num_kv_blocks": 128}
    else:
        spec = yaml.safe_load(Path(args.models_file).read_text())["models"][0]
        model, device, requests, engine = spec["path"], "cuda", args.requests or 48, dict(spec.get("engine", {}))
    run_dir = Path(tempfile.mkdtemp(prefix="mesh-trace-"))
    os.environ.update(OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="200", XDG_CONFIG_HOME=str(run_dir))
    if args.route_reuse_ms is not None:
        os.environ["LLMESH_ROUTER_DECISION_REUSE_MS"] = str(args.route_reuse_ms)
    models_path = run_dir / "models.in.yaml"
    models_path.write_text(yaml.safe_dump({"default_model": MODEL_NAME, "models": [
        {"name": MODEL_NAME, "path": model, "size_class": "large", "replicas": 1, "engine": engine}]}))
    t0 = time.monotonic()
    print(f"starting the mesh: {model} on {device}; logs in {run_dir}", flush=True)
    mesh = start_mesh(device=device, models_file=str(models_path), run_dir=str(run_dir), auth=True, timeout=240)
    try:
        gateway, engine_address, _ = mesh_addresses(mesh)
        work = WorkloadConfig(kind="fixed", vocab_size=128000)
        ttfts = run_loop(probe(gateway, engine_address, mesh.api_key, mesh.credential(), requests, work))
    finally:
        mesh.stop()  # the services flush their spans as they stop
    spans = [s for log in run_dir.glob("*.log") for s in read_spans(log)]
    got = phases(spans, read_usage_ttfts(run_dir / "gateway.log"), skip=WARMUP)
    p50 = {k: statistics.median(v) for k, v in got.items() if v}
    metrics = {"trace_mesh_added_ttft_p50_ms": statistics.median(ttfts["mesh"]) - statistics.median(ttfts["direct"]),
               "trace_direct_ttft_p50_ms": statistics.median(ttfts["direct"]),
               "trace_mesh_ttft_p50_ms": statistics.median(ttfts["mesh"]),
               "trace_requests_traced_n": len(got["pre_engine"])}
    names = {"pre_engine": "trace_gateway_pre_engine_p50_ms", "route_rtt": "trace_route_rtt_p50_ms",
             "router_handler": "trace_router_handler_p50_ms", "engine_hop": "trace_engine_hop_p50_ms",
             "end_lag": "trace_gateway_end_lag_p50_ms", "gateway_ttft": "trace_gateway_ttft_p50_ms"}
    metrics.update({names[k]: v for k, v in p50.items() if k in names})
    metrics["trace_route_called_frac"] = statistics.fmean(got["route_called"]) if got["route_called"] else 0.0
    if "gateway_ttft" in p50:
        metrics["trace_outside_gateway_p50_ms"] = metrics["trace_mesh_ttft_p50_ms"] - p50["gateway_ttft"]
    for k, v in metrics.items():
        print(f"  {k:<36} {v:10.3f}")
    dev = device_tag(device)
    results_dir = args.results_dir or (Path(tempfile.mkdtemp(prefix="mesh-trace-results-")) if args.smoke else None)
    path = write_result(f"mesh_trace_{dev}", {
        "model": model, "device": device, "engine": engine, "requests_per_leg": requests,
        "router_decision_reuse_ms": os.environ.get("LLMESH_ROUTER_DECISION_REUSE_MS", "router default"),
        "order": "one request at a time, engine and gateway alternating", "prompt": "16 random ids, 1 new token",
        "spans": "ConsoleSpanExporter in every service, read back from the logs", "smoke": args.smoke},
        metrics, results_dir=results_dir)
    print(f"wrote {path} ({time.monotonic() - t0:.0f} s)")
    return 0 if got["pre_engine"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``llmesh bench serve | offline | overhead | compare``.

    llmesh bench serve --address localhost:50051 --rate 1 2 4 --workload chat
    llmesh bench serve --address 127.0.0.1:50061 --engine --max-concurrency 8
    llmesh bench serve --address 127.0.0.1:50052 --router --model smollm2-135m
    llmesh bench offline --workload shared-prefix --num-prefixes 4 --num-requests 32
    llmesh bench overhead --rate 1 --num-requests 40          (starts its own CPU mesh)
    llmesh bench compare bench/results/a.json bench/results/b.json

Each writes bench/results/<name>.json (DESIGN.md format) and PNG plots beside it when
matplotlib is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import sys
from pathlib import Path

from llmesh.bench.workloads import KINDS, WorkloadConfig

NOTE_SHARED_CPU = ("CPU timings: other processes (tests, other benchmarks) may share the cores during "
                   "the run, so absolute numbers are noisy; compare legs of one run, not runs.")


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate is a number of requests/s or 'inf', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0, got {text!r}")
    return value


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    d = WorkloadConfig()
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=KINDS, default=d.kind,
                   help="fixed or lognormal lengths, shared-prefix (N system prompts x M questions), chat mix")
    g.add_argument("--num-requests", "--num-prompts", dest="num_requests", type=int, default=d.num_requests,
                   help="requests per run (--num-prompts: vLLM's name)")
    g.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens (mean for lognormal; "
                   "the question's for shared-prefix)")
    g.add_argument("--output-len", type=int, default=d.output_len, help="tokens to generate (mean for lognormal)")
    g.add_argument("--sigma", type=float, default=d.sigma, help="spread of lognormal lengths")
    g.add_argument("--num-prefixes", type=int, default=d.num_prefixes, help="shared-prefix: system prompts")
    g.add_argument("--prefix-len", type=int, default=d.prefix_len, help="shared-prefix: tokens per system prompt")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="token ids are drawn below this (default: the engine's vocabulary, 512 via a gateway)")
    g.add_argument("--max-model-len", type=int, default=None, help="clip requests to this window")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="stop at EOS (default: generate exactly the asked tokens)")
    g.add_argument("--seed", type=int, default=d.seed, help="the same seed sends the same requests")
    g.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput: TTFT limit")
    g.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput: TPOT limit")


def _add_output_args(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--name", default=name, help="result file name (bench/results/<name>.json)")
    p.add_argument("--results-dir", type=Path, default=None, help="default: bench/results/ of the repository")
    p.add_argument("--no-plots", action="store_true", help="write only the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _workload(args: argparse.Namespace, vocab_size: int, max_model_len: int) -> WorkloadConfig:
    return WorkloadConfig(kind=args.workload, num_requests=args.num_requests, input_len=args.input_len,
                          output_len=args.output_len, sigma=args.sigma, num_prefixes=args.num_prefixes,
                          prefix_len=args.prefix_len, vocab_size=args.vocab_size or vocab_size,
                          max_model_len=args.max_model_len or max_model_len, ignore_eos=args.ignore_eos,
                          seed=args.seed)


def _slo(args: argparse.Namespace):
    from llmesh.bench.metrics import Slo

    return Slo(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)


def _results_dir(args: argparse.Namespace) -> Path:
    from llmesh.bench_results import RESULTS_DIR

    return args.results_dir or RESULTS_DIR


def _write(args, workload: dict, metrics: dict[str, float]) -> Path:
    from llmesh.bench_results import write_result

    path = write_result(args.name, workload, metrics, results_dir=_results_dir(args))
    print(f"wrote {path}")
    return path


def _credential(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """The mesh secret's metadata for --engine/--router targets (their services refuse
    calls without it when the mesh runs with a secret, as ``llmesh up`` does)."""
    if not args.internal_secret_file:
        return None
    from llmesh.mesh_secret import METADATA_KEY, read_secret

    return [(METADATA_KEY, read_secret(args.internal_secret_file).decode())]


async def _serve(args: argparse.Namespace) -> int:
    from llmesh.bench.loadgen import EngineTarget, GatewayTarget, RouterTarget
    from llmesh.bench.plots import plot_latency_cdfs, plot_rate_sweep
    from llmesh.bench.report import format_summary
    from llmesh.bench.sweep import LoadPoint, run_point
    from llmesh.engine.errors import InvalidRequestError

    if args.backend == "openai":
        from llmesh.bench.openai_target import OpenAITarget

        if not args.base_url:
            raise InvalidRequestError("--backend openai needs --base-url http://host:port/v1", field="base_url")
        target = OpenAITarget(args.base_url, args.model, args.openai_endpoint, args.api_key)
    elif args.router:
        target = RouterTarget(args.address, args.model, _credential(args))
    elif args.engine:
        target = EngineTarget(args.address, _credential(args))
    else:
        target = GatewayTarget(args.address, args.model, args.api_key, connections=args.connections)
    await target.open()
    try:
        if args.backend == "openai":
            vocab, window = 512, await target.resolve_model() or 2048
        elif args.engine:
            info = await target.info()
            vocab, window = info.vocab_size, info.max_model_len
        elif args.router:
            if args.model == "auto":
                raise InvalidRequestError("--router needs --model NAME: token-id prompts belong to one model",
                                          field="model")
            vocab, window = 512, 2048
        else:
            vocab, window = 512, await target.resolve_model()
        workload = _workload(args, vocab, window)
        runs, sweep = [], []
        for i, rate in enumerate(args.rate):
            point = LoadPoint(rate, args.max_concurrency)
            # Same shapes at every rate, new tokens: a rate must not hit the cache the previous one filled.
            res = await run_point(target, workload, point, content_seed=None if i == 0 else workload.seed + 7919 * i,
                                  slo=_slo(args), timeout=args.timeout, progress=not args.no_progress)
            print(format_summary(f"{target.name} {args.address}, {point.label}", res.metrics))
            _say_errors(res.run)
            runs.append(res.run)
            sweep.append((point, res.metrics))
    finally:
        await target.close()
    if len(sweep) == 1:
        metrics = sweep[0][1]
    else:
        metrics = {f"{p.key}_{k}": v for p, m in sweep for k, v in m.items()}
    doc = {"target": target.name, "address": args.base_url if args.backend == "openai" else args.address, "model": info.model if isinstance(target, EngineTarget) else target.model,
           "rates_req_s": [str(r) for r in args.rate], "max_concurrency": args.max_concurrency,
           "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "timeout_s": args.timeout,
           **workload.describe(), "notes": args.notes or NOTE_SHARED_CPU}
    path = _write(args, doc, metrics)
    if not args.no_plots:
        plots = [plot_latency_cdfs(runs, path.with_name(f"{args.name}_cdf.png"), title=f"{target.name} latency")]
        finite = [(p.rate, m) for p, m in sweep if not math.isinf(p.rate)]
        if len(finite) > 1:
            plots.append(plot_rate_sweep({target.name: finite}, path.with_name(f"{args.name}_sweep.png")))
        _say_plots(plots)
    return 1 if any(r.requests and all(not q.ok for q in r.requests) for r in runs) else 0


def _serve_cmd(args: argparse.Namespace) -> int:
    from llmesh.engine.errors import InvalidRequestError

    try:
        return asyncio.run(_serve(args))
    except InvalidRequestError as e:
        print(f"llmesh bench serve: {e}", file=sys.stderr)
        return 2


def _say_errors(run) -> None:
    """One example message per failing status, so a failed run says why."""
    seen: dict[str, str] = {}
    for r in run.requests:
        if not r.ok:
            seen.setdefault(r.error, r.detail)
    for status, detail in seen.items():
        print(f"  error {status}: {detail}", file=sys.stderr)


def _say_plots(plots) -> None:
    from llmesh.bench.plots import available

    if not available():
        print("no plots: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    for p in plots:
        if p:
            print(f"wrote {p}")


def _offline(args: argparse.Namespace) -> int:
    from llmesh.bench.metrics import summarize
    from llmesh.bench.offline import load_engine, run_offline
    from llmesh.bench.plots import plot_latency_cdfs
    from llmesh.bench.report import format_summary
    from llmesh.bench.workloads import build_requests

    llm = load_engine(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    core = llm.engine
    workload = _workload(args, core.model_config.vocab_size, core.max_model_len)
    warm = dataclasses.replace(workload, num_requests=2, kind="fixed", output_len=2)
    run_offline(llm, build_requests(warm, content_seed=99), progress=False)
    run = run_offline(llm, build_requests(workload), rate=args.rate, seed=workload.seed,
                      ignore_eos=workload.ignore_eos, progress=not args.no_progress)
    metrics = summarize(run, _slo(args))
    print(format_summary(f"offline {args.model or 'demo model'}", metrics))
    doc = {"target": "offline", "model": args.model or "demo (SmolLM2-135M-Instruct Q4_1)", "device": args.device,
           "dtype": args.dtype, "max_num_seqs": args.max_num_seqs, "rate_req_s": str(args.rate),
           "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, **workload.describe(),
           "notes": args.notes or NOTE_SHARED_CPU}
    path = _write(args, doc, metrics)
    if not args.no_plots:
        _say_plots([plot_latency_cdfs([run], path.with_name(f"{args.name}_cdf.png"), title="offline latency")])
    return 0


def _overhead(args: argparse.Namespace) -> int:
    from llmesh.bench.overhead import measure_overhead, mesh_addresses, plot_overhead, router_address, start_mesh
    from llmesh.bench.report import format_summary

    print("starting the mesh ...", file=sys.stderr)
    mesh = start_mesh(device=args.device, models_file=args.models_file, run_dir=args.run_dir, auth=args.auth)
    try:
        gateway, engine, model = mesh_addresses(mesh)
        api_key = args.api_key or mesh.api_key
        workload = _workload(args, 1 << 30, 1 << 30)  # clipped to the engine's own in measure_overhead
        result = asyncio.run(measure_overhead(gateway, engine, model, workload, rate=args.rate,
                                              credential=mesh.credential(),
                                              max_concurrency=args.max_concurrency, rounds=args.rounds,
                                              probes=args.probes, router=router_address(mesh),
                                              api_key=api_key, slo=_slo(args), timeout=args.timeout,
                                              progress=not args.no_progress))
    finally:
        mesh.stop()
    m = result.metrics
    _say_errors(result.direct)
    _say_errors(result.mesh)
    for leg in ("direct", "mesh"):
        print(format_summary(leg, {k.removeprefix(f"{leg}_"): v for k, v in m.items() if k.startswith(f"{leg}_")}))
    for k in ("mesh_idle_added_ttft_p50_ms", "router_hop_idle_added_ttft_p50_ms",
              "gateway_hop_idle_added_ttft_p50_ms", "mesh_added_ttft_p50_ms", "mesh_added_ttft_p99_ms",
              "mesh_added_tpot_p50_ms", "mesh_throughput_ratio_frac"):
        if k in m:
            print(f"{k:>28}: {m[k]:9.3f}")
    doc = {"target": "engine direct vs gateway+router", "model": model, "mesh_device": args.device,
           "models_file": args.models_file or "demo", "gateway_auth": args.auth, "rate_req_s": str(args.rate),
           "max_concurrency": args.max_concurrency, "rounds": args.rounds, "idle_probes": args.probes,
           "order": "ABBA (direct, mesh, ...)",
           "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
           **result.workload.describe(),
           "notes": args.notes or NOTE_SHARED_CPU}
    path = _write(args, doc, m)
    if not args.no_plots:
        _say_plots(plot_overhead(result, path.parent, args.name))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from llmesh.bench.report import compare, load_result

    try:
        a, b = load_result(args.a), load_result(args.b)
    except (OSError, ValueError) as e:
        print(f"cannot compare: {e}", file=sys.stderr)
        return 2
    print(compare(a, b, str(args.a), str(args.b)))
    return 0


def add_bench_commands(subparsers) -> None:
    """Add ``bench`` (serve, offline, overhead, compare) to the ``llmesh`` command."""
    bench = subparsers.add_parser("bench", help="benchmarks: serving load, offline throughput, mesh overhead",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = bench.add_subparsers(dest="bench_cmd", required=True)

    p = sub.add_parser("serve", help="streaming gRPC load against the gateway or one engine")
    p.add_argument("--address", default="localhost:50051", help="gateway (or, with --engine, engine) host:port")
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="grpc: llmesh's own API at --address; openai: any OpenAI-compatible server at --base-url")
    p.add_argument("--base-url", default=None, help="--backend openai: the server's /v1 URL, e.g. http://host:8000/v1")
    p.add_argument("--openai-endpoint", choices=("completions", "chat"), default="completions",
                   help="--backend openai: stream /v1/completions (token-id prompts) or /v1/chat/completions")
    p.add_argument("--engine", action="store_true", help="the address is one engine (Engine API)")
    p.add_argument("--router", action="store_true", help="the address is the router (Router API; needs --model)")
    p.add_argument("--internal-secret-file", default=os.environ.get("LLMESH_INTERNAL_SECRET_FILE", ""),
                   help="with --engine/--router: the mesh secret file (`llmesh up` writes mesh.secret in its run "
                        "folder) [$LLMESH_INTERNAL_SECRET_FILE]")
    p.add_argument("--model", default="auto", help="model name at the gateway")
    p.add_argument("--api-key", default=None, help="gateway API key (default: $LLMESH_API_KEY)")
    p.add_argument("--connections", type=int, default=1,
                   help="gateway: TCP connections the requests take in turn (a gateway with --workers N "
                        "balances connections: give it at least N)")
    p.add_argument("--rate", type=_rate, nargs="+", default=[float("inf")],
                   help="Poisson request rate(s) in req/s; several = a sweep; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each request (s)")
    p.add_argument("--notes", default="", help="recorded in the result's workload")
    _add_workload_args(p)
    _add_output_args(p, "serve")
    p.set_defaults(fn=_serve_cmd)

    p = sub.add_parser("offline", help="in-process engine throughput on the same workloads")
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--rate", type=_rate, default=float("inf"), help="Poisson arrivals (default: all at once)")
    p.add_argument("--notes", default="")
    _add_workload_args(p)
    _add_output_args(p, "offline")
    p.set_defaults(fn=_offline)

    p = sub.add_parser("overhead", help="start a mesh; one workload straight to an engine and through the mesh")
    p.add_argument("--device", default="cpu", help="the engines' device")
    p.add_argument("--models-file", default=None, help="default: the demo model")
    p.add_argument("--run-dir", default=None, help="mesh logs (default: a temporary folder)")
    p.add_argument("--auth", action="store_true",
                   help="gateway with API keys on (the launcher's local admin key); off by default")
    p.add_argument("--api-key", default=None, help="key for --auth (default: the launcher's admin key)")
    p.add_argument("--rate", type=_rate, default=1.0, help="Poisson request rate of each leg (req/s)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2, help="legs alternate ABBA over this many rounds")
    p.add_argument("--probes", type=int, default=32,
                   help="first, this many one-token requests one at a time per leg (idle added TTFT)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--notes", default="")
    _add_workload_args(p)
    _add_output_args(p, "mesh_overhead_cpu")
    p.set_defaults(fn=_overhead)

    p = sub.add_parser("compare", help="print the differences between two result files")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.set_defaults(fn=_compare)

"""The gateway's CPU cost per relayed message and per request, beside a bare grpc.aio relay.

One gateway process relays every streamed message through Python, so its CPU per message
bounds the tokens per second one process passes (docs/operations.md "Gateway workers"). This
measures, on the machine it runs on:

1. the mesh (``llmesh up``'s services, API keys on, the demo model on the CPU): ``--streams``
   concurrent streams of ``--tokens`` tokens through the gateway; the gateway's CPU time (its
   process tree, from /proc) over the streamed messages it relayed
   (``gateway_cpu_per_message_us``); then ``--requests`` two-token requests at the same
   concurrency, whose CPU less two messages each is the cost of a request
   (``gateway_cpu_per_request_ms``: auth, checks, the Route call, the engine call, usage);
2. a bare relay: a grpc.aio server (uvloop) that forwards a source server's stream message
   by message, no interceptors, no checks, at the same number of streams and the same
   interval between messages as the mesh run had (``bare_relay_cpu_per_message_us``): the
   floor a Python grpc relay pays.

``gateway_over_bare_x`` is their ratio. Writes bench/results/gateway_cpu_<dev>.json.
Usage: python bench/gateway_cpu.py [--streams 8] [--tokens 96] [--requests 64] [--rounds 4]
                                  [--results-dir DIR] [--smoke]
--smoke: 4 streams of 48 tokens, 4 requests, one round, the file to a scratch folder unless
--results-dir says otherwise: checks the script (tests/bench/test_gateway_cpu_smoke.py); its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmesh.bench.loadgen import GatewayTarget, run_load, run_loop
from llmesh.bench.overhead import mesh_addresses, start_mesh
from llmesh.bench.process_tree import tree_cpu_s
from llmesh.bench.workloads import WorkloadConfig, build_requests
from llmesh.bench_results import device_tag, write_result
from llmesh.ports import free_port

PAYLOAD = b"y" * 60
"""About a one-token GenerateResponse's size on the wire."""


# ---- the bare relay: three roles of this file ---------------------------------------------------
async def _serve_stream(port: int, stream) -> None:
    """Serve ``stream`` as /bench.Source/Stream (a generic handler, no interceptors) until killed."""
    import grpc

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Source", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _source(port: int, messages: int, interval_s: float) -> None:
    async def stream(request, context):
        for _ in range(messages):
            await asyncio.sleep(interval_s)
            yield PAYLOAD

    await _serve_stream(port, stream)


async def _relay(port: int, upstream: int) -> None:
    import grpc

    upstream_stream = grpc.aio.insecure_channel(f"127.0.0.1:{upstream}").unary_stream("/bench.Source/Stream")

    async def stream(request, context):
        async for message in upstream_stream(request):
            yield message

    await _serve_stream(port, stream)


def _spawn(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE)
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"bare relay role {args[1]} did not start")
    return proc


def bare_relay(streams: int, messages: int, interval_s: float, rounds: int) -> float:
    """CPU microseconds per message of the relay process."""
    import grpc

    source_port, relay_port = free_port(), free_port()
    procs = [_spawn("--role", "source", "--port", str(source_port), "--messages", str(messages),
                    "--interval-s", str(interval_s))]
    try:
        procs.append(_spawn("--role", "relay", "--port", str(relay_port), "--upstream", str(source_port)))

        async def drive() -> float:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}")
            stream = channel.unary_stream("/bench.Source/Stream")

            async def one() -> int:
                return sum([1 async for _ in stream(b"x")])

            await asyncio.gather(*[one() for _ in range(streams)])  # warm-up
            per_message = []
            for _ in range(rounds):
                cpu0 = tree_cpu_s(procs[1].pid)
                relayed = sum(await asyncio.gather(*[one() for _ in range(streams)]))
                per_message.append(1e6 * (tree_cpu_s(procs[1].pid) - cpu0) / relayed)
            await channel.close()
            return statistics.median(per_message)

        return run_loop(drive())
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ---- the mesh ------------------------------------------------------------------------------------
def mesh_costs(streams: int, tokens: int, requests: int, rounds: int, say) -> dict[str, float]:
    mesh = start_mesh(auth=True)
    try:
        gateway, _, model = mesh_addresses(mesh)
        pid = mesh.children["gateway"].proc.pid

        async def drive() -> dict[str, float]:
            target = GatewayTarget(gateway, model, mesh.api_key)
            await target.open()
            await target.resolve_model()
            long = WorkloadConfig(kind="fixed", num_requests=streams * 2, input_len=16, output_len=tokens)
            short = WorkloadConfig(kind="fixed", num_requests=requests, input_len=16, output_len=2)
            await run_load(target, build_requests(long, content_seed=1), max_concurrency=streams, ignore_eos=True,
                           timeout=600, progress=False)  # warm-up
            per_message, per_request, intervals = [], [], []
            for r in range(rounds):
                cpu0 = tree_cpu_s(pid)
                run = await run_load(target, build_requests(long, content_seed=10 + r), max_concurrency=streams,
                                     ignore_eos=True, timeout=600, progress=False)
                messages = sum(len(q.chunk_times) for q in run.requests)
                per_message.append(1e6 * (tree_cpu_s(pid) - cpu0) / messages)
                intervals += [b - a for q in run.requests for a, b in zip(q.chunk_times, q.chunk_times[1:])]
                say(f"round {r + 1}: {messages} messages, {per_message[-1]:.0f} us of gateway CPU each")
            message_us = statistics.median(per_message)
            for r in range(rounds):
                cpu0 = tree_cpu_s(pid)
                run = await run_load(target, build_requests(short, content_seed=100 + r), max_concurrency=streams,
                                     ignore_eos=True, timeout=600, progress=False)
                messages = sum(len(q.chunk_times) for q in run.requests)
                spent_us = 1e6 * (tree_cpu_s(pid) - cpu0) - messages * message_us
                per_request.append(spent_us / 1e3 / len(run.requests))
                say(f"round {r + 1}: {len(run.requests)} requests, {per_request[-1]:.2f} ms of gateway CPU each "
                    "besides their messages")
            await target.close()
            return {"gateway_cpu_per_message_us": message_us,
                    "gateway_cpu_per_request_ms": statistics.median(per_request),
                    "mesh_message_interval_ms": 1e3 * statistics.median(intervals)}

        return run_loop(drive())
    finally:
        mesh.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96, help="tokens of each long stream")
    ap.add_argument("--requests", type=int, default=64, help="two-token requests of the per-request rounds")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: checks the script")
    ap.add_argument("--role", choices=("source", "relay"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--interval-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "source":
        run_loop(_source(args.port, args.messages, args.interval_s))
        return 0
    if args.role == "relay":
        run_loop(_relay(args.port, args.upstream))
        return 0
    if args.smoke:
        args.streams, args.tokens, args.requests, args.rounds = 4, 48, 4, 1  # ~5 CPU ticks of relaying
        args.results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="gateway-cpu-"))
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    say("the mesh (demo model, API keys on): starting")
    metrics = mesh_costs(args.streams, args.tokens, args.requests, args.rounds, say)
    interval_s = metrics["mesh_message_interval_ms"] / 1e3
    say(f"the bare relay: {args.streams} streams of {args.tokens} messages, one every {1e3 * interval_s:.1f} ms")
    metrics["bare_relay_cpu_per_message_us"] = bare_relay(args.streams, args.tokens, interval_s, args.rounds)
    metrics["gateway_over_bare_x"] = metrics["gateway_cpu_per_message_us"] / metrics["bare_relay_cpu_per_message_us"]
    for k, v in metrics.items():
        say(f"{k:<32}{v:10.2f}")
    path = write_result(f"gateway_cpu_{device_tag('cpu')}", {
        "mesh": "llmesh up's services, demo model on the CPU, API keys on, direct routing",
        "streams": args.streams, "tokens_per_stream": args.tokens, "requests_of_two_tokens": args.requests,
        "rounds": args.rounds, "cpu": "the gateway's (or the relay's) process tree, from /proc",
        "bare_relay": "grpc.aio + uvloop, generic handlers, no interceptors, same streams and message interval",
        "smoke": args.smoke,
        "notes": "CPU time, not wall time: other work on the host changes it less, but the per-message cost "
                 "depends on how many messages share a loop wake-up (the message rate)"}, metrics,
        results_dir=args.results_dir)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

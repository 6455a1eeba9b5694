"""What the OpenAI-compatible HTTP front adds to time-to-first-token over the gRPC front.

A real engine (the demo model on the CPU, or the tiny model with --smoke), router and
gateway (with --http-port) run as processes; the same prompts are sent alternately
through gRPC Generate and HTTP /v1/completions (stream=true), one at a time, and each
front's TTFT p50 is taken as a client sees it (request sent → first token). Prefix
caching is off so neither front profits from the other's requests.

It also measures the two candidate server stacks alone (aiohttp vs starlette on uvicorn),
each serving a minimal SSE endpoint in its own process: the numbers the choice of aiohttp
was made on.

    .venv/bin/python bench/http_front.py            # demo model → bench/results/http_front_cpu.json
    .venv/bin/python bench/http_front.py --smoke    # tiny model, few requests (no result file)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: tests.* helpers

from llmesh.bench_results import write_result  # noqa: E402
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc  # noqa: E402
from tests.mesh_helpers import ServiceProcess, free_port, start_engine  # noqa: E402

MODEL = "m"
PROBE_SERVER = r'''
import asyncio, json, sys
which, port = sys.argv[1], int(sys.argv[2])
async def aiohttp_app():
    from aiohttp import web
    async def h(req):
        body = await req.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        for i in range(4):
            await resp.write(b"data: " + json.dumps({"i": i, "m": body["model"]}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp
    app = web.Application(); app.router.add_post("/v1/x", h)
    runner = web.AppRunner(app, access_log=None); await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()
async def starlette_app():
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    async def h(req):
        body = await req.json()
        async def gen():
            for i in range(4):
                yield b"data: " + json.dumps({"i": i, "m": body["model"]}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")
    app = Starlette(routes=[Route("/v1/x", h, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, loop="none", lifespan="off"))
    print("ready", flush=True)
    await server.serve()
import uvloop
uvloop.run(aiohttp_app() if which == "aiohttp" else starlette_app())
'''


def p50(values: list[float]) -> float:
    return statistics.median(values)


def http_ttft_ms(conn: http.client.HTTPConnection, path: str, body: dict) -> float:
    """Send a streaming request; ms until the first SSE event with text (the rest is drained)."""
    start = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first = None
    buf = b""
    while True:
        data = resp.read1(65536)
        if not data:
            break
        if first is None:
            buf += data
            if b'"text": "' in buf or b"data: [DONE]" in buf or b'"i": 0' in buf:
                first = time.perf_counter()
    return 1000 * ((first or time.perf_counter()) - start)


def probe_stack(which: str, n: int) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", PROBE_SERVER, which, str(port)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        conn = None
        for _ in range(100):  # uvicorn binds after printing "ready"
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.connect()
                break
            time.sleep(0.05)
        times = [http_ttft_ms(conn, "/v1/x", {"model": "x"}) for _ in range(n + 50)]
        return p50(times[50:])
    finally:
        proc.terminate()
        proc.wait(10)


def grpc_ttft_ms(stub: inference_pb2_grpc.InferenceStub, prompt: str, max_tokens: int) -> float:
    req = inference_pb2.GenerateRequest(model=MODEL, text=prompt, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    first = None
    for msg in stub.Generate(req, timeout=120):
        if first is None and msg.token_ids:
            first = time.perf_counter()
    return 1000 * (first - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few requests, no result file")
    ap.add_argument("--requests", type=int, default=60, help="requests per front")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--probe-requests", type=int, default=400, help="requests per stack in the stack probe")
    ap.add_argument("--name", default="http_front_cpu")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.probe_requests = 6, 20
    root = Path(tempfile.mkdtemp(prefix="llmesh-http-bench-"))
    if args.smoke:
        from tests.fixtures.tiny_models import build_tiny_model

        model_path = build_tiny_model(str(root / "tiny"), "llama")
    else:
        from llmesh.demo_model import find_demo_model

        model_path = find_demo_model()
    prompts = [f"Question {i}: name a city that starts with the letter {chr(65 + i % 26)}, and say why "
               f"people visit it." for i in range(args.requests)]
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start_engine(model_path, "--served-model-name", MODEL,
                                                  "--enable-prefix-caching", "false", ready_timeout=300))
        models_file = root / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": model_path, "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        http_port = free_port()
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--auth", "false",
            "--http-port", str(http_port)]))
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.address))
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=120)
        for p in prompts[:2]:  # warm both paths (tokenizer, channels, engine kernels)
            grpc_ttft_ms(stub, p, args.max_tokens)
            http_ttft_ms(conn, "/v1/completions", {"model": MODEL, "prompt": p, "max_tokens": args.max_tokens,
                                                   "temperature": 0, "ignore_eos": True, "stream": True})
        grpc_ms, http_ms = [], []
        for i, p in enumerate(prompts):  # alternate which front goes first
            fronts = [("grpc", p), ("http", p)] if i % 2 == 0 else [("http", p), ("grpc", p)]
            for front, prompt in fronts:
                if front == "grpc":
                    grpc_ms.append(grpc_ttft_ms(stub, prompt, args.max_tokens))
                else:
                    http_ms.append(http_ttft_ms(conn, "/v1/completions", {
                        "model": MODEL, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True}))
    aiohttp_ms = probe_stack("aiohttp", args.probe_requests)
    starlette_ms = probe_stack("starlette", args.probe_requests)
    metrics = {
        "grpc_ttft_p50_ms": round(p50(grpc_ms), 3),
        "http_ttft_p50_ms": round(p50(http_ms), 3),
        "http_added_ttft_p50_ms": round(p50(http_ms) - p50(grpc_ms), 3),
        "http_added_ttft_paired_p50_ms": round(p50([h - g for h, g in zip(http_ms, grpc_ms)]), 3),
        "stack_aiohttp_first_event_p50_ms": round(aiohttp_ms, 3),
        "stack_starlette_uvicorn_first_event_p50_ms": round(starlette_ms, 3),
    }
    print(json.dumps(metrics, indent=2))
    if not args.smoke:
        workload = {"model": "SmolLM2-135M-Instruct Q4_1 (demo), CPU, float32, prefix caching off",
                    "requests_per_front": args.requests, "max_tokens": args.max_tokens, "concurrency": 1,
                    "http": "POST /v1/completions stream=true, http.client keep-alive",
                    "grpc": "Inference.Generate, grpc sync stub",
                    "stack_probe": f"{args.probe_requests} POSTs of a 4-event SSE endpoint per stack, "
                                   "first 50 dropped"}
        print("wrote", write_result(args.name, workload, metrics))


if __name__ == "__main__":
    main()

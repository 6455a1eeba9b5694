"""What the gateway's response cache saves: a hit's time to first token and its end-to-end
time against a miss's, for 128-token greedy answers.

A real engine (the demo model on the CPU, or the tiny model with --smoke), router, Redis
and gateway (--response-cache true, --http-port) run as processes. Each of ``--prompts``
distinct prompts is sent once (a miss: the engine generates 128 tokens, the gateway
stores them), then ``--hits`` times more (hits) through each client, one request at a
time: gRPC Generate with an asyncio client (grpc.aio, as ``llmesh.client``'s async client)
and with the synchronous stub, and HTTP /v1/completions (stream=true). Times are taken as
a client sees them (request sent → first token, → last message).

``response_cache_hit_ttft_ms`` and the speedup are the synchronous gRPC stub's (the
speedup compares its miss and hit end-to-end times); the asyncio client's and HTTP's hit
times are recorded beside them (``*_grpc_aio_ms``, ``response_cache_http_*``). Each hit
of each client is taken in turn, so all see the same machine load; on two shared cores a
busy neighbour moves these few milliseconds, so run it on a quiet machine.

    .venv/bin/python bench/response_cache.py          # demo model → bench/results/cache_cpu.json
    .venv/bin/python bench/response_cache.py --smoke  # tiny model, few requests (no result file)

The result file is shared with other benchmarks (embeddings write their metrics into it
too): this script merges its metrics and its workload section into it and leaves other
keys as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import http.client
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: tests.* helpers

from llmesh.bench_results import RESULTS_DIR, describe_device, git_commit  # noqa: E402
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc  # noqa: E402
from tests.mesh_helpers import RedisServer, ServiceProcess, free_port, start_engine  # noqa: E402

MODEL = "m"


def p50(values: list[float]) -> float:
    return statistics.median(values)


def grpc_times_ms(stub: inference_pb2_grpc.InferenceStub, prompt: str, max_tokens: int) -> tuple[float, float, bool]:
    """(TTFT, end-to-end, whether it was a cache hit) of one greedy Generate."""
    req = inference_pb2.GenerateRequest(model=MODEL, text=prompt, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    started = time.perf_counter()
    first = None
    cached = False
    tokens = 0
    for resp in stub.Generate(req, timeout=300):
        if first is None and resp.token_ids:
            first = time.perf_counter()
        tokens += len(resp.token_ids)
        cached = resp.cached_response
    end = time.perf_counter()
    assert tokens == max_tokens, f"expected {max_tokens} tokens, got {tokens}"
    return 1000 * (first - started), 1000 * (end - started), cached


class AioClient:
    """A grpc.aio channel driven from synchronous code, so that its hits interleave with the
    other clients' (every client then sees the same machine load)."""

    def __init__(self, address: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._channel = self._loop.run_until_complete(self._open(address))
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    @staticmethod
    async def _open(address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address)

    def times_ms(self, prompt: str, max_tokens: int) -> tuple[float, float, bool]:
        return self._loop.run_until_complete(self._times_ms(prompt, max_tokens))

    async def _times_ms(self, prompt: str, max_tokens: int) -> tuple[float, float, bool]:
        req = inference_pb2.GenerateRequest(model=MODEL, text=prompt, sampling=common_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        started = time.perf_counter()
        first = None
        cached = False
        async for resp in self._stub.Generate(req, timeout=300):
            if first is None:
                first = time.perf_counter()
            cached = resp.cached_response
        return 1000 * (first - started), 1000 * (time.perf_counter() - started), cached

    def close(self) -> None:
        self._loop.run_until_complete(self._channel.close())
        self._loop.close()


def http_times_ms(conn: http.client.HTTPConnection, prompt: str, max_tokens: int) -> tuple[float, float, bool]:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: ") and first is None and b'"text"' in line:
            first = time.perf_counter()
        if line.strip() == b"data: [DONE]":
            break
    resp.read()
    end = time.perf_counter()
    return 1000 * (first - started), 1000 * (end - started), resp.getheader("x-llmesh-cache") == "hit"


def merge_result(name: str, section: str, workload: dict, metrics: dict[str, float]) -> Path:
    """Update ``bench/results/<name>.json`` with these metrics and this workload section,
    keeping every other key (another script writes its own metrics into the same file)."""
    path = RESULTS_DIR / f"{name}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    doc.update({"device": describe_device(), "commit": git_commit(), "command": command,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    doc.setdefault("workload", {})[section] = {**workload, "command": command}
    doc.setdefault("metrics", {}).update(metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few requests, no result file")
    ap.add_argument("--prompts", type=int, default=3, help="distinct prompts (one miss each)")
    ap.add_argument("--hits", type=int, default=50, help="hits per prompt and client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--name", default="cache_cpu")
    args = ap.parse_args()
    if args.smoke:
        args.prompts, args.hits = 2, 5
    root = Path(tempfile.mkdtemp(prefix="llmesh-cache-bench-"))
    if args.smoke:
        from tests.fixtures.tiny_models import build_tiny_model

        model_path = build_tiny_model(str(root / "tiny"), "llama")
    else:
        from llmesh.demo_model import find_demo_model

        model_path = find_demo_model()
    prompts = [f"Request {i}: classify the sentiment of this review as positive or negative, then explain: "
               f"'The {['soup', 'train', 'film', 'phone', 'hotel', 'book'][i % 6]} was {i} times better than I "
               f"expected.'" for i in range(args.prompts)]
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        engine = stack.enter_context(start_engine(model_path, "--served-model-name", MODEL,
                                                  "--enable-prefix-caching", "false", ready_timeout=300))
        models_file = root / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [{
            "name": MODEL, "path": model_path, "addresses": [engine.address]}]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        http_port = free_port()
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--auth", "false",
            "--redis-url", redis_server.url, "--response-cache", "true", "--http-port", str(http_port)]))
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.address))
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)
        store = redis.Redis.from_url(redis_server.url)
        aio = AioClient(gateway.address)
        stack.callback(aio.close)
        grpc_times_ms(stub, "warm up the engine's kernels and the gateway's channels", 4)
        miss_ttft, miss_e2e, hit_ttft, hit_e2e, http_ttft, http_e2e, aio_ttft, aio_e2e = ([] for _ in range(8))
        for i, prompt in enumerate(prompts):
            ttft, e2e, cached = grpc_times_ms(stub, prompt, args.max_tokens)
            assert not cached, "a fresh prompt was a hit"
            miss_ttft.append(ttft)
            miss_e2e.append(e2e)
            deadline = time.monotonic() + 10  # the store runs after the stream, in the background
            while sum(1 for _ in store.scan_iter("llmesh:rc:*")) < i + 1:
                assert time.monotonic() < deadline, "the answer was not stored"
                time.sleep(0.01)
            for _ in range(args.hits):
                ttft, e2e, cached = grpc_times_ms(stub, prompt, args.max_tokens)
                assert cached, "a repeated greedy prompt was not a hit"
                hit_ttft.append(ttft)
                hit_e2e.append(e2e)
                ttft, e2e, cached = http_times_ms(conn, prompt, args.max_tokens)
                assert cached, "a repeated greedy prompt over HTTP was not a hit"
                http_ttft.append(ttft)
                http_e2e.append(e2e)
                ttft, e2e, cached = aio.times_ms(prompt, args.max_tokens)
                assert cached, "a repeated greedy prompt over the asyncio client was not a hit"
                aio_ttft.append(ttft)
                aio_e2e.append(e2e)
    metrics = {
        "response_cache_hit_ttft_ms": round(p50(hit_ttft), 3),
        "response_cache_hit_speedup_x": round(p50(miss_e2e) / p50(hit_e2e), 2),
        "response_cache_hit_e2e_ms": round(p50(hit_e2e), 3),
        "response_cache_hit_ttft_grpc_aio_ms": round(p50(aio_ttft), 3),
        "response_cache_hit_e2e_grpc_aio_ms": round(p50(aio_e2e), 3),
        "response_cache_miss_ttft_ms": round(p50(miss_ttft), 3),
        "response_cache_miss_e2e_ms": round(p50(miss_e2e), 3),
        "response_cache_http_hit_ttft_ms": round(p50(http_ttft), 3),
        "response_cache_http_hit_e2e_ms": round(p50(http_e2e), 3),
    }
    print(json.dumps(metrics, indent=2))
    if not args.smoke:
        workload = {"model": "SmolLM2-135M-Instruct Q4_1 (demo), CPU, float32, prefix caching off",
                    "max_tokens": args.max_tokens, "sampling": "greedy, ignore_eos", "prompts": args.prompts,
                    "hits_per_prompt_and_client": args.hits, "concurrency": 1,
                    "grpc": "Inference.Generate: sync stub (misses, hits, speedup), grpc.aio client "
                            "(*_grpc_aio_ms)",
                    "http": "POST /v1/completions stream=true, http.client keep-alive",
                    "redis": "one local redis-server (keys and cache)",
                    "speedup": "p50 end-to-end time of a miss / p50 of a hit"}
        print("wrote", merge_result(args.name, "response_cache", workload, metrics))


if __name__ == "__main__":
    main()

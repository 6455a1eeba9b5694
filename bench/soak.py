"""Soak benchmark: the whole CPU mesh under mixed traffic for a long time, with faults.

    python bench/soak.py                      # 20 minutes, the demo model (SmolLM2-135M)
    python bench/soak.py --smoke              # ~60 s (CI: tests/bench/test_soak_smoke.py)
    python bench/soak.py --duration-s 3600 --models-file models.yaml

Starts the mesh as ``llmesh up`` does (llmesh.launcher.Mesh: Redis, prefix-cache index,
engines, router, gateway with its HTTP front, API keys on), registers two tenants' keys,
and runs ``--concurrency`` clients that mix short and long prompts, gRPC streams and
unary calls, the OpenAI SDK over HTTP (streaming and not), client cancels, invalid
requests and both tenants. Meanwhile a schedule injects faults: SIGSTOP/SIGCONT of an
engine, kill -9 of an engine, kill -9 of Redis. Every restart is the launcher's own:
this script calls ``Mesh.supervise()`` from its main thread, as ``llmesh up`` does, and
records the restarts it made by child and how long each killed child took to serve
again. Redis persists (append-only file, in a temporary data folder of this run, never
the user's), so the keys are not registered again after its kill: the soak checks they
still work and counts those that do not (keys_lost_after_redis_restart_n). Faults stop
at 80% of the duration, so the tail of the run shows recovery.

When the traffic stops and drains, it records in bench/results/soak_cpu.json: requests
and errors by gRPC code / HTTP status, invalid requests answered with the right refusal,
KV blocks still held by any engine (must be 0; read with engine Load over a call that
carries the mesh secret), resident memory of every service (process
tree: an engine's core process included) at start and end, throughput and latency.
A line of progress is printed every ``--progress-s`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

from llmesh.bench.overhead import ENGINE_PORTS
from llmesh.bench.process_tree import tree_rss_mb
from llmesh.bench_results import write_result
from llmesh.launcher import Mesh, UpConfig
from llmesh.ports import free_port, free_port_base

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_faults import Faults, drain, supervise  # noqa: E402  (the sibling module, however this script is started)

SHORT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from one to five.",
                 "Name three colors.", "Explain gravity in one sentence.", "Say hello politely."]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "boxing", "matches"]
TAIL = 0.9
"""Errors after this fraction of the duration are counted apart (errors_tail_n)."""


# ---- measurements -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


@dataclasses.dataclass
class Stats:
    started: float = dataclasses.field(default_factory=time.monotonic)
    total: int = 0
    ok: int = 0
    cancelled: int = 0
    invalid_refused: int = 0
    invalid_wrong: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    errors_tail: int = 0
    auth_after_redis_restart: int = 0
    """UNAUTHENTICATED / HTTP 401 once Redis was back from a kill: keys it lost."""
    out_tokens: int = 0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    ttfts_ms: list[float] = dataclasses.field(default_factory=list)

    def error(self, key: str, in_tail: bool, after_redis_restart: bool) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1
        self.errors_tail += in_tail
        self.auth_after_redis_restart += after_redis_restart and key in ("grpc_UNAUTHENTICATED", "http_401")


# ---- traffic ----------------------------------------------------------------------------------

class Traffic:
    """One client's mix of requests; every call has a deadline."""

    def __init__(self, gateway: str, http_base: str, keys: dict[str, str], model: str, long_prompt: str,
                 stats: Stats, deadline_at: float, duration_s: float, rng: random.Random,
                 redis_restarted) -> None:
        import openai

        from llmesh.v1 import inference_pb2_grpc

        self.channel = grpc.aio.insecure_channel(gateway)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.sdk = {t: openai.AsyncOpenAI(base_url=http_base, api_key=k, max_retries=0, timeout=60)
                    for t, k in keys.items()}
        self.keys, self.model, self.long_prompt = keys, model, long_prompt
        self.stats, self.deadline_at, self.duration_s, self.rng = stats, deadline_at, duration_s, rng
        self.redis_restarted = redis_restarted
        """() -> bool: whether Redis has come back from a kill -9 (auth failures are lost keys)."""

    def _in_tail(self) -> bool:
        return time.monotonic() - self.stats.started > TAIL * self.duration_s

    async def run(self) -> None:
        kinds = [(self.grpc_stream, 40), (self.http_chat, 20), (self.grpc_cancel, 10), (self.grpc_long, 10),
                 (self.grpc_tokenize, 8), (self.invalid, 7), (self.http_unary, 5)]
        while time.monotonic() < self.deadline_at:
            action = self.rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
            tenant = "a" if self.rng.random() < 0.7 else "b"
            self.stats.total += 1
            t0 = time.perf_counter()
            try:
                tokens = await action(tenant)
            except grpc.aio.AioRpcError as e:
                self.stats.error(f"grpc_{e.code().name}", self._in_tail(), self.redis_restarted())
                await asyncio.sleep(0.2)  # an erroring mesh is not hammered in a tight loop
                continue
            except Exception as e:  # noqa: BLE001 - every failure is counted by its kind
                import openai

                key = f"http_{e.status_code}" if isinstance(e, openai.APIStatusError) else f"http_{type(e).__name__}"
                self.stats.error(key, self._in_tail(), self.redis_restarted())
                await asyncio.sleep(0.2)
                continue
            if tokens is not None:
                self.stats.ok += 1
                self.stats.out_tokens += tokens
                self.stats.latencies_ms.append(1000 * (time.perf_counter() - t0))

    def _md(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)

    def _generate(self, text: str, max_tokens: int, **sampling):
        from llmesh.v1 import common_pb2, inference_pb2

        return inference_pb2.GenerateRequest(model=self.model, text=text, sampling=common_pb2.SamplingParams(
            max_tokens=max_tokens, **sampling))

    async def _stream(self, req, tenant: str) -> int:
        t0, n = time.perf_counter(), 0
        async for msg in self.stub.Generate(req, metadata=self._md(tenant), timeout=60):
            if n == 0 and msg.token_ids:
                self.stats.ttfts_ms.append(1000 * (time.perf_counter() - t0))
            n += len(msg.token_ids)
        return n

    async def grpc_stream(self, tenant: str) -> int:
        return await self._stream(self._generate(self.rng.choice(SHORT_PROMPTS), 16), tenant)

    async def grpc_long(self, tenant: str) -> int:
        return await self._stream(self._generate(self.long_prompt, 24, temperature=0.0), tenant)

    async def grpc_cancel(self, tenant: str) -> None:
        call = self.stub.Generate(self._generate(self.rng.choice(SHORT_PROMPTS), 64, ignore_eos=True),
                                  metadata=self._md(tenant), timeout=60)
        for _ in range(self.rng.randint(0, 3)):
            if await call.read() is grpc.aio.EOF:
                break
        call.cancel()
        self.stats.cancelled += 1

    async def grpc_tokenize(self, tenant: str) -> int:
        from llmesh.v1 import inference_pb2

        await self.stub.Tokenize(inference_pb2.TokenizeRequest(model=self.model, text=self.rng.choice(SHORT_PROMPTS)),
                                 metadata=self._md(tenant), timeout=30)
        return 0

    async def invalid(self, tenant: str) -> None:
        """A request that must be refused: INVALID_ARGUMENT (gRPC) or 400 (HTTP); anything
        else is an error of the mesh."""
        import openai

        if self.rng.random() < 0.5:
            try:
                await self._stream(self._generate("hi", 8, temperature=-1.0), tenant)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self.stats.invalid_refused += 1
                    return
                raise
        else:
            try:
                await self.sdk[tenant].chat.completions.create(model=self.model, messages=[], max_tokens=4)
            except openai.BadRequestError:
                self.stats.invalid_refused += 1
                return
        self.stats.invalid_wrong += 1
        return

    async def http_chat(self, tenant: str) -> int:
        stream = await self.sdk[tenant].chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": self.rng.choice(SHORT_PROMPTS)}],
            max_tokens=16, stream=True, stream_options={"include_usage": True})
        t0, first, n = time.perf_counter(), True, 0
        async for chunk in stream:
            if first and chunk.choices and chunk.choices[0].delta.content:
                self.stats.ttfts_ms.append(1000 * (time.perf_counter() - t0))
                first = False
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        return n

    async def http_unary(self, tenant: str) -> int:
        resp = await self.sdk[tenant].completions.create(model=self.model, prompt=self.rng.choice(SHORT_PROMPTS),
                                                         max_tokens=16)
        return resp.usage.completion_tokens

    async def close(self) -> None:
        await self.channel.close()
        for client in self.sdk.values():
            await client.close()


# ---- the run ----------------------------------------------------------------------------------

def wait_recovered(gateway: str, http_base: str, keys: dict[str, str], model: str, timeout_s: float) -> float:
    """Seconds until a gRPC stream (tenant a) and an HTTP chat completion (tenant b) both
    succeed again after the faults; raises TimeoutError past ``timeout_s``."""
    import openai

    from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    t0 = time.monotonic()
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway))
    sdk = openai.OpenAI(base_url=http_base, api_key=keys["b"], max_retries=0, timeout=30)
    last: Exception | None = None
    while time.monotonic() - t0 < timeout_s:
        try:
            list(stub.Generate(inference_pb2.GenerateRequest(model=model, text="hello", sampling=common_pb2.SamplingParams(
                max_tokens=4)), metadata=(("authorization", f"Bearer {keys['a']}"),), timeout=30))
            sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
            return time.monotonic() - t0
        except (grpc.RpcError, openai.OpenAIError) as e:
            last = e
            time.sleep(1.0)
    raise TimeoutError(f"the mesh did not serve again within {timeout_s:.0f}s of the last fault: {last}")


def rss_by_service(mesh: Mesh) -> dict[str, float]:
    return {name: tree_rss_mb(child.proc.pid) for name, child in mesh.children.items() if child.exited() is None}


def _long_prompt(stub, model: str, key: str, window: int) -> str:
    """Words filling about half the model's window (measured with its tokenizer)."""
    from llmesh.v1 import inference_pb2

    sample = " ".join(WORDS[i % len(WORDS)] for i in range(400))
    n = len(stub.Tokenize(inference_pb2.TokenizeRequest(model=model, text=sample),
                          metadata=(("authorization", f"Bearer {key}"),), timeout=30).token_ids)
    words = max(8, int(400 * min(window // 2, 1024) / max(1, n)))
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


@dataclasses.dataclass
class Outcome:
    """What the main-thread part of the run measured, read before the mesh stops."""
    traffic_s: float
    recovery_s: float
    leaked_kv_blocks: int
    rss_end: dict[str, float]
    dead: str | None
    restarts: dict[str, int]
    """Restarts the launcher made, by child."""


def soak(args: argparse.Namespace) -> dict:
    import redis
    from llmesh.gateway.keys import new_key, redis_put

    from llmesh.redis_url import with_password
    from llmesh.v1 import inference_pb2, inference_pb2_grpc

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="llmesh-soak-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    # The launcher writes the local admin key under XDG_CONFIG_HOME: keep it inside the run.
    os.environ["XDG_CONFIG_HOME"] = str(run_dir / "config")
    # A fresh data folder per run: the soak's Redis (its append-only file and password) is
    # never the user's, and no key of an earlier run is there to hide a lost one.
    data_dir = tempfile.mkdtemp(prefix="data-", dir=run_dir)
    cfg = UpConfig(models_file=args.models_file, gateway_port=free_port(), http_port=free_port(),
                   router_port=free_port(), prefix_cache_port=free_port(),
                   engine_base_port=free_port_base(range(ENGINE_PORTS)),
                   redis_port=free_port(), metrics_base_port=0, device="cpu", run_dir=str(run_dir),
                   data_dir=data_dir, auth=True)
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[soak {time.monotonic() - t_start:7.1f}s] {msg}", flush=True)

    records = {t: new_key(f"soak-tenant-{t}") for t in ("a", "b")}
    keys = {t: k for t, (k, _) in records.items()}

    with Mesh(cfg, quiet=True) as mesh:
        log(f"starting the mesh (logs in {run_dir}, Redis data in {data_dir})")
        mesh.start(timeout=600)
        # Registered once: Redis keeps them through its kills (append-only file).
        client = redis.Redis.from_url(with_password(cfg.host, cfg.redis_port, mesh.redis_password))
        for _, record in records.values():
            redis_put(client, record)
        client.close()
        gateway = f"{cfg.host}:{cfg.gateway_port}"
        http_base = f"http://{cfg.host}:{cfg.http_port}/v1"
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway))
        md = (("authorization", f"Bearer {keys['a']}"),)
        card = stub.ListModels(inference_pb2.ListModelsRequest(), metadata=md, timeout=30).models[0]
        long_prompt = _long_prompt(stub, card.name, keys["a"], card.max_model_len)
        rss_start = rss_by_service(mesh)
        log(f"mesh up: model {card.name} (window {card.max_model_len}); RSS MB "
            + ", ".join(f"{k} {v:.0f}" for k, v in rss_start.items()))
        stats = Stats()
        faults = Faults(mesh, gateway, keys, card.name, log)
        # On the main thread, like `llmesh up`: the launcher's restarts happen in this loop.
        out = asyncio.run(_run(args, mesh, gateway, http_base, keys, card.name, long_prompt, stats, faults, log))
    metrics: dict[str, float] = {
        "duration_s": round(out.traffic_s, 1), "requests_total_n": stats.total, "ok_n": stats.ok,
        "cancelled_n": stats.cancelled, "invalid_refused_n": stats.invalid_refused,
        "invalid_wrong_answer_n": stats.invalid_wrong, "errors_total_n": sum(stats.errors.values()),
        "errors_tail_n": stats.errors_tail, "leaked_kv_blocks_n": out.leaked_kv_blocks,
        "dead_services_n": int(out.dead is not None),
        "keys_lost_after_redis_restart_n": faults.keys_lost,
        "auth_errors_after_redis_restart_n": stats.auth_after_redis_restart,
        "throughput_req_s": stats.ok / out.traffic_s, "out_tok_s": stats.out_tokens / out.traffic_s,
        "latency_p50_ms": percentile(stats.latencies_ms, 50), "latency_p99_ms": percentile(stats.latencies_ms, 99),
        "ttft_p50_ms": percentile(stats.ttfts_ms, 50), "ttft_p99_ms": percentile(stats.ttfts_ms, 99),
        "engine_restart_max_s": max((s for name, took in faults.serving_again_s.items() if name.startswith("engine-")
                                     for s in took), default=0.0),
        "redis_restart_max_s": max(faults.serving_again_s.get("redis", []), default=0.0),
        "recovery_after_traffic_s": out.recovery_s,
    }
    metrics.update({f"errors_{k}_n": v for k, v in sorted(stats.errors.items())})
    metrics.update({f"fault_{k}_n": v for k, v in sorted(faults.counts.items())})
    metrics.update({f"launcher_restarts_{k.replace('-', '_')}_n": v for k, v in sorted(out.restarts.items())})
    for name in sorted(set(rss_start) | set(out.rss_end)):
        key = name.replace("-", "_")
        start, end = rss_start.get(name, 0.0), out.rss_end.get(name, 0.0)
        metrics.update({f"rss_{key}_start_mb": round(start, 1), f"rss_{key}_end_mb": round(end, 1),
                        f"rss_{key}_growth_mb": round(end - start, 1)})
    workload = {"duration_s": args.duration_s, "smoke": args.smoke, "concurrency": args.concurrency,
                "seed": args.seed, "model": card.name, "models_file": args.models_file or "demo",
                "mix": "grpc stream 40, http chat stream 20, grpc cancel 10, grpc long prompt 10, "
                       "grpc tokenize 8, invalid 7, http completion unary 5; tenants a 70% b 30%",
                "faults": [f"{t:.0f}s {n}" for t, n in faults.schedule(args.duration_s, args.smoke)],
                "engine_restarts": "launcher" if any(out.restarts.get(s.name) for s in faults.engines) else "none",
                "note": "every restart is the launcher's (Mesh.supervise on the soak's main thread); engine RSS "
                        "after a kill -9 is the restarted process's; Redis persists to an append-only file in a "
                        "temporary data folder, so the tenant keys are registered once and only checked after "
                        "its kill -9 (keys_lost_after_redis_restart_n)"}
    path = write_result(args.name, workload, metrics, results_dir=Path(args.results_dir) if args.results_dir else None)
    log(f"wrote {path}")
    if out.dead is not None:
        log(f"WARNING: {out.dead}")
    if faults.keys_lost or stats.auth_after_redis_restart:
        log(f"WARNING: tenant keys refused after the Redis restart ({faults.keys_lost} by the check, "
            f"{stats.auth_after_redis_restart} in traffic)")
    return metrics


async def _run(args, mesh: Mesh, gateway: str, http_base: str, keys: dict[str, str], model: str,
               long_prompt: str, stats: Stats, faults: Faults, log) -> Outcome:
    supervisor = asyncio.create_task(supervise(mesh, log))
    try:
        traffic_s = await _traffic_and_faults(args, gateway, http_base, keys, model, long_prompt, stats, faults,
                                              log, supervisor)
        log("traffic stopped; checking the mesh serves again, then draining")
        recovery_s = await asyncio.to_thread(wait_recovered, gateway, http_base, keys, model, 300)
        leaked = await asyncio.to_thread(drain, mesh)
        if supervisor.done():
            dead = supervisor.result()
        else:
            failed = mesh.failed()
            dead = f"{failed} exited and was not restarted" if failed else None
        return Outcome(traffic_s, recovery_s, leaked, rss_by_service(mesh), dead,
                       {name: child.tracker.restarts for name, child in mesh.children.items()})
    finally:
        supervisor.cancel()


async def _traffic_and_faults(args, gateway: str, http_base: str, keys: dict[str, str], model: str,
                              long_prompt: str, stats: Stats, faults: Faults, log, supervisor: asyncio.Task) -> float:
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    stats.started = t0
    end = t0 + args.duration_s
    clients = [Traffic(gateway, http_base, keys, model, long_prompt, stats, end, args.duration_s,
                       random.Random(rng.random()), lambda: faults.redis_restarted) for _ in range(args.concurrency)]

    async def run_faults() -> None:
        for at, name in faults.schedule(args.duration_s, args.smoke):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if supervisor.done():
                raise RuntimeError(f"no more faults: the launcher gave up ({supervisor.result()})")
            # A worker thread: a fault only kills and waits; the restart is the supervisor's.
            await asyncio.to_thread(faults.run, name, args.smoke)

    async def progress() -> None:
        while True:
            await asyncio.sleep(args.progress_s)
            el = time.monotonic() - t0
            log(f"{el:5.0f}/{args.duration_s:.0f}s: {stats.total} requests, {stats.ok} ok, "
                f"{sum(stats.errors.values())} errors {stats.errors or ''}, {stats.ok / el:.1f} req/s, "
                f"p50 {percentile(stats.latencies_ms[-500:], 50):.0f} ms")

    ticker = asyncio.create_task(progress())
    try:
        await asyncio.gather(run_faults(), *(c.run() for c in clients))
    finally:
        ticker.cancel()
        for c in clients:
            await c.close()
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration-s", type=float, default=1200.0, help="traffic duration (default 20 minutes)")
    p.add_argument("--smoke", action="store_true", help="a ~60 s run with fewer faults (CI)")
    p.add_argument("--models-file", default=None, help="models file (default: the demo model, as `llmesh up`)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-s", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--name", default="soak_cpu", help="result file name (without .json)")
    p.add_argument("--results-dir", default=None, help="default: bench/results")
    p.add_argument("--run-dir", default=None, help="logs of the mesh and its Redis data folder (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.smoke and "--duration-s" not in " ".join(argv if argv is not None else sys.argv):
        args.duration_s = 60.0
    metrics = soak(args)
    failed = ("leaked_kv_blocks_n", "dead_services_n", "keys_lost_after_redis_restart_n",
              "auth_errors_after_redis_restart_n")
    return 1 if any(metrics[k] for k in failed) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Routing benchmark: cache-aware replica choice vs round-robin, in a real mesh.

Each policy runs in a fresh mesh on this machine: redis-server, the prefix-cache index,
two engine processes serving a tiny random llama (CPU, float32) and the router with
``--policy cache_aware`` or ``--policy round_robin``. The workload is ``--prompts``
system prompts of ``--prompt-tokens`` random tokens, each followed by ``--questions``
questions of 16-48 random tokens, sent in one seeded random order through the router,
``--concurrency`` at a time, with ``--max-tokens`` greedy new tokens each.

Each replica's KV pool (``--num-kv-blocks``) holds fewer blocks than all the system
prompts together but the two pools together hold them all: the situation in which
routing decides the hit rate (with pools large enough for everything on every replica,
round-robin also ends up hitting after one miss per prompt and replica).

Measured per policy: prefix hit rate = sum(usage.cached_tokens) / sum(usage.prompt_tokens)
over all requests, and TTFT seen by the client (request sent → first token), mean and p90.
Then, against the real index service: ``Match`` latency for a 1,000-block chain held by
one replica (mean and p90 over ``--match-calls`` calls), and index memory per stored
block (Redis ``INFO memory`` used_memory before/after publishing ``--index-blocks``
blocks for one replica).

Prints the numbers and writes bench/results/routing.json. No assertion on speed.
Usage: python bench/routing.py [--questions 200] [--prompts 8] [--prompt-tokens 1024] ...
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: tests.* helpers

from llmesh.bench_results import write_result  # noqa: E402
from llmesh.prefix_hash import hash_prefix_blocks  # noqa: E402
from llmesh.v1 import common_pb2, prefix_index_pb2, prefix_index_pb2_grpc, router_pb2, router_pb2_grpc  # noqa: E402
from tests.fixtures.tiny_models import build_tiny_model  # noqa: E402
from tests.mesh_helpers import RedisServer, ServiceProcess, start_engine, start_prefix_index, wait_serving  # noqa: E402

MODEL = "tiny"
VOCAB = 512
BLOCK = 16


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def workload(args) -> list[list[int]]:
    """The prompts in send order: every (system prompt, question) pair, shuffled."""
    rng = random.Random(args.seed)
    systems = [[rng.randrange(3, VOCAB) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    prompts = [s + [rng.randrange(3, VOCAB) for _ in range(rng.randint(16, 48))]
               for s in systems for _ in range(args.questions)]
    rng.shuffle(prompts)
    return prompts


async def drive(address: str, prompts: list[list[int]], args) -> tuple[list[float], int, int]:
    """Send every prompt through the router; (TTFTs in ms, cached tokens, prompt tokens)."""
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts: list[float] = []
    totals = [0, 0]
    sampling = common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                t0 = time.perf_counter()
                first = None
                async for msg in stub.Generate(router_pb2.RouteRequest(model=MODEL, prompt_token_ids=prompt,
                                                                       sampling=sampling), timeout=120):
                    if first is None and msg.token_ids:
                        first = time.perf_counter() - t0
                    if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        totals[0] += msg.usage.cached_tokens
                        totals[1] += msg.usage.prompt_tokens
                ttfts.append(1000 * first)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return ttfts, totals[0], totals[1]


def run_policy(policy: str, model_dir: str, root: Path, prompts: list[list[int]], args) -> dict[str, float]:
    """One fresh mesh (empty caches, empty index) routing the whole workload with ``policy``."""
    with RedisServer() as redis_server, start_prefix_index(redis_server.url) as index:
        engine_args = ["--served-model-name", MODEL, "--num-kv-blocks", str(args.num_kv_blocks),
                       "--max-model-len", str(args.prompt_tokens + 64 + args.max_tokens),
                       "--prefix-index", index.address, "--heartbeat-interval-s", "1"]
        engines = [start_engine(model_dir, *engine_args, wait=False) for _ in range(2)]
        try:
            for e in engines:
                e.wait_ready()
            models_file = root / f"models-{policy}.yaml"
            models_file.write_text(yaml.safe_dump({"default_model": MODEL, "models": [
                {"name": MODEL, "path": model_dir, "size_class": "small", "replicas": 2,
                 "addresses": [e.address for e in engines]}]}))
            with ServiceProcess("llmesh.router.main", ["--models-file", str(models_file), "--prefix-index",
                                                       index.address, "--policy", policy,
                                                       "--startup-wait-s", "10"]) as router:
                wait_serving(router.address, timeout=15)
                t0 = time.perf_counter()
                ttfts, cached, total = asyncio.run(drive(router.address, prompts, args))
                wall = time.perf_counter() - t0
        finally:
            for e in engines:
                e.stop()
    print(f"{policy:>12}: hit rate {cached / total:.3f}  TTFT mean {statistics.fmean(ttfts):.1f} ms  "
          f"p90 {percentile(ttfts, 0.9):.1f} ms  ({len(ttfts)} requests in {wall:.1f} s)")
    return {"hit_rate": cached / total, "ttft_mean": statistics.fmean(ttfts), "ttft_p90": percentile(ttfts, 0.9),
            "wall": wall}


def chain(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return hash_prefix_blocks([rng.randrange(VOCAB) for _ in range(BLOCK * n)], BLOCK, MODEL)


def publish(stub, instance_id: str, hashes: list[int], per_batch: int = 1000) -> None:
    batches = [prefix_index_pb2.KVEventBatch(
        instance_id=instance_id, epoch=1, seq=i, namespace=MODEL, address="127.0.0.1:1",
        events=[prefix_index_pb2.KVEvent(stored=prefix_index_pb2.BlockStored(
            block_hashes=hashes[k:k + per_batch], block_size=BLOCK))])
        for i, k in enumerate(range(0, len(hashes), per_batch))]
    acks = list(stub.Publish(iter(batches), timeout=120))
    assert len(acks) == len(batches) and not any(a.resync_required for a in acks), acks


def index_numbers(args) -> dict[str, float]:
    """Match latency for 1,000 blocks and Redis bytes per stored block, on the real index."""
    with RedisServer() as redis_server, start_prefix_index(redis_server.url) as index:
        r = redis.Redis(port=redis_server.port)
        with grpc.insecure_channel(index.address) as ch:
            stub = prefix_index_pb2_grpc.PrefixIndexStub(ch)
            before = r.info("memory")["used_memory"]
            publish(stub, "mem-replica", chain(args.index_blocks, seed=1))
            after = r.info("memory")["used_memory"]
            bytes_per_block = (after - before) / args.index_blocks

            hashes = chain(1000, seed=2)
            publish(stub, "match-replica", hashes)
            req = prefix_index_pb2.MatchRequest(namespace=MODEL, block_hashes=hashes)
            for _ in range(5):
                stub.Match(req, timeout=10)
            times = []
            for _ in range(args.match_calls):
                t0 = time.perf_counter()
                resp = stub.Match(req, timeout=10)
                times.append(1000 * (time.perf_counter() - t0))
            assert [(m.instance_id, m.matched_blocks) for m in resp.replicas] == [("match-replica", 1000)], resp
    print(f"Match, 1000 blocks: mean {statistics.fmean(times):.2f} ms  p90 {percentile(times, 0.9):.2f} ms; "
          f"index memory {bytes_per_block:.0f} B per stored block ({args.index_blocks} blocks)")
    return {"match_1000_blocks_ms": statistics.fmean(times), "match_1000_blocks_p90_ms": percentile(times, 0.9),
            "index_bytes_per_block": bytes_per_block}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="distinct system prompts")
    ap.add_argument("--prompt-tokens", type=int, default=1024, help="tokens per system prompt")
    ap.add_argument("--questions", type=int, default=200, help="questions per system prompt")
    ap.add_argument("--max-tokens", type=int, default=2, help="new tokens per request")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--num-kv-blocks", type=int, default=320,
                    help="KV pool of each replica, in 16-token blocks (default: 5 of the 8 system prompts)")
    ap.add_argument("--match-calls", type=int, default=200)
    ap.add_argument("--index-blocks", type=int, default=20000, help="blocks stored for the memory measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="routing")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmesh-bench-routing-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model(str(root / "tiny-llama"), "llama", seed=0,
                                     max_position_embeddings=args.prompt_tokens + 128)
        prompts = workload(args)
        results = {p: run_policy(p, model_dir, root, prompts, args) for p in ("cache_aware", "round_robin")}
    index = index_numbers(args)

    ca, rr = results["cache_aware"], results["round_robin"]
    metrics = {
        "hit_rate_cache_aware_frac": ca["hit_rate"],
        "hit_rate_round_robin_frac": rr["hit_rate"],
        "ttft_mean_cache_aware_ms": ca["ttft_mean"],
        "ttft_mean_round_robin_ms": rr["ttft_mean"],
        "ttft_p90_cache_aware_ms": ca["ttft_p90"],
        "ttft_p90_round_robin_ms": rr["ttft_p90"],
        "wall_cache_aware_s": ca["wall"],
        "wall_round_robin_s": rr["wall"],
        **index,
    }
    workload_desc = {
        "model": "tiny random llama (2 layers, hidden 128, vocab 512), CPU float32, 2 engine processes",
        "system_prompts": args.prompts, "system_prompt_tokens": args.prompt_tokens,
        "questions_per_prompt": args.questions, "question_tokens": "16-48 random",
        "requests_per_policy": len(prompts), "max_tokens": args.max_tokens, "concurrency": args.concurrency,
        "kv_blocks_per_replica": args.num_kv_blocks, "block_size": BLOCK,
        "order": f"all (prompt, question) pairs shuffled with seed {args.seed}",
        "policies": "router --policy cache_aware vs --policy round_robin, each in a fresh mesh",
        "match_calls": args.match_calls, "match_chain_blocks": 1000, "index_blocks_for_memory": args.index_blocks,
        "scaled_down": args.questions != 200 or args.prompts != 8,
    }
    print("wrote", write_result(args.name, workload_desc, metrics))


if __name__ == "__main__":
    main()

"""How long tokenizing a large prompt stalls the gateway's event loop, by where it runs.

A ticker task on the loop sleeps 5 ms at a time and records the gaps between its wake-ups
while ``--concurrent`` prompts of ``--bytes`` UTF-8 bytes are tokenized:

* ``inline``: ``Tokenizer.encode`` on the loop (what the gateway did before);
* ``thread``: ``encode`` in a thread pool (the fast tokenizer holds the GIL in ``encode``);
* ``thread_batch``: ``encode_batch`` in a thread pool (releases the GIL in Rust, then builds
  the result under it);
* ``process``: the gateway's ``TokenizerPool`` (worker processes, packed results).

Metrics per mode: ``<mode>_max_gap_ms`` (the worst stall of every other stream) and
``<mode>_elapsed_s``. Writes bench/results/tokenize_offload_<device>.json.

    python bench/tokenize_offload.py [--model demo|PATH] [--bytes 1000000] [--concurrent 1] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import time

from llmesh.bench_results import write_result
from llmesh.engine.text.loading import load_tokenizer
from llmesh.gateway.tokenizers import ModelTokenizers, TokenizerPool

TEXT = "The quick brown fox jumps over the lazy dog. 1234 émigré ünïcode "


async def _stall(work) -> tuple[float, float]:
    """(worst loop gap in s, elapsed s) while ``await work()`` runs."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.05)
    done.set()
    await ticker
    return max(gaps), elapsed


async def _run(args) -> dict[str, float]:
    from llmesh.demo_model import find_demo_model

    tok = load_tokenizer(find_demo_model() if args.model == "demo" else args.model)
    text = (TEXT * (args.bytes // len(TEXT) + 1)).encode()[:args.bytes].decode("utf-8", "ignore")
    loop = asyncio.get_running_loop()
    threads = concurrent.futures.ThreadPoolExecutor(args.workers)
    pool = TokenizerPool(ModelTokenizers({"m": tok}), workers=args.workers, inline_bytes=0)
    pool.start()

    async def inline() -> None:
        for _ in range(args.concurrent):
            tok.encode(text)
            await asyncio.sleep(0)

    async def thread() -> None:
        await asyncio.gather(*(loop.run_in_executor(threads, tok.encode, text) for _ in range(args.concurrent)))

    def batch(t: str) -> list[int]:
        return tok.backend.encode_batch([t], add_special_tokens=False)[0].ids

    async def thread_batch() -> None:
        await asyncio.gather(*(loop.run_in_executor(threads, batch, text) for _ in range(args.concurrent)))

    async def process() -> None:
        await asyncio.gather(*(pool.encode(tok, "m", text) for _ in range(args.concurrent)))

    metrics: dict[str, float] = {}
    try:
        for name, work in (("inline", inline), ("thread", thread), ("thread_batch", thread_batch),
                           ("process", process)):
            gap, elapsed = await _stall(work)
            metrics[f"{name}_max_gap_ms"] = round(gap * 1000, 1)
            metrics[f"{name}_elapsed_s"] = round(elapsed, 3)
            print(f"{name:13s} max loop gap {gap * 1000:8.1f} ms   elapsed {elapsed:6.2f} s", flush=True)
    finally:
        pool.close()
        threads.shutdown()
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="'demo' or a model folder / .gguf whose tokenizer to use")
    ap.add_argument("--bytes", type=int, default=1_000_000, help="prompt size in UTF-8 bytes")
    ap.add_argument("--concurrent", type=int, default=1, help="prompts tokenized at once")
    ap.add_argument("--workers", type=int, default=2, help="threads / worker processes")
    ap.add_argument("--smoke", action="store_true", help="a 20 kB prompt, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.bytes = 20_000
    metrics = asyncio.run(_run(args))
    if not args.smoke:
        path = write_result("tokenize_offload_cpu", {"model": args.model, "bytes": args.bytes,
                                                     "concurrent": args.concurrent, "workers": args.workers},
                            metrics)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

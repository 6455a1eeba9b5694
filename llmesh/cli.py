"""The ``llmesh`` command.

``llmesh demo``   chat with the demo model (SmolLM2-135M-Instruct) in-process, streaming.
``llmesh offline --model PATH "prompt"``   one generation from any local model, in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid


def _build_async_engine(model: str | None, args: argparse.Namespace):
    from llmesh.engine import AsyncLLM, build_engine_config
    from llmesh.engine.loader import find_demo_model

    path = model or find_demo_model()
    print(f"loading {path} ...", file=sys.stderr)
    cfg = build_engine_config(path, device=args.device, dtype=args.dtype)
    return AsyncLLM(cfg)


async def _stream(engine, prompt_ids: list[int], max_tokens: int, temperature: float) -> None:
    from llmesh.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    t0 = time.perf_counter()
    ttft = None
    n = 0
    async for delta in engine.generate(prompt_ids, params, request_id=uuid.uuid4().hex):
        if delta.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        n += len(delta.token_ids)
        print(delta.text, end="", flush=True)
        if delta.finished and delta.error:
            print(f"\n[error] {delta.error}", file=sys.stderr)
    total = time.perf_counter() - t0
    rate = (n - 1) / (total - ttft) if ttft is not None and n > 1 and total > ttft else 0.0
    print(f"\n[{n} tokens, TTFT {1000 * (ttft or 0):.0f} ms, {rate:.1f} tok/s]", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    engine = _build_async_engine(args.model, args)
    try:
        history: list[dict] = []
        prompts = [args.prompt] if args.prompt else None
        while True:
            if prompts is not None:
                if not prompts:
                    return 0
                text = prompts.pop()
                print(f"> {text}")
            else:
                try:
                    text = input("> ")
                except EOFError:
                    return 0
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            ids = engine.tokenizer.encode_chat(history)
            asyncio.run(_stream(engine, ids, args.max_tokens, args.temperature))
            history.pop()  # keep turns independent: the demo model's window is small
    finally:
        engine.shutdown()


def _cmd_offline(args: argparse.Namespace) -> int:
    engine = _build_async_engine(args.model, args)
    try:
        ids = engine.tokenizer.encode(args.prompt)
        asyncio.run(_stream(engine, ids, args.max_tokens, args.temperature))
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="llmesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (("demo", _cmd_demo, "chat with the demo model in-process"),
                            ("offline", _cmd_offline, "generate from a local model in-process")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("prompt", nargs="?" if name == "demo" else None, help="the prompt")
        p.add_argument("--model", default=None, help="HF folder or .gguf file (default: the demo model)")
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

"""``llmesh generate`` and ``llmesh chat``: talk to a running gateway.

    llmesh generate "What is the capital of France?"   # through the chat template, if the model has one
    llmesh generate --raw "Once upon a time" --max-tokens 32
    llmesh chat                        # interactive; /reset clears the history, /exit quits
    llmesh chat --once "Hi there"

Tokens stream to stdout; a timing line goes to stderr at the end of each answer:
``[N tokens · TTFT 123 ms · 45.6 tok/s · model X · stop]``, ending with why the answer
stopped (stop: end of turn or a stop string; length: max_tokens or the window). A gRPC error prints as one line on
stderr (no traceback) and the command exits with status 1. The gateway address comes
from ``--address``, else ``LLMESH_ADDRESS``, else localhost:50051; the API key from
``LLMESH_API_KEY``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import grpc

from llmesh.client import DEFAULT_ADDRESS, Chunk, LlmeshClient

ADDRESS_ENV = "LLMESH_ADDRESS"


@dataclasses.dataclass
class StreamStats:
    """Timing of one streamed answer, as the client saw it."""

    tokens: int
    ttft_s: float | None
    total_s: float
    model: str
    finish_reason: str | None = None
    """Why the answer ended ("stop", "length", "abort", "error"); None if cut off."""

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first over the time after the first."""
        if self.ttft_s is None or self.tokens < 2 or self.total_s <= self.ttft_s:
            return 0.0
        return (self.tokens - 1) / (self.total_s - self.ttft_s)

    def line(self) -> str:
        ttft = f"{1000 * self.ttft_s:.0f} ms" if self.ttft_s is not None else "n/a"
        return (f"[{self.tokens} tokens · TTFT {ttft} · {self.tokens_per_s:.1f} tok/s · "
                f"model {self.model or '?'} · {self.finish_reason or 'interrupted'}]")


class LineTracker:
    """A text stream that remembers whether its cursor is at the start of a line, so an
    error or timing line never lands after half an answer."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.at_line_start = True

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.at_line_start = text.endswith("\n")

    def flush(self) -> None:
        self.out.flush()

    def end_line(self) -> None:
        if not self.at_line_start:
            self.write("\n")


def stream_to(chunks: Iterator[Chunk], out: TextIO | LineTracker) -> tuple[str, StreamStats]:
    """Write each chunk's text to ``out`` as it arrives; the whole text and its timing."""
    start = time.perf_counter()
    ttft = None
    tokens = 0
    model = ""
    finish_reason = None
    parts: list[str] = []
    try:
        for chunk in chunks:
            if chunk.token_ids and ttft is None:
                ttft = time.perf_counter() - start
            tokens += len(chunk.token_ids)
            model = chunk.model or model
            finish_reason = chunk.finish_reason or finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.text:
                parts.append(chunk.text)
                out.write(chunk.text)
                out.flush()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # cancels the call when the stream was interrupted
    return "".join(parts), StreamStats(tokens, ttft, time.perf_counter() - start, model, finish_reason)


def error_line(err: grpc.RpcError, address: str) -> str:
    """One line for a failed call: the status and the gateway's message."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    name = code.name if code is not None else "ERROR"
    hint = f" (is the gateway running at {address}?)" if code == grpc.StatusCode.UNAVAILABLE else ""
    return f"error: {name}: {(details or '').strip()}{hint}"


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    out = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
           "top_k": args.top_k, "seed": args.seed}
    if args.stop:
        out["stop"] = args.stop
    return {k: v for k, v in out.items() if v is not None}


def _client(args: argparse.Namespace) -> LlmeshClient:
    return LlmeshClient(args.address, timeout=args.timeout)


def uses_chat_template(client: LlmeshClient, model: str) -> bool:
    """Whether ``llmesh generate`` should send the prompt as one user message: the model
    named (or, for auto, every model the router may pick) has a chat template."""
    models = client.list_models()
    chosen = [m for m in models if model in ("auto", "", m.name)]
    return bool(chosen) and all(m.has_chat_template for m in chosen)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    out = LineTracker(sys.stdout)
    with _client(args) as client:
        try:
            if not args.raw and uses_chat_template(client, args.model):
                chunks = client.chat([{"role": "user", "content": prompt}], model=args.model, **_sampling(args))
            else:
                chunks = client.generate(prompt, model=args.model, **_sampling(args))
            _, stats = stream_to(chunks, out)
        except grpc.RpcError as e:
            out.end_line()
            print(error_line(e, args.address), file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            out.end_line()
            return 130
    out.end_line()
    print(stats.line(), file=sys.stderr, flush=True)
    return 0


def _chat_turn(client: LlmeshClient, args: argparse.Namespace, history: list[dict[str, str]]) -> bool:
    """One assistant answer to ``history``; appends it and returns True, or False on error."""
    out = LineTracker(sys.stdout)
    try:
        text, stats = stream_to(client.chat(history, model=args.model, **_sampling(args)), out)
    except grpc.RpcError as e:
        out.end_line()
        print(error_line(e, args.address), file=sys.stderr, flush=True)
        return False
    except KeyboardInterrupt:
        out.end_line()
        raise
    out.end_line()
    print(stats.line(), file=sys.stderr, flush=True)
    history.append({"role": "assistant", "content": text})
    return True


def cmd_chat(args: argparse.Namespace) -> int:
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    with _client(args) as client:
        if args.once is not None:
            history.append({"role": "user", "content": args.once})
            try:
                return 0 if _chat_turn(client, args, history) else 1
            except KeyboardInterrupt:
                return 130
        interactive = sys.stdin.isatty()
        if interactive:
            print("llmesh chat: /reset clears the conversation, /exit quits", file=sys.stderr)
        while True:
            try:
                text = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            command = text.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                del history[1 if args.system else 0:]
                continue
            history.append({"role": "user", "content": text})
            try:
                if not _chat_turn(client, args, history):
                    history.pop()
            except KeyboardInterrupt:
                history.pop()


def stream_chat_once(address: str, prompt: str, model: str = "auto", max_tokens: int = 64,
                     temperature: float = 0.0, timeout: float | None = 120.0) -> int:
    """Stream one chat answer to ``prompt`` (stdout) and its timing line (stderr), as
    ``llmesh chat --once`` does; returns the exit code (1 after a gRPC error)."""
    args = argparse.Namespace(address=address, model=model, max_tokens=max_tokens, temperature=temperature,
                              top_p=None, top_k=None, seed=None, stop=None, timeout=timeout)
    with _client(args) as client:
        return 0 if _chat_turn(client, args, [{"role": "user", "content": prompt}]) else 1


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="auto", help="model name from the gateway, or 'auto' (default)")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 for greedy (default: the model's, see ListModels; else 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--address", default=os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS),
                   help=f"gateway host:port (env {ADDRESS_ENV}; default {DEFAULT_ADDRESS})")
    p.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate`` and ``chat`` to the ``llmesh`` command (each sets ``fn``)."""
    gen = subparsers.add_parser("generate", help="stream a completion from a running gateway")
    gen.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    gen.add_argument("--raw", action="store_true",
                     help="send the text as a plain completion prompt (no chat template)")
    _common_flags(gen)
    gen.set_defaults(fn=cmd_generate)

    chat = subparsers.add_parser("chat", help="chat with a model through a running gateway")
    chat.add_argument("--once", default=None, metavar="MESSAGE", help="send one message, print the answer, exit")
    chat.add_argument("--system", default=None, help="system prompt at the start of the conversation")
    _common_flags(chat)
    chat.set_defaults(fn=cmd_chat)


def main(argv: list[str] | None = None) -> int:
    """``python -m llmesh.cli_client generate|chat ...`` (the same as ``llmesh generate|chat``)."""
    parser = argparse.ArgumentParser(prog="llmesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_client_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

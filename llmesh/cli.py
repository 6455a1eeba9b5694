"""The ``llmesh`` command.

``llmesh up``        start the whole mesh locally (Redis, index, engines, router, gateway)
``llmesh generate``  stream a completion from the gateway; ``llmesh chat`` talks to it
``llmesh demo``      chat with the demo model (SmolLM2-135M-Instruct) in-process, no mesh
``llmesh offline --model PATH "prompt"``   one generation from any local model, in-process
``llmesh certs``     a local CA, per-service certificates (mTLS) and the mesh secret
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


def _cmd_up(args: argparse.Namespace) -> int:
    from llmesh.launcher import UpConfig, up
    from llmesh.supervisor import RestartPolicy

    try:
        restart = RestartPolicy(backoff_s=args.restart_backoff_s, backoff_max_s=args.restart_backoff_max_s,
                                quick_s=args.restart_quick_s, max_quick_failures=args.max_quick_failures)
    except ValueError as e:
        print(f"llmesh up: {e}", file=sys.stderr)
        return 2
    cfg = UpConfig(models_file=args.models_file, host=args.host, gateway_port=args.gateway_port,
                   http_port=args.http_port, gateway_workers=args.gateway_workers,
                   router_port=args.router_port, prefix_cache_port=args.prefix_cache_port,
                   engine_base_port=args.engine_base_port, redis_port=args.redis_port,
                   metrics_base_port=args.metrics_base_port, device=args.device, run_dir=args.run_dir, auth=args.auth,
                   redis_server=args.redis_server, data_dir=args.data_dir, restart=restart)
    return up(cfg, prompt=args.prompt)


def _cmd_health(args: argparse.Namespace) -> int:
    from llmesh.health import wait_serving
    from llmesh.tls import channel_credentials

    tls = argparse.Namespace(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                             tls_client_cert=None, tls_client_key=None)
    try:
        wait_serving(args.address, timeout=args.timeout, service=args.service, credentials=channel_credentials(tls))
    except (TimeoutError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def _add_health(sub) -> None:
    p = sub.add_parser("health", help="exit 0 when a service reports SERVING (container health checks)")
    p.add_argument("address", help="host:port of any llmesh service")
    p.add_argument("--service", default="", help="one service's name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--tls-ca", default=None, help="PEM CA: check over TLS, verifying the service against it")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate, for a service requiring mTLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.set_defaults(fn=_cmd_health)


def _add_up(sub) -> None:
    from llmesh.launcher import UpConfig

    d = UpConfig()
    p = sub.add_parser("up", help="start the mesh locally with the demo model (or a models file)")
    p.add_argument("--models-file", default=None, help="YAML models file (default: the demo model)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--gateway-port", type=int, default=d.gateway_port)
    p.add_argument("--http-port", type=int, default=d.http_port,
                   help="the gateway's OpenAI-compatible HTTP port (0 turns it off)")
    p.add_argument("--gateway-workers", type=int, default=None,
                   help="gateway processes sharing its ports, for GPU token rates (default: "
                        "$LLMESH_GATEWAY_WORKERS, else 4 with --device cuda on 16 or more cores (a quarter "
                        "of the cores on fewer), 1 on the CPU; docs/operations.md \"Gateway workers\")")
    p.add_argument("--router-port", type=int, default=d.router_port)
    p.add_argument("--prefix-cache-port", type=int, default=d.prefix_cache_port)
    p.add_argument("--engine-base-port", type=int, default=d.engine_base_port)
    p.add_argument("--redis-port", type=int, default=d.redis_port)
    p.add_argument("--metrics-base-port", type=int, default=d.metrics_base_port, help="0 disables /metrics")
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto (engines)")
    p.add_argument("--run-dir", default=None, help="where logs go (default: a temporary folder)")
    p.add_argument("--data-dir", default=None,
                   help="what outlives the mesh: Redis's append-only file and password (default: "
                        "$LLMESH_DATA_DIR, else $XDG_DATA_HOME/llmesh or ~/.local/share/llmesh)")
    r = d.restart
    p.add_argument("--restart-backoff-s", type=float, default=r.backoff_s,
                   help="delay before restarting a crashed service; doubles per quick failure in a row")
    p.add_argument("--restart-backoff-max-s", type=float, default=r.backoff_max_s, help="cap of that delay")
    p.add_argument("--restart-quick-s", type=float, default=r.quick_s,
                   help="a service that exits sooner than this after starting failed 'quickly'")
    p.add_argument("--max-quick-failures", type=int, default=r.max_quick_failures,
                   help="give up (stop the mesh) after this many quick failures in a row of one service "
                        "(0: never)")
    p.add_argument("--redis-server", default=d.redis_server,
                   help="the redis-server program, name or path (default: $LLMESH_REDIS_SERVER or redis-server)")
    p.add_argument("--prompt", default=None, help="once up, stream an answer to this prompt through the gateway")
    p.add_argument("--no-auth", dest="auth", action="store_false",
                   help="serve without API keys (default: keys required; a local admin key is created)")
    p.set_defaults(fn=_cmd_up)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="llmesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_up(sub)
    _add_health(sub)
    from llmesh.cli_client import add_client_commands

    add_client_commands(sub)
    from llmesh.keys_cli import add_keys_commands

    add_keys_commands(sub)
    from llmesh.certs import add_certs_command

    add_certs_command(sub)
    from llmesh.bench.cli import add_bench_commands

    add_bench_commands(sub)
    from llmesh.eval_cli import add_eval_commands

    add_eval_commands(sub)
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

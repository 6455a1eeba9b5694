"""``llmesh keys create | list | revoke`` and ``llmesh usage``; the local admin key.

Keys live in the mesh's Redis (``--redis``, default the one ``llmesh up`` starts) or in a
keys file (``--keys-file``). ``create`` prints the key once: only its hash is stored.
``llmesh up`` keeps a local admin key in ``$XDG_CONFIG_HOME/llmesh/api_key`` (else
``~/.config/llmesh/api_key``), readable by the user only, and registers it in its Redis;
the CLI uses it when ``LLMESH_API_KEY`` is not set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
API_KEY_ENV = "LLMESH_API_KEY"
ADMIN_TENANT = "local-admin"


def local_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "llmesh" / "api_key"


def local_api_key() -> str | None:
    """The local admin key, if ``llmesh up`` created one."""
    try:
        return local_key_path().read_text().strip() or None
    except OSError:
        return None


def api_key_from_env_or_file() -> str | None:
    return os.environ.get(API_KEY_ENV) or local_api_key()


def ensure_local_key(pepper: str = ""):
    """(key, record) of the local admin key, creating the 0600 file on first use."""
    from llmesh.gateway.keys import KeyRecord, hash_key, new_key, parse_key

    path = local_key_path()
    key = local_api_key()
    if key is not None:
        try:
            key_id, _ = parse_key(key)
            return key, KeyRecord(key_id, hash_key(key, pepper), ADMIN_TENANT)
        except ValueError:
            pass  # a damaged file: replace it with a fresh key
    key, record = new_key(ADMIN_TENANT, pepper=pepper)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    return key, record


def default_redis_url() -> str:
    """``llmesh up``'s Redis: DEFAULT_REDIS with the password of the local data folder."""
    from llmesh.local_redis import LocalRedis, default_data_dir
    from llmesh.redis_url import with_password

    try:
        password = LocalRedis(default_data_dir()).password_file.read_text().strip()
    except OSError:
        return DEFAULT_REDIS
    return with_password("127.0.0.1", 6379, password)


def _write_key_file(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)


def _existing_key(args: argparse.Namespace):
    """--out FILE --if-missing: (key, record) when FILE already holds a key, else None."""
    from llmesh.gateway.keys import KeyFormatError, KeyRecord, hash_key, parse_key

    if not (args.out and args.if_missing):
        return None
    try:
        key = Path(args.out).read_text().strip()
        key_id, _ = parse_key(key)
    except (OSError, KeyFormatError):
        return None  # absent or damaged: create a fresh key
    return key, KeyRecord(key_id, hash_key(key, args.pepper), args.tenant, args.tier, None, args.rpm, args.tpm,
                          args.concurrency, response_cache=args.response_cache.strip().lower())


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def _cmd_create(args: argparse.Namespace) -> int:
    import time

    from llmesh.gateway.keys import (
        REDIS_PREFIX,
        load_keys_file,
        new_key,
        parse_models,
        redis_put,
        save_keys_file,
    )

    try:
        key, record = new_key(args.tenant, args.tier, parse_models(args.models), args.rpm, args.tpm,
                              args.concurrency, pepper=args.pepper, response_cache=args.response_cache)
    except ValueError as e:
        print(f"llmesh keys create: {e}", file=sys.stderr)
        return 2
    existing = _existing_key(args)
    if existing is not None:
        # Idempotent (compose's init runs at every `up`): keep the key; register it again only
        # if the store lost it.
        key, record = existing
        record.models, record.created = parse_models(args.models), time.time()
        present = (record.key_id in load_keys_file(args.keys_file) if args.keys_file
                   else bool(_redis(args.redis).exists(REDIS_PREFIX + record.key_id)))
        if present:
            print(f"key {record.key_id} in {args.out} exists; nothing to do", file=sys.stderr)
            return 0
    if args.keys_file:
        records = load_keys_file(args.keys_file)
        records[record.key_id] = record
        save_keys_file(args.keys_file, records)
    else:
        redis_put(_redis(args.redis), record)
    if args.out:
        _write_key_file(Path(args.out), key)
        print(f"key id {record.key_id} for tenant {record.tenant} ({record.tier}) written to {args.out} "
              "(mode 0600)", file=sys.stderr)
        return 0
    print(key)
    print(f"key id {record.key_id} for tenant {record.tenant} ({record.tier}); this is the only time the "
          "key is shown", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from llmesh.gateway.keys import load_keys_file, redis_list

    records = list(load_keys_file(args.keys_file).values()) if args.keys_file else redis_list(_redis(args.redis))
    if args.json:
        print(json.dumps([r.public() for r in records], indent=2))
        return 0
    print(f"{'ID':<14}{'TENANT':<16}{'TIER':<13}{'RPM':>7}{'TPM':>10}{'CONC':>6}  {'STATE':<8}{'CACHE':<10}MODELS")
    for r in records:
        models = "*" if r.models is None else ",".join(r.models)
        print(f"{r.key_id:<14}{r.tenant:<16}{r.tier:<13}{r.rpm:>7}{r.tpm:>10}{r.concurrency:>6}  "
              f"{'revoked' if r.revoked else 'active':<8}{r.response_cache or 'default':<10}{models}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    from llmesh.gateway.keys import load_keys_file, redis_revoke, save_keys_file

    if args.keys_file:
        records = load_keys_file(args.keys_file)
        found = args.key_id in records
        if found:
            records[args.key_id].revoked = True
            save_keys_file(args.keys_file, records)
    else:
        found = redis_revoke(_redis(args.redis), args.key_id)
    if not found:
        print(f"llmesh keys revoke: no key with id {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


def _cmd_usage(args: argparse.Namespace) -> int:
    from llmesh.gateway.usage_store import read_usage

    rows = read_usage(_redis(args.redis))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'TENANT':<16}{'KEY':<14}{'MODEL':<24}{'REQUESTS':>9}{'PROMPT':>10}{'CACHED':>10}{'COMPLETION':>11}")
    for r in rows:
        print(f"{r['tenant']:<16}{r['key_id']:<14}{r['model']:<24}{r['requests']:>9}{r['prompt_tokens']:>10}"
              f"{r['cached_tokens']:>10}{r['completion_tokens']:>11}")
    return 0


def _friendly(fn):
    """Run a command; an unreachable Redis or unreadable keys file is one line, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        from redis.exceptions import RedisError

        from llmesh.redis_url import redact

        try:
            return fn(args)
        except (RedisError, OSError, ValueError) as e:
            where = getattr(args, "keys_file", None) or redact(args.redis)
            print(f"llmesh {args.cmd}: cannot use {where}: {e}", file=sys.stderr)
            return 1

    return run


def _store_flags(p: argparse.ArgumentParser, keys_file: bool = True) -> None:
    p.add_argument("--redis", default=os.environ.get("LLMESH_REDIS_URL") or default_redis_url(),
                   help=f"Redis URL of the mesh (env LLMESH_REDIS_URL; default {DEFAULT_REDIS} with the "
                        "password `llmesh up` keeps in its data folder)")
    if keys_file:
        p.add_argument("--keys-file", default=None, help="use this keys file instead of Redis")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_keys_commands(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="manage API keys (create, list, revoke)")
    sub = keys.add_subparsers(dest="keys_cmd", required=True)
    p = sub.add_parser("create", help="create a key and print it once")
    p.add_argument("--tenant", required=True)
    p.add_argument("--tier", default="interactive", choices=["interactive", "batch"])
    p.add_argument("--models", default="*", help="'*' or a comma-separated list of model names")
    p.add_argument("--rpm", type=int, default=0, help="requests per minute (0 = unlimited)")
    p.add_argument("--tpm", type=int, default=0, help="tokens per minute (0 = unlimited)")
    p.add_argument("--concurrency", type=int, default=0, help="concurrent streams (0 = unlimited)")
    p.add_argument("--response-cache", default="", metavar="POLICY",
                   help="response cache policy of the key: 'off', 'on' or 'ttl=SECONDS' (default: the "
                        "gateway's --response-cache and its TTL); see docs/response-cache.md")
    p.add_argument("--pepper", default=os.environ.get("LLMESH_GATEWAY_KEY_PEPPER", ""),
                   help="the gateways' --key-pepper (env LLMESH_GATEWAY_KEY_PEPPER)")
    p.add_argument("--out", default=None, help="write the key to this file (mode 0600) instead of printing it")
    p.add_argument("--if-missing", action="store_true",
                   help="with --out: keep the key the file already holds (registering it again if the store "
                        "lost it) instead of creating another")
    _store_flags(p)
    p.set_defaults(fn=_friendly(_cmd_create))
    p = sub.add_parser("list", help="list keys (never their secrets)")
    _store_flags(p)
    p.set_defaults(fn=_friendly(_cmd_list))
    p = sub.add_parser("revoke", help="revoke a key by id (every gateway refuses it within a second)")
    p.add_argument("key_id")
    _store_flags(p)
    p.set_defaults(fn=_friendly(_cmd_revoke))
    p = subparsers.add_parser("usage", help="usage per key and model (requests, tokens)")
    _store_flags(p, keys_file=False)
    p.set_defaults(fn=_friendly(_cmd_usage))

"""API keys: their format, their hashed records, and where the records live.

A key looks like ``llm_<id>_<secret>``. Only ``sha256(pepper + key)`` is stored, next
to the key's id, so a lookup is by id and the comparison is one constant-time
``hmac.compare_digest`` of two digests; the key itself is shown once (at creation) and
never stored or logged. Records live in Redis (one hash per key id, so every gateway sees
a revocation on its next request) and/or in a keys file (JSON, also readable as YAML).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path

import yaml

from llmesh.gateway.response_cache.policy import parse_key_policy

KEY_PREFIX = "llm"
REDIS_PREFIX = "llmesh:apikey:"
TIERS = ("interactive", "batch")
_KEY_RE = re.compile(r"^llm_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")


class KeyFormatError(ValueError):
    """The presented string is not shaped like an llmesh API key."""


@dataclasses.dataclass
class KeyRecord:
    """What the gateway knows about one key (never the key itself)."""

    key_id: str
    key_hash: str
    tenant: str
    tier: str = "interactive"
    models: list[str] | None = None
    """Models the key may use; None means every model ("*")."""
    rpm: int = 0
    """Requests per minute; 0 means unlimited (likewise tpm and concurrency)."""
    tpm: int = 0
    concurrency: int = 0
    created: float = 0.0
    revoked: bool = False
    response_cache: str = ""
    """The key's response cache policy (``response_cache.policy``): "" follows the gateway,
    "off", "on" or "ttl=<seconds>"."""

    def to_redis(self) -> dict[str, str]:
        return {"key_id": self.key_id, "key_hash": self.key_hash, "tenant": self.tenant, "tier": self.tier,
                "models": json.dumps(self.models), "rpm": str(self.rpm), "tpm": str(self.tpm),
                "concurrency": str(self.concurrency), "created": str(self.created),
                "revoked": "1" if self.revoked else "0", "response_cache": self.response_cache}

    @classmethod
    def from_redis(cls, data: dict) -> KeyRecord:
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in data.items()}
        return cls(key_id=d["key_id"], key_hash=d["key_hash"], tenant=d.get("tenant", ""),
                   tier=d.get("tier", "interactive"), models=json.loads(d.get("models", "null")),
                   rpm=int(d.get("rpm", 0)), tpm=int(d.get("tpm", 0)), concurrency=int(d.get("concurrency", 0)),
                   created=float(d.get("created", 0)), revoked=d.get("revoked", "0") == "1",
                   response_cache=d.get("response_cache", ""))

    def public(self) -> dict:
        """The record without its hash (for ``llmesh keys list``)."""
        d = dataclasses.asdict(self)
        d.pop("key_hash")
        d["models"] = "*" if self.models is None else self.models
        return d


def parse_key(key: str) -> tuple[str, str]:
    """(key id, secret) of a well-formed key, else KeyFormatError (without echoing the key)."""
    m = _KEY_RE.match(key)
    if m is None:
        raise KeyFormatError("the API key is malformed: expected llm_<id>_<secret> as printed by "
                             "`llmesh keys create`")
    return m.group(1), m.group(2)


def hash_key(key: str, pepper: str = "") -> str:
    return hashlib.sha256((pepper + key).encode()).hexdigest()


def matches(record: KeyRecord, key: str, pepper: str = "") -> bool:
    """Constant-time check of a presented key against a record."""
    return hmac.compare_digest(record.key_hash.encode(), hash_key(key, pepper).encode())


def parse_models(text: str) -> list[str] | None:
    """``*`` → None (every model); else a comma-separated list of model names."""
    if text.strip() == "*":
        return None
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError("--models needs '*' or a comma-separated list of model names")
    return names


def new_key(tenant: str, tier: str = "interactive", models: list[str] | None = None, rpm: int = 0,
            tpm: int = 0, concurrency: int = 0, pepper: str = "",
            response_cache: str = "") -> tuple[str, KeyRecord]:
    """A fresh key and its record (the key is returned once, here)."""
    parse_key_policy(response_cache)  # ValueError naming the allowed values
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if min(rpm, tpm, concurrency) < 0:
        raise ValueError("limits must be >= 0 (0 means unlimited)")
    if not tenant.strip():
        raise ValueError("a key needs a tenant name (--tenant)")
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    return key, KeyRecord(key_id, hash_key(key, pepper), tenant, tier, models, rpm, tpm, concurrency,
                          created=time.time(), response_cache=response_cache.strip().lower())


# ---- the keys file -----------------------------------------------------------------------
def load_keys_file(path: str | Path) -> dict[str, KeyRecord]:
    """Records by key id from a keys file; a missing file has none."""
    p = Path(path)
    if not p.exists():
        return {}
    data = yaml.safe_load(p.read_text()) or {}
    records = [KeyRecord(**r) for r in data.get("keys", [])]
    return {r.key_id: r for r in records}


def save_keys_file(path: str | Path, records: dict[str, KeyRecord]) -> None:
    """Write atomically, readable by the owner only (the hashes are still secrets' digests)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"keys": [dataclasses.asdict(r) for r in records.values()]}, f, indent=2)
    os.replace(tmp, p)


class KeysFile:
    """A keys file re-read whenever it changes on disk (so a revocation is seen at once)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._records: dict[str, KeyRecord] = {}

    def get(self, key_id: str) -> KeyRecord | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._records = load_keys_file(self.path) if stamp else {}
            self._stamp = stamp
        return self._records.get(key_id)


# ---- Redis (synchronous: the CLI and the launcher) ------------------------------------------
def redis_put(client, record: KeyRecord) -> None:
    client.hset(REDIS_PREFIX + record.key_id, mapping=record.to_redis())


def redis_list(client) -> list[KeyRecord]:
    return sorted((KeyRecord.from_redis(client.hgetall(k)) for k in client.scan_iter(REDIS_PREFIX + "*")),
                  key=lambda r: r.created)


def redis_revoke(client, key_id: str) -> bool:
    name = REDIS_PREFIX + key_id
    if not client.exists(name):
        return False
    client.hset(name, "revoked", "1")
    return True

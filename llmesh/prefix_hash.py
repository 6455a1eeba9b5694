"""The one definition of a KV block's prefix hash, shared by engines and the router.

A full block of ``block_size`` tokens is identified by a 64-bit hash that chains:

* the parent block's hash (or the namespace's root hash for the first block),
* the block's token ids, packed as little-endian unsigned 32-bit integers,
* implicitly the namespace (model name + optional tenant salt), through the root.

Algorithm: BLAKE2b with an 8-byte digest, keyed by ``PREFIX_HASH_SEED`` so a deployment
can rotate it; the digest is read as a little-endian unsigned 64-bit integer. BLAKE2b is
in the standard library, is fast on short inputs, and unlike Python's ``hash()`` gives
the same answer in every process and on every machine, which the router and the
prefix-cache index rely on.

Two requests share a cached block only when their namespaces are equal *and* every
token before and inside the block is equal. A per-tenant salt therefore keeps tenants'
caches apart: they hash into disjoint chains. Only *full* blocks are hashed; the partial
tail of a prompt is never shared.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

PREFIX_HASH_ALGORITHM = "blake2b-64"
PREFIX_HASH_SEED = b"llmesh-prefix-v1"
"""Key of the keyed BLAKE2b; changing it invalidates every published block hash."""

DEFAULT_BLOCK_SIZE = 16


def namespace_root(model: str, salt: str | None = None) -> int:
    """Root hash of a namespace: the parent of the first block of every prompt."""
    h = hashlib.blake2b(digest_size=8, key=PREFIX_HASH_SEED, person=b"llmesh-ns")
    h.update(model.encode("utf-8"))
    h.update(b"\x00")
    if salt:
        h.update(salt.encode("utf-8"))
    return int.from_bytes(h.digest(), "little")


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block given its parent's hash (or the namespace root)."""
    h = hashlib.blake2b(digest_size=8, key=PREFIX_HASH_SEED, person=b"llmesh-blk")
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_prefix_blocks(
    token_ids: Sequence[int],
    block_size: int,
    model: str,
    salt: str | None = None,
    *,
    start_hashes: Sequence[int] = (),
) -> list[int]:
    """Chained hashes of every full block of ``token_ids``.

    ``start_hashes`` are hashes already computed for the leading blocks (an engine
    extends a request's chain as it grows); only the blocks after them are hashed.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes = list(start_hashes)
    parent = hashes[-1] if hashes else namespace_root(model, salt)
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes

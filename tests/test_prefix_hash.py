"""The shared prefix block hash: stable across processes, chained, namespaced."""

from __future__ import annotations

import subprocess
import sys

from llmesh.prefix_hash import hash_block, hash_prefix_blocks, namespace_root


def test_only_full_blocks_are_hashed_and_chained():
    toks = list(range(50))
    hs = hash_prefix_blocks(toks, 16, "m")
    assert len(hs) == 3
    assert hs[0] == hash_block(namespace_root("m"), toks[:16])
    assert hs[2] == hash_block(hs[1], toks[32:48])
    assert hash_prefix_blocks(toks, 16, "m", start_hashes=hs[:2]) == hs


def test_equal_prefixes_share_and_divergence_propagates():
    a = list(range(64))
    b = a[:40] + [999] + a[41:]
    ha, hb = hash_prefix_blocks(a, 16, "m"), hash_prefix_blocks(b, 16, "m")
    assert ha[:2] == hb[:2] and ha[2] != hb[2] and ha[3] != hb[3]


def test_namespace_and_salt_separate_caches():
    toks = list(range(32))
    base = hash_prefix_blocks(toks, 16, "m")
    assert hash_prefix_blocks(toks, 16, "other-model") != base
    assert hash_prefix_blocks(toks, 16, "m", salt="tenant-a") != base
    assert hash_prefix_blocks(toks, 16, "m", salt="tenant-a") != hash_prefix_blocks(toks, 16, "m", salt="tenant-b")


def test_same_value_in_a_fresh_process():
    code = "from llmesh.prefix_hash import hash_prefix_blocks as h; print(h(list(range(40)), 16, 'm', 's'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str(hash_prefix_blocks(list(range(40)), 16, "m", "s"))

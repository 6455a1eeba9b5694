"""The decode attention's partition size and tile rules (llmesh/kernels/attention_config.py)."""

from __future__ import annotations

import pytest
import torch

from llmesh.kernels.attention_config import (DEFAULT_PAGED_DECODE_TILE, PAGED_DECODE_TILE,
                                             _INTERPRET_PAGED_DECODE_TILE, PagedDecodeTile, paged_decode_tile, pick_tile,
                                             DECODE_PARTITION, DEFAULT_DECODE_PARTITION, FOLD_ENV, FOLD_MIN_PAIRS,
                                             MAX_DECODE_PARTITIONS, SINGLE_PARTITION_MAX_LEN, SINGLE_PARTITION_PAIRS,
                                             PARTITION_ENV, decode_fold, decode_partition_size, pick_partition)


def test_the_smallest_bucket_at_or_above_the_pairs_decides():
    table = {8: 64, 64: 128, 256: 512}
    assert pick_partition(table, 1, 2048) == 64
    assert pick_partition(table, 8, 2048) == 64
    assert pick_partition(table, 9, 2048) == 128
    assert pick_partition(table, 256, 2048) == 512
    assert pick_partition(table, 512, 8192) == 512
    assert pick_partition(table, 4096, 8192) == DEFAULT_DECODE_PARTITION  # past the table
    assert pick_partition({}, 1, 2048) == DEFAULT_DECODE_PARTITION


def test_a_batch_that_fills_the_gpu_runs_one_partition_per_sequence():
    table = {8: 64, 256: 512}
    many = SINGLE_PARTITION_PAIRS
    assert pick_partition(table, many, 2048) == 2048  # one partition: no reduce kernel
    assert pick_partition(table, many, 1500) == 2048  # a power of two covering the bound
    assert pick_partition(table, many, 100) == DEFAULT_DECODE_PARTITION
    assert pick_partition({}, many, SINGLE_PARTITION_MAX_LEN) == SINGLE_PARTITION_MAX_LEN
    # a longer bound keeps the split: one program must not walk a very long context alone
    assert pick_partition(table, many, SINGLE_PARTITION_MAX_LEN + 1) == DEFAULT_DECODE_PARTITION
    assert pick_partition(table, many - 1, 2048) == DEFAULT_DECODE_PARTITION


def test_a_long_maximum_length_raises_the_size_until_the_partitions_fit():
    table = {8: 64}
    assert pick_partition(table, 8, 64 * MAX_DECODE_PARTITIONS) == 64
    assert pick_partition(table, 8, 64 * MAX_DECODE_PARTITIONS + 1) == 128
    assert pick_partition(table, 8, 32768) == 512
    # past 64 partitions of the default the launch is the one without a table: never above 512
    assert pick_partition(table, 8, 131072) == DEFAULT_DECODE_PARTITION
    assert pick_partition({}, 8, 131072) == DEFAULT_DECODE_PARTITION
    assert pick_partition({8: 512}, 8, 16) == 512  # never below the table's size


def test_every_shipped_size_is_a_power_of_two_the_kernel_takes():
    for table in DECODE_PARTITION.values():
        assert all(s >= 16 and s & (s - 1) == 0 for s in table.values())


def test_cpu_keeps_the_default(monkeypatch):
    monkeypatch.delenv(PARTITION_ENV, raising=False)
    assert decode_partition_size(torch.device("cpu"), 1, 2048) == DEFAULT_DECODE_PARTITION


def test_the_ab_switch_forces_one_size_and_refuses_what_the_kernel_cannot_take(monkeypatch):
    monkeypatch.setenv(PARTITION_ENV, "64")
    assert decode_partition_size(torch.device("cpu"), 1, 2048) == 64
    assert decode_partition_size(torch.device("cpu"), SINGLE_PARTITION_PAIRS, 2048) == 64
    for bad in ("48", "8", "0", "-64", "big"):
        monkeypatch.setenv(PARTITION_ENV, bad)
        with pytest.raises(ValueError, match=PARTITION_ENV):
            decode_partition_size(torch.device("cpu"), 1, 2048)
    monkeypatch.setenv(PARTITION_ENV, " ")
    assert decode_partition_size(torch.device("cpu"), 1, 2048) == DEFAULT_DECODE_PARTITION


def test_the_fold_runs_from_its_measured_pair_count(monkeypatch):
    monkeypatch.delenv(FOLD_ENV, raising=False)
    assert not decode_fold(8)  # batch 1 of 8 KV heads: the reduce kernel measured faster
    assert not decode_fold(FOLD_MIN_PAIRS - 1)
    assert decode_fold(FOLD_MIN_PAIRS)
    monkeypatch.setenv(FOLD_ENV, "0")  # the A/B switch, both ways
    assert not decode_fold(FOLD_MIN_PAIRS)
    monkeypatch.setenv(FOLD_ENV, "1")
    assert decode_fold(8)
    monkeypatch.setenv(FOLD_ENV, "auto")
    assert not decode_fold(8) and decode_fold(FOLD_MIN_PAIRS)


def test_the_decode_tile_comes_from_its_pairs_bucket():
    a, b = PagedDecodeTile(128, 4, 2), PagedDecodeTile(64, 2, 3)
    table = {256: a, 1024: b}
    assert pick_tile(table, 128) == DEFAULT_PAGED_DECODE_TILE  # at most half the smallest bucket: not timed
    assert pick_tile(table, 129) == a and pick_tile(table, 256) == a
    assert pick_tile(table, 257) == b and pick_tile(table, 4096) == b  # past the largest: the largest
    assert pick_tile({}, 512) == DEFAULT_PAGED_DECODE_TILE


def test_every_shipped_decode_tile_fits_the_kernel():
    for table in PAGED_DECODE_TILE.values():
        for tile in table.values():
            assert tile.block_n >= 16 and tile.block_n & (tile.block_n - 1) == 0
            assert tile.num_warps in (1, 2, 4, 8) and tile.num_stages >= 1
            # K and V tiles of every stage in shared memory at head_dim 128, 16 bits: under the 227 KB
            assert 2 * tile.block_n * 128 * 2 * tile.num_stages <= 227 * 1024
    assert paged_decode_tile("cpu", 4096) in (DEFAULT_PAGED_DECODE_TILE, _INTERPRET_PAGED_DECODE_TILE)


def test_fp8_pools_look_up_their_own_tiles():
    """An FP8 pool's tile comes from the "<dev>:fp8" table, a 16-bit pool's never does."""
    import torch

    from llmesh.kernels import attention_config

    if not torch.cuda.is_available():
        # the lookup itself, off the GPU: the shipped tables differ where both have a bucket
        fp8, bf16 = PAGED_DECODE_TILE["h200:fp8"], PAGED_DECODE_TILE["h200"]
        assert pick_tile(fp8, 2048) != pick_tile(bf16, 2048)
        return
    tag = attention_config.cuda_device_tag(torch.device("cuda"))
    for pairs in (64, 512, 2048):
        want = pick_tile(PAGED_DECODE_TILE.get(tag + ":fp8", {}), pairs)
        assert paged_decode_tile("cuda", pairs, fp8=True) == want
        assert paged_decode_tile("cuda", pairs) == pick_tile(PAGED_DECODE_TILE.get(tag, {}), pairs)


def test_the_long_query_tile_of_mixed_steps_falls_back_to_prefill(monkeypatch):
    """unified_attention's long-query launch takes UNIFIED_LONG's entry for the device where a
    sweep measured one, else PREFILL's (and the interpreter's small tile under TRITON_INTERPRET)."""
    from llmesh.kernels import attention_config

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_config.unified_long_config(128, torch.device("cpu")) == attention_config.prefill_config(128)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for d in (64, 128, 256):
        assert attention_config.unified_long_config(d, torch.device("cpu")) == attention_config.PREFILL[d]

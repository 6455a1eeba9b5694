"""The decode attention's partition size rule (kernels/attention_config.py)."""

from __future__ import annotations

import torch

from llmesh.kernels.attention_config import (DECODE_PARTITION, DEFAULT_DECODE_PARTITION, MAX_DECODE_PARTITIONS,
                                             decode_partition_size, pick_partition)


def test_the_smallest_bucket_at_or_above_the_pairs_decides():
    table = {8: 64, 64: 128, 256: 512}
    assert pick_partition(table, 1, 2048) == 64
    assert pick_partition(table, 8, 2048) == 64
    assert pick_partition(table, 9, 2048) == 128
    assert pick_partition(table, 256, 2048) == 512
    assert pick_partition(table, 4096, 2048) == DEFAULT_DECODE_PARTITION  # past the table
    assert pick_partition({}, 1, 2048) == DEFAULT_DECODE_PARTITION


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


def test_cpu_keeps_the_default():
    assert decode_partition_size(torch.device("cpu"), 1, 2048) == DEFAULT_DECODE_PARTITION

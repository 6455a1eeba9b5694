"""Kernel tests run on a CUDA device when there is one, otherwise on the CPU through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET before anything imports Triton; it is
set here too for runs of this folder alone)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def fp8_device(device) -> torch.device:
    """The test device for FP8 kernels: a GPU without FP8 (compute capability < 8.9) skips, the
    CPU runs them through the interpreter."""
    if device.type == "cuda":
        from llmesh.kernels.fp8_gemm import fp8_support

        if (why := fp8_support(device)) is not None:
            pytest.skip(why)
    return device


@pytest.fixture
def forbid(monkeypatch):
    """forbid(module, name): launching the @triton.jit kernel ``module.name`` fails the test, to
    show that a wrapper took another path (the int32-word kernel instead of the byte one)."""
    def _forbid(module, name: str, patch=monkeypatch) -> None:
        class Forbidden:
            def __getitem__(self, grid):
                raise AssertionError(f"{name} ran where another kernel should have")

        patch.setattr(module, name, Forbidden())

    return _forbid


class PagedKV:
    """A random paged KV pool holding given contexts, in two copies.

    `k_cache`/`v_cache` (on the test device) hold NaN in every slot no context owns and in the
    block that pads the tables, so a kernel that reads past a context or a table poisons its
    output; `k_ref`/`v_ref` (CPU) hold random finite values there, for references that gather
    whole tables and mask afterwards.
    """

    def __init__(self, ctx_lens, h_kv, d, block_size, dtype, gen, device, table_dtype=torch.int64, pad_blocks=2):
        need = [-(-n // block_size) for n in ctx_lens]
        num_blocks = sum(need) + 3  # the padding block and two never used
        order = torch.randperm(num_blocks, generator=gen).tolist()
        pad_block = order.pop()
        self.k_ref = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(dtype)
        self.v_ref = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(dtype)
        owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        width = max(need, default=0) + pad_blocks
        tables = []
        for n, nb in zip(ctx_lens, need):
            table = [order.pop() for _ in range(nb)]
            for p in range(n):
                owned[table[p // block_size], p % block_size] = True
            tables.append(table + [pad_block] * (width - nb))
        self.block_tables = torch.tensor(tables, dtype=table_dtype).reshape(len(ctx_lens), width)
        poison = ~owned[:, :, None, None]
        self.k_cache = self.k_ref.masked_fill(poison, float("nan")).to(device)
        self.v_cache = self.v_ref.masked_fill(poison, float("nan")).to(device)
        self.seq_lens = torch.tensor(ctx_lens, dtype=torch.int32)
        self.device = device


@pytest.fixture
def paged_kv(device):
    def make(ctx_lens, h_kv, d, block_size, dtype, gen, **kw):
        return PagedKV(ctx_lens, h_kv, d, block_size, dtype, gen, device, **kw)
    return make


@pytest.fixture
def int4_weight():
    """int4_weight(k, n, group, generator): a random Int4Weight (codes 0..15, scales 0.005-0.025,
    mins down to -0.15: Q4_1's w = q * s + m) for the INT4 kernels' tests."""
    from llmesh.engine.quant.packed import pack_int4

    def make(k: int, n: int, g: int, gen: torch.Generator):
        q = torch.randint(0, 16, (k, n), generator=gen)
        groups = -(-k // g)
        scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.005
        mins = -torch.rand(groups, n, generator=gen) * 0.15
        return pack_int4(q, scales, mins, g, fmt="q4_1")

    return make

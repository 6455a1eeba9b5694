"""Input checks and launch choices shared by the Triton kernel wrappers.

A Triton kernel handed a wrong shape, dtype or stride reads and writes out of bounds without
a word, so every wrapper checks its arguments first and raises a ValueError that names the
argument and what was expected. This module does not import Triton.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@functools.lru_cache(maxsize=16)
def _cuda_tag(index: int) -> str:
    from llmesh.bench_results import device_tag

    return device_tag(torch.device("cuda", index))


def cuda_device_tag(device: torch.device) -> str:
    """The key of the measured tables for a CUDA device (h200, h100, ...), cached: the name
    query is slow, and not allowed while a CUDA graph is captured."""
    return _cuda_tag(device.index if device.index is not None else torch.cuda.current_device())


def measured_bucket(tables: dict, device: torch.device, size: int):
    """A per-device measured table's entry for ``size``: {device tag: {largest size of a bucket:
    entry}}, the smallest bucket holding it (the largest past them), or None where the device has
    no table (the CPU, the interpreter, an unmeasured GPU)."""
    table = tables.get(cuda_device_tag(device)) if device.type == "cuda" and not interpreting() else None
    return bucket_entry(table, size) if table else None


def bucket_entry(table: dict, size: int):
    """{largest size of a bucket: entry}'s entry for ``size``: the smallest bucket holding it, the
    largest bucket's past them all."""
    return next((table[bound] for bound in sorted(table) if size <= bound), table[max(table)])


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


PDL_ENV = "LLMESH_PDL"
"""Set to 0 to launch every kernel in stream order, without programmatic dependent launch."""


@functools.lru_cache(maxsize=16)
def _pdl_capable(index: int) -> bool:
    # ROCm builds report MI200/MI300 as 9.x too; Triton's AMD backend has no launch_pdl option
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


@contextlib.contextmanager
def pdl_off():
    """Kernels launched inside are launched plainly (benchmarks: what PDL buys). A CUDA graph
    captured inside keeps its plain launches."""
    before = os.environ.get(PDL_ENV)
    os.environ[PDL_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PDL_ENV, None)
        else:
            os.environ[PDL_ENV] = before


PDL_LATE_ENV = "LLMESH_PDL_LATE"


def pdl_late() -> bool:
    """Whether the skinny GEMVs let their dependents launch after their main loop rather than
    at their start (triton_helpers.pdl_wait / pdl_release). On by default: a GEMV's programs
    fill the GPU, and a dependent attention kernel let in at their start sits on the SMs they
    stream the weights with (bench/README.md, kernel_profile.py's A/B). LLMESH_PDL_LATE=0 lets
    them in at the start, as every other PDL kernel does."""
    return os.environ.get(PDL_LATE_ENV, "1").strip() != "0"


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Launch arguments for a kernel that starts with `triton_helpers.pdl_enter(PDL)`.

    On Hopper and later a kernel can be launched with programmatic dependent launch (PDL): its
    programs become resident while the previous kernel in the stream drains, and wait on the
    device (griddepcontrol.wait) for it to finish and flush its writes, instead of the host
    launch path waiting for it. A decode step is ~300 kernels of a few microseconds each, so
    the launch gap between two of them is a measurable share of the step
    (bench/kernel_profile.py). Every kernel launched this way must wait before it touches
    global memory; `pdl_enter` at the top of the kernel does, and returns at once without PDL.
    Off under the interpreter, on CPUs and pre-Hopper GPUs, and with LLMESH_PDL=0.
    """
    if (device.type != "cuda" or interpreting() or os.environ.get(PDL_ENV, "1").strip() == "0"
            or not _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


INTERPRET_FP16_DOTS = "LLMESH_INTERPRET_FP16_DOTS"
"""Set to 1 (tests only) to run float16 kernels' 16-bit branches under the interpreter."""


ARRIVAL_SLOTS = 1 << 16
"""Arrival counters per (kernel, device, stream)."""

_arrival: dict[tuple, torch.Tensor] = {}


def arrival_counters(kernel: str, device: torch.device, needed: int, slots: int = ARRIVAL_SLOTS) -> torch.Tensor:
    """Zeroed int32 counters for a kernel whose programs count their arrivals so that the last
    one combines the others' partial results (split-K with no second launch). Each launch must
    leave every counter it used at zero (the last arrival resets its own); one buffer of
    ``slots`` counters per kernel, device and stream (a kernel always asks for the same size), so
    that launches on other streams cannot interleave, and the same buffer each time, which a
    CUDA graph can capture."""
    if needed > slots:
        raise ValueError(f"{kernel}: {needed} arrival counters needed, {slots} exist; "
                         f"launch fewer split tiles")
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (kernel, device.type, device.index, stream)
    buf = _arrival.get(key)
    if buf is None:
        buf = _arrival[key] = torch.zeros(slots, dtype=torch.int32, device=device)
    return buf


def tma_descriptor(t: torch.Tensor, block: list[int]):
    """A host-built TMA descriptor over the 2-D tensor ``t`` with tiles of ``block``, or None
    where TMA cannot read it: a last stride other than 1, a base or row stride not 16-byte
    aligned, or a GPU older than Hopper (the interpreter runs descriptors too). A kernel given
    one loads tiles with ``desc.load([row, col])``; the copy fills what lies past ``t``'s edges
    with zeros. Triton encodes it at each launch, and a CUDA graph keeps what its capture
    encoded, so ``t`` must stay where it is while a graph holds it (weights, static buffers)."""
    if t.dim() != 2 or t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        return None
    if not interpreting() and not (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands are upcast to float32 for inputs of this dtype.

    Float32 inputs stay float32 (with IEEE precision, see `dot_precision`). Under the
    interpreter every operand is upcast: it stores bfloat16 as raw uint16 and multiplies the
    bit patterns (triton-lang/triton#11584), so a bfloat16 tl.dot there is garbage. Float16 it
    multiplies correctly (exact products, float32 sums, as a GPU's dot units), so with
    INTERPRET_FP16_DOTS=1 float16 inputs take the GPU's 16-bit branches there too, which lets a
    CPU test catch what those branches round (a kernel that also runs bfloat16 dots inside such
    a branch emulates them under the interpreter).
    """
    if dtype == torch.float32:
        return True
    if not interpreting():
        return False
    return not (dtype == torch.float16 and os.environ.get(INTERPRET_FP16_DOTS, "0") == "1")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: IEEE for float32 inputs, so a float32 model agrees with the torch
    backend (which does not use TF32); the default for 16-bit inputs, where it has no effect."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_tensor(
    name: str,
    t: object,
    layout: str,
    ndim: int,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> None:
    """`t` is a tensor of `ndim` dims (described by `layout`, e.g. "[T, H, D]") of one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other inputs are on {device}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """The kernels address the innermost dimension as consecutive elements."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_size(name: str, dim: str, got: int, expected: int, because: str) -> None:
    if got != expected:
        raise ValueError(f"{name} has {dim}={got}, expected {expected} ({because})")


def check_out(name: str, out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device, contiguous: bool = False) -> torch.Tensor:
    """Return `out` after checking it can hold the result, or a new tensor when it is None.

    `contiguous` is for wrappers that flatten `out` into rows with a view.
    """
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {got}")
    if out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be {dtype} on {device}, got {out.dtype} on {out.device}")
    if contiguous and not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {out.stride()}")
    check_last_dim_contiguous(name, out)
    return out


def check_paged_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor, num_seqs: int) -> tuple[int, int, int]:
    """Shared checks of the paged attention wrappers; returns (block_size, H_kv, D)."""
    device = q.device
    # q's dtype, or an FP8 pool (llmesh/kernels/kv_quant.py) whose scales the caller checks
    check_tensor("k_cache", k_cache, "[num_blocks, block_size, H_kv, D]", 4, (q.dtype, torch.float8_e4m3fn),
                 device=device)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or v_cache.device != device:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} on {device}")
    _, block_size, h_kv, d = k_cache.shape
    h_q = q.shape[1]
    check_size("q", "D", q.shape[2], d, "the pool's head_dim")
    if not 16 <= d <= 256:
        raise ValueError(f"head_dim must be in 16..256, got {d}")
    if h_q % h_kv:
        raise ValueError(f"q has {h_q} heads, not a multiple of the pool's {h_kv} KV heads")
    check_tensor("block_tables", block_tables, "[S, max_blocks]", 2, INDEX_DTYPES, device=device)
    check_size("block_tables", "S", block_tables.shape[0], num_seqs, "one table per sequence")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        check_last_dim_contiguous(name, t)
    return block_size, h_kv, d

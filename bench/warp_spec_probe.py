"""Whether this Triton's automatic warp specialization (`tl.range(..., warp_specialize=True)`)
partitions a Hopper GEMM loop, compiled for sm90 on the CPU (no GPU needed).

Warp specialization is what CUTLASS's grouped GEMMs and FlashAttention-3 have beyond our
software-pipelined loops: a producer warp group issues the loads while the others run the MMAs.
Two loops, each at 4 and 8 warps: `tma`, both operands through TMA descriptors, and `gather`,
the A rows gathered through a row index with plain loads (how the fused MoE kernel and the paged
attention kernels read their rows; Hopper's TMA has no row gather). For each the report says
whether the compiled TTGIR holds a `ttg.warp_specialize` region (partitioned), only the loop's
`tt.warp_specialize` attribute (the pass declined), or the compiler failed.

Measured with Triton 3.6 (the GPU image's; session 39): `tma` is partitioned at 4 warps and
declined at 8; `gather` fails to compile at 4 warps and is declined at 8. So the fused MoE kernel's
gathered rows cannot be warp-specialized; its down GEMM in the sorted hidden layout reads whole
tiles through TMA and can (MoEConfig.warp_spec, docs/moe.md). With Triton 3.9 (session 43) these
two loops come out the same, but that down GEMM (host-built descriptors) fails the pass at 128-row
tiles with 4 warps and is partitioned at 64 (tests/kernels/test_hopper_compile.py).

Usage: python bench/warp_spec_probe.py   (prints one line per loop and warp count; no result file:
it measures the compiler, not the device)
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton.jit runs: compiled kernels, not interpreted ones

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@triton.jit
def _loop(a_ptr, b_ptr, c_ptr, rows_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          GATHER: tl.constexpr):
    """c[BM, BN] tile = a @ b^T with b through TMA; a through TMA or gathered by rows_ptr."""
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = tl.load(rows_ptr + pid_m * BM + tl.arange(0, BM))
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in tl.range(0, tl.cdiv(K, BK), warp_specialize=True):
        if GATHER:
            a = tl.load(a_ptr + rows[:, None] * K + i * BK + tl.arange(0, BK)[None, :])
        else:
            a = a_desc.load([pid_m * BM, i * BK])
        acc = tl.dot(a, b_desc.load([pid_n * BN, i * BK]).T, acc)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16))


def probe(gather: bool, num_warps: int) -> str:
    """What the sm90 compile made of the loop: partitioned, declined or the compiler's failure."""
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "rows_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "GATHER": "constexpr"}
    src = ASTSource(_loop, sig, constexprs={"BM": 128, "BN": 128, "BK": 64, "GATHER": gather})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": 3})
    except Exception as e:  # noqa: BLE001 - the finding itself
        cause = e.__cause__ or e
        return f"compile failed ({type(cause).__name__}: {str(cause).strip().splitlines()[0][:120]})"
    ttgir = kernel.asm["ttgir"]
    return "partitioned" if "ttg.warp_specialize" in ttgir else "declined (plain pipelined loop)"


def main() -> int:
    print(f"triton {triton.__version__}, sm90")
    for gather in (False, True):
        for warps in (4, 8):
            print(f"  {'gather' if gather else 'tma':<7} {warps} warps: {probe(gather, warps)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

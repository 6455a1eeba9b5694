"""@triton.jit helpers shared by the kernels.

Triton's interpreter (TRITON_INTERPRET=1, how the kernels are tested on the CPU) stores
bfloat16 as raw uint16 and gets two things wrong that the GPU gets right: arithmetic on
bfloat16 values (so every kernel upcasts to float32 right after loading) and float32 ->
bfloat16 casts, which it truncates instead of rounding to nearest even. `cast_rtne` rounds
by hand under the interpreter so CPU results match torch (and the GPU) bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast float32 `x` to DTYPE, rounding to nearest even on every backend."""
    if INTERPRET and DTYPE == tl.bfloat16:
        # Round the float32 bit pattern at bit 16 (ties to even); the truncating cast that
        # follows is then exact. Infinities stay infinite; NaN payloads are not preserved.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of a kernel launched with common.pdl_launch: wait until the previous
    kernel has finished and its writes are visible, then let the next kernel's programs be
    scheduled (they wait in turn), so its launch overlaps this kernel's work."""
    pdl_wait(PDL, False)


@triton.jit
def pdl_wait(PDL: tl.constexpr, LATE: tl.constexpr):
    """pdl_enter, except that with LATE the next kernel's programs are let in only by
    pdl_release (after the main loop), so they do not sit on SMs this kernel's programs use."""
    if PDL:
        gdc_wait()
        if not LATE:
            gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr, LATE: tl.constexpr):
    """The second half of pdl_wait(PDL, LATE): let the next kernel's programs be scheduled."""
    if PDL and LATE:
        gdc_launch_dependents()


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in the L2-friendly grouped order: GROUP_M row blocks
    walk the column blocks together, so the weight tiles one of them loads are still in L2 when
    the others need them."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_m, (pid % group_size) // group_m

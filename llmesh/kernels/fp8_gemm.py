"""FP8 (E4M3) W8A8 linear layer: per-token activation quantization and a scaled FP8 GEMM.

Weights are quantized once at load time (`quantize_fp8_weight`, the `Fp8Weight` layout of
llmesh.engine.quant.packed): qweight float8_e4m3fn [N, K] (K-major, what Hopper's FP8 tensor
cores want for the B operand) with one float32 scale per output channel. At run time every
token (row of x) gets its own scale, so one outlier token does not cost the others precision:

    x_scale[m] = max(absmax(x[m]), eps) / 448      xq[m] = e4m3(clamp(x[m] * 448 / amax[m]))
    y = (xq @ qweight^T) * x_scale[:, None] * w_scale[None, :]

The GEMM accumulates in float32 and applies both scales in the epilogue. On Hopper it asks
`tl.dot` to promote the tensor cores' reduced-precision FP8 accumulator into float32 every
BLOCK_K products (`max_num_imprecise_acc`), as cuBLAS does; without it the error grows with K.

Triton's interpreter (TRITON_INTERPRET=1) loads FP8 and runs FP8 `tl.dot` correctly (it widens
to float16), but its float32 -> E4M3 cast is wrong: a mantissa carry is dropped (7.94 -> 4.0),
subnormals flush to zero and ties round up. `_to_e4m3` rounds to the E4M3 grid by hand there,
after which the interpreter's cast is exact; the GPU casts in hardware (round to nearest even).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (
    FLOAT_DTYPES, check_last_dim_contiguous, check_out, check_size, check_tensor, interpreting, next_power_of_2,
    tma_descriptor)
from llmesh.kernels.quant_gemm_config import split_plan
from llmesh.kernels.split_k import finish, split_buffers
from llmesh.kernels.triton_helpers import cast_rtne, grouped_tile

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
FP8_DTYPE = torch.float8_e4m3fn
SCALE_EPS = 1e-12
"""Floor of a row's absmax, so an all-zero row (padding) gets a finite, non-zero scale."""
SCALE_EPS_JIT = tl.constexpr(SCALE_EPS)
"""SCALE_EPS where a @triton.jit function reads it (globals there must be constexprs)."""

_QUANT_BLOCK = 4096  # per-token quantization walks a row in chunks of at most this many values


class Fp8Rows(NamedTuple):
    """Activations quantized per token: x ~ xq * scale[:, None]. What quantize_fp8_per_token
    returns, and what the fused producers (rmsnorm_fp8, silu_and_mul_fp8) hand to the GEMM, so
    the quantization costs no pass of its own."""

    xq: torch.Tensor     # float8_e4m3fn [M, K]
    scale: torch.Tensor  # float32 [M]


@dataclass(frozen=True)
class Fp8GemmConfig:
    """Launch parameters of the FP8 GEMM. group_m: row blocks per group in the L2-friendly
    program order (programs of a group share the weight tiles they read); split_k: programs
    sharing one output tile's K range (split_k.py: the last to arrive sums the partials), for
    shapes whose output tiles alone leave SMs idle (a decode batch times a 4096-wide layer)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1
    tma: int = 0
    """1: both operands' tiles come in through TMA descriptors (host-built over xq [M, K] and
    qweight [N, K]; Hopper and later, rows of 16-byte multiples): bulk copies that take no
    registers or address arithmetic, edges and the K tail filled with zeros by the copy."""

    def short(self) -> str:
        return (f"fp8 m{self.block_m} n{self.block_n} k{self.block_k} w{self.num_warps} st{self.num_stages} "
                f"g{self.group_m} s{self.split_k}" + (" tma" if self.tma else ""))


def check_fp8_config(config: Fp8GemmConfig) -> None:
    if not isinstance(config, Fp8GemmConfig):
        raise ValueError(f"config must be an Fp8GemmConfig, got {type(config).__name__}")
    for name in ("block_m", "block_n", "block_k", "num_warps"):
        v = getattr(config, name)
        if not isinstance(v, int) or v <= 0 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power of two, got {v!r}")
    if config.block_k < 32 or config.block_m < 16 or config.block_n < 16:
        raise ValueError(f"config: FP8 tl.dot tiles need block_m, block_n >= 16 and block_k >= 32, got {config.short()}")
    for name in ("num_stages", "group_m", "split_k"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config.{name} must be an int >= 1, got {v!r}")
    if config.tma not in (0, 1):
        raise ValueError(f"config.tma must be 0 or 1, got {config.tma!r}")


def default_config(m: int, n: int, k: int) -> Fp8GemmConfig:
    """Tile sizes by number of tokens: decode (small M) is bound by reading the weight, so it
    takes narrow row blocks and many column blocks; prefill takes square 128 tiles."""
    if m <= 16:
        return Fp8GemmConfig(16, 32, 256, num_warps=4, num_stages=4)
    if m <= 64:
        return Fp8GemmConfig(64, 64, 128, num_warps=4, num_stages=4)
    return Fp8GemmConfig(128, 128, 128, num_warps=8, num_stages=4)


def fp8_support(device: torch.device | str) -> str | None:
    """None when FP8 GEMMs can run on `device`, otherwise what is missing, in words."""
    device = torch.device(device)
    need = "FP8 (E4M3) needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper)"
    if device.type != "cuda":
        return f"{need}; this device is the {'CPU' if device.type == 'cpu' else device.type}"
    if not torch.cuda.is_available():
        return f"{need}; this PyTorch sees no CUDA device"
    if torch.version.hip is not None:
        return f"{need}; {device} is an AMD GPU (ROCm build of PyTorch)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"{need}; cuda:{index} is an {torch.cuda.get_device_name(index)} ({major}.{minor})"
    return None


@triton.jit
def _to_e4m3(x, INTERPRET: tl.constexpr):
    """Cast float32 `x` (already within +-448) to E4M3, rounding to nearest even everywhere."""
    if INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        mag = bits & 0x7FFFFFFF
        # Normal range (>= 2^-6): keep 3 mantissa bits, ties to even; a carry bumps the exponent.
        normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000
        # Subnormal range: multiples of 2^-9; adding 2^23 rounds to an integer (ties to even).
        ax = mag.to(tl.float32, bitcast=True)
        sub = ((ax * 512.0 + 8388608.0) - 8388608.0) * 0.001953125
        mag = tl.where(ax < 0.015625, sub.to(tl.uint32, bitcast=True), normal)
        x = (mag | sign).to(tl.float32, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def fp8_row_inverse(amax, scale_ptr, eps):
    """A row's quantization from its absmax: stores its scale (amax / 448) at scale_ptr and
    returns the multiplier 448 / amax. IEEE divisions: the torch reference gets the same values."""
    amax = tl.maximum(amax, eps)
    tl.store(scale_ptr, tl.math.div_rn(amax, 448.0))
    return tl.math.div_rn(448.0, amax)


@triton.jit
def fp8_quantize(x, inv, INTERPRET: tl.constexpr):
    """float32 values of a row times its multiplier, as E4M3."""
    return _to_e4m3(tl.minimum(tl.maximum(x * inv, -448.0), 448.0), INTERPRET)


@triton.jit
def _quant_per_token_kernel(
    x_ptr, xq_ptr, scale_ptr, K, stride_x, stride_q, eps,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + c, mask=k0 + c < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    inv = fp8_row_inverse(tl.max(amax, axis=0), scale_ptr + row, eps)
    for k0 in range(0, K, BLOCK):
        mask = k0 + c < K
        x = tl.load(x_row + k0 + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(xq_ptr + row * stride_q + k0 + c, fp8_quantize(x, inv, INTERPRET), mask=mask)


@triton.jit
def _fp8_gemm_kernel(
    xq_ptr, w_ptr, x_desc, w_desc, xs_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, K_PER_SPLIT, SPLITS,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr, TMA: tl.constexpr = False,
):
    """TMA: the tiles through x_desc ([BLOCK_M, BLOCK_K] of xq) and w_desc ([BLOCK_N, BLOCK_K]
    of qweight), whose copies fill rows past M or N and columns past K with zeros; otherwise
    pointer loads (x_desc and w_desc unused)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    rk = k_start + tl.arange(0, BLOCK_K)
    # Rows / columns past the edge read row M-1 / N-1 instead of masking (their results are
    # never stored), which keeps the loads in the main loop unmasked when K is a multiple.
    rm_in = tl.minimum(rm, M - 1).to(tl.int64)
    rn_in = tl.minimum(rn, N - 1).to(tl.int64)
    # a: [BLOCK_M, BLOCK_K] of xq [M, K]; b: [BLOCK_K, BLOCK_N] of qweight [N, K] (K contiguous)
    a_ptrs = xq_ptr + rm_in[:, None] * stride_xm + rk[None, :]
    b_ptrs = w_ptr + rn_in[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if TMA:  # a split's range is whole tiles (split_plan): a copy never crosses into the next
            a = x_desc.load([pid_m * BLOCK_M, k0])
            b = w_desc.load([pid_n * BLOCK_N, k0]).T
        elif EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_in = k0 - k_start + rk < k_end
            a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_in[:, None], other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        if not TMA:
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

    xs = tl.load(xs_ptr + rm_in)  # [BLOCK_M]
    ws = tl.load(ws_ptr + rn_in)  # [BLOCK_N]
    # Each split scales its own partial: the sum of the scaled partials differs from the scaled
    # sum only by float32 rounding, and the last split's sum is then a plain load_sum.
    y = acc * xs[:, None] * ws[None, :]
    finish(y, part_ptr, lock_ptr, out_ptr, rm, rn, (rm < M)[:, None] & (rn < N)[None, :],
           pid_m * num_n + pid_n, pid_k, M, N, stride_om, SPLITS, SPLIT, BLOCK_M, BLOCK_N, INTERPRET)


def check_fp8_runnable(device: torch.device) -> None:
    """Fail with a message a user can act on instead of a Triton compile error (every FP8
    kernel's wrapper: here, rmsnorm_fp8, silu_and_mul_fp8)."""
    if not interpreting() and (why := fp8_support(device)) is not None:
        raise ValueError(why)


def quantize_fp8_per_token(x: torch.Tensor) -> Fp8Rows:
    """x: [M, K] float -> (xq float8_e4m3fn [M, K], x_scale float32 [M]), x ~ xq * x_scale[:, None]."""
    check_tensor("x", x, "[M, K]", 2, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    m, k = x.shape
    if k < 1:
        raise ValueError(f"x must have K >= 1, got shape {tuple(x.shape)}")
    check_fp8_runnable(x.device)
    xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = min(next_power_of_2(k), _QUANT_BLOCK)
        _quant_per_token_kernel[(m,)](
            x, xq, scale, k, x.stride(0), xq.stride(0), SCALE_EPS,
            BLOCK=block, INTERPRET=interpreting(), num_warps=max(1, min(8, block // 256)),
        )
    return Fp8Rows(xq, scale)


def fp8_scale_of(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, correctly rounded on every device, as the kernels' div_rn gives it: CUDA torch
    multiplies by the reciprocal of a Python-number divisor, a last-bit difference, so the divisor
    is a tensor."""
    return amax / torch.full_like(amax, FP8_MAX)


def quantize_fp8_per_token_ref(x: torch.Tensor) -> Fp8Rows:
    """The arithmetic of `_quant_per_token_kernel` in torch (same roundings, same bits)."""
    x32 = x.to(torch.float32)
    amax = x32.abs().amax(dim=-1).clamp_min(SCALE_EPS)
    inv = torch.full_like(amax, FP8_MAX) / amax
    xq = (x32 * inv[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Rows(xq, fp8_scale_of(amax))


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] float -> (qweight float8_e4m3fn [N, K], scales float32 [N]), per output channel.

    w ~ qweight * scales[:, None]; the load-time counterpart of `quantize_fp8_per_token`.
    """
    check_tensor("w", w, "[N, K]", 2, FLOAT_DTYPES)
    w32 = w.to(torch.float32)
    scales = fp8_scale_of(w32.abs().amax(dim=1).clamp_min(SCALE_EPS))
    qweight = (w32 / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return qweight.contiguous(), scales


def fp8_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: Fp8GemmConfig | None = None,
) -> torch.Tensor:
    """y = x @ W^T with W = qweight * w_scale[:, None], activations quantized per token.

    x: [M, K] float16/bfloat16/float32; qweight: float8_e4m3fn [N, K]; w_scale: float32 [N].
    Returns [M, N] in x.dtype (into `out` when given). `config` overrides the tile choice.
    """
    check_tensor("x", x, "[M, K]", 2, FLOAT_DTYPES)
    device = x.device
    check_tensor("qweight", qweight, "[N, K]", 2, (FP8_DTYPE,), device=device)
    check_tensor("w_scale", w_scale, "[N]", 1, (torch.float32,), device=device)
    m, k = x.shape
    n = qweight.shape[0]
    check_size("qweight", "K", qweight.shape[1], k, "x's last dimension")
    check_size("w_scale", "N", w_scale.shape[0], n, "one scale per row of qweight")
    for name, t in (("x", x), ("qweight", qweight), ("w_scale", w_scale)):
        check_last_dim_contiguous(name, t)
    out = check_out("out", out, (m, n), x.dtype, device)
    return fp8_gemm_rows(quantize_fp8_per_token(x), qweight, w_scale, out=out, config=config)


def fp8_gemm_rows(rows: Fp8Rows, qweight: torch.Tensor, w_scale: torch.Tensor, *,
                  out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                  config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """fp8_gemm on activations already quantized per token (Fp8Rows): [M, N] in ``out``'s
    dtype, or ``out_dtype``."""
    xq, x_scale = rows
    m, k = xq.shape
    n = qweight.shape[0]
    if out is None:
        if out_dtype not in FLOAT_DTYPES:
            raise ValueError(f"give out or a float out_dtype, got {out_dtype!r}")
        out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if config is not None:
        check_fp8_config(config)
    if m == 0 or n == 0:
        return out
    cfg = config or default_config(m, n, k)
    splits, k_per_split = split_plan(k, cfg.block_k, cfg.split_k)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    part, locks = split_buffers("fp8_gemm", out, m, n, splits, tiles)
    descs = _tma_descs(xq, qweight, cfg) if cfg.tma else None
    _fp8_gemm_kernel[(tiles, splits)](
        xq, qweight, *(descs or (xq, qweight)), x_scale, w_scale, out, part, locks, m, n, k, k_per_split, splits,
        xq.stride(0), qweight.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0, SPLIT=splits > 1, INTERPRET=interpreting(), TMA=descs is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _tma_descs(xq: torch.Tensor, qweight: torch.Tensor, cfg: Fp8GemmConfig):
    """(x_desc, w_desc) for a config that asks for TMA, or None where an operand cannot take one
    (the pointer loads then run the same tile)."""
    x_desc = tma_descriptor(xq, [cfg.block_m, cfg.block_k])
    w_desc = tma_descriptor(qweight, [cfg.block_n, cfg.block_k])
    return (x_desc, w_desc) if x_desc is not None and w_desc is not None else None


def fp8_scaled_mm(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """fp8_gemm's product through torch._scaled_mm (cuBLASLt) with row-wise scales: x
    quantized per token by the same kernel, then one cuBLASLt FP8 GEMM. x: [M, K] 16-bit,
    qweight [N, K], w_scale [N] -> [M, N] in x's dtype. The dispatch table picks it where it
    measured faster than fp8_gemm (large M, mostly)."""
    return fp8_scaled_mm_rows(quantize_fp8_per_token(x), qweight, w_scale, x.dtype)


def fp8_scaled_mm_rows(rows: Fp8Rows, qweight: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
                       ) -> torch.Tensor:
    """fp8_scaled_mm on activations already quantized per token."""
    return torch._scaled_mm(rows.xq, qweight.t(), scale_a=rows.scale[:, None], scale_b=w_scale[None, :],
                            out_dtype=out_dtype)


def fp8_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """`fp8_gemm` in torch: quantize x per token, dequantize both sides to float32, matmul."""
    xq, x_scale = quantize_fp8_per_token_ref(x)
    acc = xq.to(torch.float32) @ qweight.to(torch.float32).t()
    return (acc * x_scale[:, None] * w_scale[None, :].to(torch.float32)).to(x.dtype)

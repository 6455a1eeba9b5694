"""A mixture-of-experts layer at one token, bf16 experts, in CUDA C++ (llmesh/kernels/cuda/moe_gemv.cu).

At batch 1 a MoE layer is two weight streams: the k chosen experts' gate/up rows, then their
down rows (75 MB a layer at Qwen3-30B-A3B's shape). fused_moe's GEMV form (fused_moe_dense.py)
streams them at about 0.54 of the copy bandwidth on an H200 (`moe_decode1_frac`,
bench/results/moe_h200_gemv.json), and its one-token layer is what keeps the batch-1 decode under
its roofline goal (docs/moe.md). These two kernels do the same arithmetic with each warp issuing
all of its loads of a pass before its first multiply (the weights streamed past L1), so more
bytes are in flight per SM than Triton's loop keeps:

- ``moe_gemv_up``: hidden [k, I] = silu(x W_gate^T) * (x W_up^T) for each pair's expert;
- ``moe_gemv_down``: out [1, H] = sum over pairs of weight_p * (hidden_p W2_p^T), in slot order,
  each pair's row rounded as fused_moe_ref rounds it, so no top-k sum launch follows.

The down kernel with one pair (expert 0, weight 1) is a dense GEMV: ``gemv`` runs a bf16
projection at one token with it, y = W x rounded once as F.linear rounds; quant/linear.py takes
it for the (N, K) in DENSE_FASTER, measured against the skinny Triton GEMV and cuBLAS
(bench/gemm_sweep.py's ``cuda_gemv_m1_*``).

fused_moe dispatches a one-token bf16 layer here where ``chosen`` says: LLMESH_MOE_CUDA_GEMV=1 / 0
forces it on / off; by default on the devices in MEASURED_FASTER, where bench/moe_gpu.py's
``moe_decode1_cuda_ms`` beat the Triton layer. The result
equals fused_moe_ref to bf16 rounding (the float32 sums run in another order), as fused_moe's
does.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, replace

import torch

from llmesh.kernels.common import INDEX_DTYPES, cuda_device_tag, pdl_launch
from llmesh.kernels.fused_moe_ref import fused_moe_ref  # noqa: F401 (the kernels' reference)


@dataclass(frozen=True)
class GemvConfig:
    """The dense GEMV's launch: rows, output rows a warp; warps, a block's; early: the form that
    issues its weight loads before it waits for x (as moe_gemv_down_early does)."""

    rows: int = 1
    warps: int = 8
    early: bool = False

    def __post_init__(self) -> None:
        if self.rows not in (1, 2) or self.warps not in (2, 4, 8):
            raise ValueError(f"GemvConfig: rows must be 1 or 2 and warps 2, 4 or 8, got {self}")


ENV = "LLMESH_MOE_CUDA_GEMV"
"""1: one-token bf16 MoE layers run these kernels wherever they can; 0: never; unset: MEASURED_FASTER."""
MEASURED_FASTER: frozenset[str] = frozenset({"h100"})
"""Device tags (common.cuda_device_tag) where the layer measured faster than fused_moe's GEMV form:
H100 36.9 us against 39.1 (bench/results/moe_h100_cuda_gemv.json), the batch-1 step 3.439 -> 3.374 ms
(kernel_profile_h100_moe_b1_cuda{0,1}.json), 3.560 -> 3.410 ms in a later run
(kernel_profile_h100_moe_b1_pf_{off,moe}.json)."""
DENSE_ENV = "LLMESH_CUDA_GEMV"
"""1: every bf16 projection at one token runs ``gemv`` wherever it can; 0: none; unset: DENSE_STEP, DENSE_FASTER."""
DENSE_FASTER: dict[str, dict[tuple[int, int], GemvConfig]] = {}
"""Device tag -> {weight shape (N, K): its fastest GemvConfig} where bench/gemm_sweep.py measured
``gemv`` at M = 1 faster than both the skinny GEMM's tuned config and F.linear (by its MIN_SPEEDUP)."""
# bench/results/gemm_sweep_h100_cuda_gemv.json (e83f2f6): Qwen3-30B-A3B's router 1.6 us against 2.2, its qkv
# 8.0 against 8.6 and the 8B's o 12.9 against 13.4; 1.00-1.01x the skinny kernel's best on the other five shapes.
DENSE_FASTER["h100"] = {(128, 2048): GemvConfig(rows=1, warps=4, early=True),
                        (4096, 4096): GemvConfig(rows=1, warps=4, early=True),
                        (5120, 2048): GemvConfig(rows=1, warps=8, early=True)}
DENSE_STEP: dict[str, GemvConfig] = {}
"""Device tag -> the GemvConfig every other one-row bf16 projection takes there: where the batch-1
step measured faster with all of them on ``gemv`` than on the skinny GEMM and cuBLAS, though each
ties alone (its loads all in flight before the first multiply overlap the kernel before it in a
step, which a kernel timed back to back with itself does not show). H100 at batch 1 (kernel_profile.py):
Qwen3-30B-A3B 3.410 ms with the MoE layer alone on CUDA, 3.299 with every projection on ``gemv``
(kernel_profile_h100_moe_b1_pf_{moe,all}.json at 243850a; 3.496 off, 3.260 on in a rerun at e83f2f6);
the dense 8B's bf16 step 5.894 -> 5.668 ms (kernel_profile_h100_b1_dense_gemv_{0,default}.json). The
early form: 3.272 against 3.299 in the first run, 3.279 against 3.260 in the second, even within noise."""
DENSE_STEP["h100"] = GemvConfig(1, 8, early=True)
MAX_PAIRS = 16
"""Experts a token may be routed to (the down kernel holds one accumulator a pair in registers)."""
DOWN_LOADS = 24
"""16-byte loads a lane of the down kernel keeps in flight (pairs x slices): 174 registers at 8 x 3,
all issued before the first multiply (tests/kernels/test_moe_gemv.py checks the compile)."""
EARLY_REGS = (255, 168, 128)
"""The register caps of moe_gemv_down_early a MoeGemvConfig may name (0: the plain down kernel)."""
EARLY_ENV = "LLMESH_GEMV_EARLY"
"""A/B switch for a step: one of EARLY_REGS turns the configs both kernels would take by default into
their early forms (the MoE layer's down kernel under that cap, the dense GEMV early); unset or 0: as
the tables say."""


@dataclass(frozen=True)
class MoeGemvConfig:
    """up_rows: gate rows (with their up rows) a warp of the gate/up kernel; warps: a block's;
    early_regs: 0 runs the down kernel that waits for the up kernel before any load; 255, 168 or
    128 the early form that issues its first weight loads before that wait, under that register cap
    (8, 12 or 16 warps an SM; the capped ones spill a few words)."""

    up_rows: int = 1
    warps: int = 8
    early_regs: int = 0

    def __post_init__(self) -> None:
        if (self.up_rows not in (1, 2) or self.warps not in (2, 4, 8)
                or self.early_regs not in (0, *EARLY_REGS)):
            raise ValueError(f"MoeGemvConfig: up_rows must be 1 or 2, warps 2, 4 or 8 and early_regs 0 or one of "
                             f"{EARLY_REGS}, got {self}")


CONFIGS: dict[str, MoeGemvConfig] = {}
"""Device tag -> the MoeGemvConfig bench/moe_gpu.py's decode1 part measured fastest (printed as this
statement); MoeGemvConfig() elsewhere. The H100's (moe_h100_cuda_prefetch.json, 4221510): the early
down form under 255 registers, its first pass of weight loads before the PDL wait and the hidden rows
after it (the compile test checks both in the machine code), 38.3 us for the layer against the plain
form's 39.5. In the batch-1 step it read 3.437 ms against 3.491 (moe_h100_cuda_{early,all}_engine.json,
one call) and 3.305 against 3.362 (kernel_profile_h100_moe_b1_pf_{early,all}.json)."""
CONFIGS["h100"] = MoeGemvConfig(1, 4, 255)


def _early_regs() -> int:
    """EARLY_ENV's cap, 0 when unset (a value outside EARLY_REGS is refused by MoeGemvConfig)."""
    return int(os.environ.get(EARLY_ENV, "0").strip() or 0)


def layer_config(tag: str) -> MoeGemvConfig:
    """The config moe_gemv launches on a device of this tag: CONFIGS', in its early form under EARLY_ENV."""
    config = CONFIGS.get(tag, MoeGemvConfig())
    return replace(config, early_regs=early) if (early := _early_regs()) else config


def dense_config(tag: str, n: int, k: int) -> GemvConfig:
    """The config gemv launches for a weight [n, k] here: DENSE_FASTER's, else DENSE_STEP's, early
    under EARLY_ENV."""
    config = DENSE_FASTER.get(tag, {}).get((n, k)) or DENSE_STEP.get(tag, GemvConfig())
    return replace(config, early=True) if _early_regs() else config


def pass_slices(width: int, cap: int) -> int:
    """16-byte slices of a row a lane loads a pass: the row in one pass where ``cap`` allows."""
    return max(1, min(cap, -(-width // 256)))


def instances(h: int, inter: int, pairs: int, ids64: bool, weights32: bool, config: MoeGemvConfig
              ) -> tuple[str, str]:
    """The two template instances a layer of hidden size h, expert width inter and ``pairs``
    routed experts launches."""
    kmax = 1 << max(0, pairs - 1).bit_length()
    up = f"moe_gemv_up<{config.up_rows}, {pass_slices(h, 8)}, {int(ids64)}>"
    args = f"1, {kmax}, {pass_slices(inter, DOWN_LOADS // kmax)}, {int(ids64)}, {int(weights32)}"
    down = f"moe_gemv_down_early<{args}, {config.early_regs}>" if config.early_regs else f"moe_gemv_down<{args}>"
    return up, down


def unsupported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> str | None:
    """Why these kernels cannot run this layer, or None (shapes as fused_moe checks them)."""
    if not x.is_cuda:
        return "a CUDA kernel"
    if torch.version.hip is not None or torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs an NVIDIA GPU of sm_80 or newer (bf16 conversions)"
    if x.shape[0] != 1:
        return f"one token only (got {x.shape[0]})"
    if not (x.dtype == w13.dtype == w2.dtype == torch.bfloat16):
        return f"bf16 activations and experts only (got {x.dtype}, {w13.dtype}, {w2.dtype})"
    h, inter = x.shape[1], w2.shape[2]
    if h % 8 or inter % 8:
        return f"hidden size and expert width must be multiples of 8 (16-byte rows), got {h} and {inter}"
    if not (w13.is_contiguous() and w2.is_contiguous()) or (w13.data_ptr() | w2.data_ptr()) % 16:
        return "contiguous, 16-byte aligned expert weights only"
    if not 1 <= topk_ids.shape[-1] <= MAX_PAIRS:  # the early down kernel's never-taken trap needs one
        return f"1 to {MAX_PAIRS} experts a token (got {topk_ids.shape[-1]})"
    if topk_ids.dtype not in INDEX_DTYPES or topk_weights.dtype not in (torch.float32, torch.bfloat16):
        return f"int32/int64 ids and float32/bf16 routing weights (got {topk_ids.dtype}, {topk_weights.dtype})"
    return None


def chosen(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
           topk_ids: torch.Tensor) -> bool:
    """Whether fused_moe runs this one-token layer here (ENV, else MEASURED_FASTER)."""
    forced = os.environ.get(ENV, "").strip()
    if forced == "0" or not x.is_cuda:
        return False
    if forced != "1" and cuda_device_tag(x.device) not in MEASURED_FASTER:
        return False
    return unsupported(x, w13, w2, topk_weights, topk_ids) is None


def moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, *, config: MoeGemvConfig | None = None, pdl: bool | None = None
             ) -> torch.Tensor:
    """x [1, H] through its k experts: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I],
    topk_weights / topk_ids [1, k] (an id of -1: another rank's expert, adding nothing) → [1, H]."""
    from llmesh.kernels import cuda_rtc

    if (why := unsupported(x, w13, w2, topk_weights, topk_ids)) is not None:
        raise ValueError(f"moe_gemv: {why}")
    config = config or layer_config(cuda_device_tag(x.device))
    h, inter, pairs = x.shape[1], w2.shape[2], topk_ids.shape[-1]
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    x = x.contiguous() if x.data_ptr() % 16 == 0 else x.clone()
    hidden = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(1, h, dtype=x.dtype, device=x.device)
    up_name, down_name = instances(h, inter, pairs, ids.dtype == torch.int64, weights.dtype == torch.float32, config)
    up = cuda_rtc.load("moe_gemv.cu", up_name, x.device)
    down = cuda_rtc.load("moe_gemv.cu", down_name, x.device)
    if pdl is None:
        pdl = pdl_launch(x.device)["PDL"]
    threads = 32 * config.warps
    up_warps = pairs * -(-inter // config.up_rows)
    up.launch((-(-up_warps // config.warps), 1, 1), threads, 0,
              [x, w13, ids, hidden, h, inter, ctypes.c_longlong(w13.stride(0)), pairs], pdl=pdl)
    down.launch((-(-h // config.warps), 1, 1), threads, 0,
                [hidden, w2, ids, weights, out, h, inter, ctypes.c_longlong(w2.stride(0)), pairs], pdl=pdl)
    return out


def dense_instance(k: int, config: GemvConfig) -> str:
    """dense_gemv's instance for K = k: the down kernel's rows with one pair and no routing."""
    return f"dense_gemv<{config.rows}, {pass_slices(k, DOWN_LOADS // config.rows)}, {int(config.early)}>"


def dense_unsupported(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why ``gemv`` cannot run x [..., K] (one row) through w [N, K], or None."""
    if not x.is_cuda:
        return "a CUDA kernel"
    if torch.version.hip is not None or torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs an NVIDIA GPU of sm_80 or newer (bf16 conversions)"
    k = x.shape[-1]
    if x.numel() != k:
        return f"one row only (got {x.numel() // max(k, 1)})"
    if not (x.dtype == w.dtype == torch.bfloat16):
        return f"bf16 activations and weights only (got {x.dtype}, {w.dtype})"
    if w.dim() != 2 or w.shape[1] != k:
        return f"a weight [N, {k}] (got {tuple(w.shape)})"
    if k % 8 or not w.is_contiguous() or w.data_ptr() % 16:
        return f"a contiguous, 16-byte aligned weight whose rows are a multiple of 8 wide (K = {k})"
    return None


def dense_chosen(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether linear() runs x (one row) through w here (DENSE_ENV, else DENSE_STEP or DENSE_FASTER)."""
    if x.numel() != x.shape[-1] or not x.is_cuda:  # every call of linear() asks: the cheap refusals first
        return False
    forced = os.environ.get(DENSE_ENV, "").strip()
    if forced == "0":
        return False
    if forced != "1":
        tag = cuda_device_tag(x.device)
        if tag not in DENSE_STEP and tuple(w.shape) not in DENSE_FASTER.get(tag, {}):
            return False
    return dense_unsupported(x, w) is None


def one_row(x: torch.Tensor) -> torch.Tensor:
    """x's one row as the kernels read it: contiguous and 16-byte aligned (a copy only where it is not)."""
    row = x.reshape(x.shape[-1])
    return row if row.is_contiguous() and row.data_ptr() % 16 == 0 else row.clone()


def gemv(x: torch.Tensor, w: torch.Tensor, *, config: GemvConfig | None = None, pdl: bool | None = None
         ) -> torch.Tensor:
    """x [..., K] holding one row, w [N, K] bf16 → x @ w^T [..., N], float32 sums rounded once."""
    from llmesh.kernels import cuda_rtc

    if (why := dense_unsupported(x, w)) is not None:
        raise ValueError(f"gemv: {why}")
    n, k = w.shape
    config = config or dense_config(cuda_device_tag(x.device), n, k)
    row = one_row(x)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    kernel = cuda_rtc.load("moe_gemv.cu", dense_instance(k, config), x.device)
    if pdl is None:
        pdl = pdl_launch(x.device)["PDL"]
    null = ctypes.c_void_p(0)  # the instance reads neither ids nor routing weights
    warps = -(-n // config.rows)
    kernel.launch((-(-warps // config.warps), 1, 1), 32 * config.warps, 0,
                  [row, w, null, null, out, n, k, ctypes.c_longlong(0), 1], pdl=pdl)
    return out

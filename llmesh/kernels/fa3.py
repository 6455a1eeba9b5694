"""FlashAttention-3's forward kernels (the fa3-fwd package), loaded once, for the dispatchers that
measured them faster than the other backends (dense_causal_attention, extend_attention).

The package holds the forward kernels of FlashAttention's `hopper/` tree (varlen, causal aligned
to the bottom right, GQA packing, a persistent tile scheduler) built for CUDA 13 against torch's
stable C ABI, so one wheel loads under any torch 2.10+. Its build has no paged K/V, no fp16
kernels and no backward. The op is called directly (`torch.ops.fa3_fwd.fwd`): the package's
Python wrappers add an autograd Function and a custom-op layer that inference does not need.

The wheel is a community build of the upstream source (FlashAttention publishes FA3 as source
only), pinned in the `gpu` extra; nothing is taken on trust: the dispatchers use it only where a
measured table names it, and the kernel tests hold its outputs to the same torch references as
every other backend (tests/kernels/test_dense_causal_attention.py, test_extend_attention.py,
GPU only).
"""

from __future__ import annotations

import functools

import torch

_op = None  # torch.ops.fa3_fwd.fwd once loaded; False when it cannot be
_why = ""
refusals: set[tuple] = set()
"""(dtype, head_dim, group) combinations an FA3 call raised on: auto dispatch leaves them."""


def fa3_forward():
    """torch.ops.fa3_fwd.fwd, or None where the package is not installed or its library does
    not load (no CUDA 13 runtime, a CPU build of torch): fa3_unavailable_reason() says which."""
    global _op, _why
    if _op is None:
        try:
            import fa3_fwd._C  # noqa: F401 - registers torch.ops.fa3_fwd
            _op = torch.ops.fa3_fwd.fwd
        except Exception as e:  # ImportError, or the extension failing to load its CUDA libraries
            _op, _why = False, f"{type(e).__name__}: {str(e)[:200]}"
    return _op or None


def fa3_unavailable_reason() -> str | None:
    """Why FlashAttention-3 cannot be loaded here (None: it can)."""
    return None if fa3_forward() is not None else _why


@functools.lru_cache(maxsize=8)
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def fa3_usable(q: torch.Tensor, group: int) -> bool:
    """Whether FlashAttention-3 can take q here: a Hopper GPU (the kernels measured; the build also
    holds sm80 ones), bfloat16 (no fp16 kernels), head_dim a multiple of 8 up to 256, the package
    loaded, and no earlier call refused these shapes."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and (q.dtype, q.shape[-1], group) not in refusals
            and _is_hopper(q.device.index if q.device.index is not None else torch.cuda.current_device())
            and fa3_forward() is not None)


def fa3_runs_here() -> bool:
    """Whether this machine's first GPU can run FlashAttention-3 at all (bfloat16, head_dim 64):
    what the GPU-only tests and benchmarks ask before they try it."""
    return torch.cuda.is_available() and fa3_usable(torch.zeros(1, 1, 64, dtype=torch.bfloat16, device="cuda"), 1)


def fa3_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of every sequence in one launch: q [T_q, H_q, D] and k, v [T_k, H_kv, D]
    rows where they are (views of a fused qkv included), sequence s owning q rows
    cu_seqlens_q[s]:[s+1] and k/v rows cu_seqlens_k[s]:[s+1] (int32 on q's device); a sequence
    with more keys than queries sees them as a cached prefix (the mask aligned to the last key).
    Writes `out` (allocated when None); q rows past the last offset are left as they were."""
    return fa3_forward()(q, k, v, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=scale,
                         is_causal=True)[0]


def fa3_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of n sequences of equal length in FA3's non-varlen form: q [n L, H_q, D]
    and k, v [n L, H_kv, D] rows viewed as [n, L, H, D] (no copy), so the kernel runs with the
    batched tile scheduler and no varlen metadata. Returns (or fills `out`) [n L, H_q, D]."""
    qs, ks, vs = (x.unflatten(0, (n, x.shape[0] // n)) for x in (q, k, v))
    res = fa3_forward()(qs, ks, vs, out=None if out is None else out.unflatten(0, (n, out.shape[0] // n)),
                        softmax_scale=scale, is_causal=True)[0]
    return res.flatten(0, 1)

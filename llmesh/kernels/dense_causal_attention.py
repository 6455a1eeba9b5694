"""Causal attention of prefill chunks with no cached prefix, dispatched to the fastest backend.

When every key of a sequence is one of its own new tokens (a fresh prompt, or a first chunk),
attention needs no block table: the dense q, k, v of the step are the whole problem, and
torch SDPA's cuDNN backend (FlashAttention-3-class kernels on Hopper) runs it faster than a
Triton kernel gathering through the pool (bench/kernels_gpu.py measures both:
prefill_attn_gemm_frac_*). Our Triton prefill kernel stays the reference and the fallback.

Dispatch rule (backend="auto"):
- below `LIBRARY_MIN_TOKENS` tokens, or off a CUDA device: the Triton prefill kernel;
- where `DENSE_CAUSAL_BACKEND` has this device's measured choice for the batch's mean prompt
  length (bench/kernels_gpu.py times every backend and prints the table): that backend, if it
  can run the batch here;
- otherwise cuDNN when it can run here (a CUDA device, fp16/bf16, head_dim a multiple of 8 and at most
  128, torch exposing SDPBackend.CUDNN_ATTENTION, and no earlier call found it refusing these
  shapes) and the batch is big enough to amortise one SDPA call per sequence: at least
  `LIBRARY_MIN_TOKENS` tokens, and either every sequence the same length (one batched call) or
  at most `CUDNN_MAX_CALLS` sequences.
- otherwise the Triton prefill kernel, one launch for the whole batch (K/V read as a pool of
  one-token blocks).
Grouped-query heads go to cuDNN through enable_gqa; a torch whose cuDNN path refuses it gets
K/V expanded to the query heads (remembered, so the refusal is paid once).

FlashAttention-3 (llmesh/kernels/fa3.py, the fa3-fwd package) runs every sequence of a batch in
one varlen launch, whatever their lengths, where cuDNN makes one call per sequence unless they
are equal: "fa3", which auto takes where the table says so. "fa3_batched" is the same kernels'
non-varlen form where every sequence has the same length (another tile scheduler, no varlen
metadata; the varlen launch otherwise), a table entry of its own because only a measurement
says which form is faster at a length: on the H100 (bench/results/kernels_h100_tables.json) it
took 473-655 TFLOP/s at 1k-8k tokens a prompt where the varlen launch took 402-612 and cuDNN
436-570. Its build has no fp16 kernels, so fp16 models stay on the other backends; cached
prefixes go through extend_attention.py.

FlashAttention-4 (the flash-attn-4 package, CuTe DSL kernels with a Hopper forward) is a forced
backend ("fa4") that auto does not pick: on the H200 (bench/results/kernels_h200_fa4.json,
16k tokens a call) it tied cuDNN at 4k and 8k tokens a prompt but took 0.55 / 0.69 ms against
cuDNN's 0.30 / 0.53 at 1k and 2k, where its Python interface (config choice, argument
conversion) costs about half a millisecond a call, more than the kernel. The benchmark keeps
measuring it wherever it is installed, so a release that wins can be switched on by measurement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmesh.kernels import fa3
from llmesh.kernels.common import check_out, check_size, check_tensor, measured_bucket
from llmesh.kernels.fa3 import fa3_usable

LIBRARY_MIN_TOKENS = 512
"""Below this many tokens the Triton launch is as fast as a library's (and avoids cuDNN's
per-sequence calls)."""
CUDNN_MAX_CALLS = 16
"""Most SDPA calls (sequences of unequal lengths) one dispatch makes before Triton is cheaper."""

BACKENDS = ("auto", "fa3", "fa3_batched", "fa4", "cudnn", "flash", "triton")

DENSE_CAUSAL_BACKEND: dict[str, dict[int, str]] = {}
"""Per device tag: {largest mean prompt length of a bucket: "fa3", "fa3_batched", "cudnn" or
"triton", the fastest bench/kernels_gpu.py measured there (prompts of that length, no cached
prefix; the smallest bucket is the offline workload's unequal ~200-token prompts)}. A device without an
entry follows the cuDNN rule."""
DENSE_CAUSAL_BACKEND["h200"] = {
    512: "fa3",
    1024: "fa3_batched",
    2048: "fa3_batched",
    4096: "fa3_batched",
    8192: "fa3_batched",
}
DENSE_CAUSAL_BACKEND["h100"] = {
    512: "fa3",
    1024: "fa3_batched",
    2048: "fa3_batched",
    4096: "fa3_batched",
    8192: "fa3_batched",
}

_refusals: set[tuple] = set()  # (backend, dtype, head_dim, group) combinations that raised (FA3's: fa3.refusals)
_gqa_expand: set[tuple] = set()  # (backend, dtype, head_dim) whose enable_gqa raised


_fa4_fn = None  # FlashAttention-4's forward once imported; False when it cannot be


def fa4_forward():
    """FlashAttention-4's varlen forward (the flash-attn-4 package: CuTe DSL kernels with a
    Hopper path, compiled on first use per shape class), or None where it is not installed or
    its DSL cannot load. The private entry point is used because it takes `out`; the public
    flash_attn_varlen_func wraps it in an autograd Function and allocates the output."""
    global _fa4_fn
    if _fa4_fn is None:
        try:
            from flash_attn.cute.interface import _flash_attn_fwd
            _fa4_fn = _flash_attn_fwd
        except Exception:  # ImportError, or the DSL's native libraries failing to load
            _fa4_fn = False
    return _fa4_fn or None


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None), "flash": SDPBackend.FLASH_ATTENTION}[name]


def cudnn_usable(q: torch.Tensor, group: int) -> bool:
    """Whether the cuDNN SDPA path can take q's shapes here (see the dispatch rule)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 128 and _sdpa_backend("cudnn") is not None
            and ("cudnn", q.dtype, q.shape[-1], group) not in _refusals)


def choose_backend(q: torch.Tensor, group: int, lengths: Sequence[int]) -> str:
    """The backend="auto" choice for a batch of sequences of these lengths."""
    if not q.is_cuda or sum(lengths) < LIBRARY_MIN_TOKENS:
        return "triton"
    measured = measured_bucket(DENSE_CAUSAL_BACKEND, q.device, sum(lengths) // len(lengths))
    if measured in ("fa3", "fa3_batched") and fa3_usable(q, group) or measured == "triton":
        return measured
    if not cudnn_usable(q, group):
        return "triton"
    if len(set(lengths)) == 1 or len(lengths) <= CUDNN_MAX_CALLS:
        return "cudnn"
    return "triton"


def _sdpa(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H_q, L, D], k, v: [B, H_kv, L, D] -> [B, H_q, L, D], causal, on one SDPA backend."""
    from torch.nn.attention import sdpa_kernel

    group = q.shape[1] // k.shape[1]
    key = (backend, q.dtype, q.shape[-1])
    with sdpa_kernel([_sdpa_backend(backend)]):
        if group > 1 and key not in _gqa_expand:
            try:
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            except RuntimeError:
                _gqa_expand.add(key)
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _run_sdpa(backend: str, q, k, v, starts: Sequence[int], scale: float, out: torch.Tensor) -> None:
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
    group = q.shape[1] // k.shape[1]
    if len(set(lengths)) == 1:  # one batched call: [S * L, H, D] -> [S, H, L, D]
        n, L = len(lengths), lengths[0]
        if L == 1:
            out[starts[0]:starts[-1]].copy_(_one_key(v[starts[0]:starts[-1]], group))
            return
        rows = slice(starts[0], starts[-1])
        out[rows].unflatten(0, (n, L)).copy_(_batched_sdpa(backend, q[rows], k[rows], v[rows], n, scale))
        return
    for a, b in zip(starts[:-1], starts[1:]):
        if b - a == 1:
            out[a:b].copy_(_one_key(v[a:b], group))
        elif b > a:
            qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))  # [1, H, L, D]
            out[a:b].copy_(_sdpa(backend, qs, ks, vs, scale)[0].transpose(0, 1))


def _batched_sdpa(backend: str, q, k, v, n: int, scale: float) -> torch.Tensor:
    """n sequences of equal length in one SDPA call: q [n L, H_q, D], k, v [n L, H_kv, D] ->
    [n, L, H_q, D] (a view of SDPA's [n, H_q, L, D] output)."""
    qs, ks, vs = (x.unflatten(0, (n, x.shape[0] // n)).transpose(1, 2) for x in (q, k, v))
    return _sdpa(backend, qs, ks, vs, scale).transpose(1, 2)


def _one_key(v: torch.Tensor, group: int) -> torch.Tensor:
    """Causal attention of a one-token sequence: softmax over its single key is 1, so the output
    is that token's value in each query head. cuDNN SDPA refuses key length 1 ("does not support
    key/value sequence length 1", measured on the H200), and a refusal in auto mode would turn
    cuDNN off for the shape for the whole process."""
    return v.repeat_interleave(group, dim=1) if group > 1 else v


def _run_fa4(q, k, v, starts: Sequence[int], scale: float, out: torch.Tensor | None) -> torch.Tensor:
    """All sequences in one varlen launch (no per-sequence calls, no layout change: FA4 reads
    [T, H, D] rows as they are). Rows past starts[-1] are left as they were."""
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
    cu = torch.tensor(starts, dtype=torch.int32, device=q.device)
    width = max(lengths)
    res = fa4_forward()(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=width, max_seqlen_k=width,
                        softmax_scale=scale, causal=True, out=out)
    return res[0]


def _run_fa3(q, k, v, starts: Sequence[int], scale: float, out: torch.Tensor | None,
             cu_seqlens: torch.Tensor | None, batched: bool = False) -> torch.Tensor:
    """All sequences in one launch: varlen (fa3.fa3_varlen, keys = queries), or, when `batched`
    and every sequence has the same length, the non-varlen form (fa3.fa3_batched) over their rows."""
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
    if batched and len(set(lengths)) == 1 and (out is not None or starts[-1] == q.shape[0]):
        rows = slice(0, starts[-1])
        res = fa3.fa3_batched(q[rows], k[rows], v[rows], len(lengths), scale,
                              out=None if out is None else out[rows])
        return res if out is None else out
    if cu_seqlens is None:
        cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=q.device)
    width = max(lengths)
    return fa3.fa3_varlen(q, k, v, cu_seqlens, cu_seqlens, width, width, scale, out=out)


def _run_triton(q, k, v, starts: Sequence[int], scale: float, out: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None) -> None:
    from llmesh.kernels.prefill_attention import launch_prefill_kernel

    # K/V as a pool of one-token blocks: k: [T, 1, H_kv, D]; sequence s's table lists its rows.
    # The offsets, lengths and tables are made on the device from cu_seqlens where the caller
    # has it: each host list copied to a GPU is a blocking copy (the stream waits, a layer at a time).
    width = max(b - a for a, b in zip(starts[:-1], starts[1:]))
    dev = q.device
    if cu_seqlens is None:
        cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=dev)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    tables = (cu_seqlens[:-1, None] + torch.arange(width, dtype=torch.int32, device=dev)[None, :]
              ).clamp_(max=q.shape[0] - 1)
    launch_prefill_kernel(q, k.unsqueeze(1), v.unsqueeze(1), out, tables, cu_seqlens, lengths, scale)


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_start_loc: Sequence[int],
    scale: float,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of sequences with no cached prefix: q: [T, H_q, D], k, v: [T, H_kv, D]
    (the step's new tokens, RoPE applied; views of a fused qkv are fine), sequence s owning
    rows query_start_loc[s]:query_start_loc[s+1] (host ints: SDPA calls are sized by them).
    backend "auto" follows the module's dispatch rule; "cudnn", "flash" (torch SDPA backends)
    and "triton" force one, for benchmarks and tests, as do "fa3", "fa3_batched" and "fa4".
    `cu_seqlens`: the same offsets as an int32 tensor on q's device, where the caller has them
    (FA3 reads them there; made from the host list otherwise, a blocking copy). Returns (or
    fills `out`) [T, H_q, D].
    """
    check_tensor("q", q, "[T, H_q, D]", 3)
    t, h_q, d = q.shape
    check_tensor("k", k, "[T, H_kv, D]", 3, (q.dtype,), device=q.device)
    check_tensor("v", v, "[T, H_kv, D]", 3, (q.dtype,), device=q.device)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    check_size("k", "T", k.shape[0], t, "one key per query token")
    check_size("k", "D", k.shape[2], d, "q's head_dim")
    if h_q % k.shape[1]:
        raise ValueError(f"q has {h_q} heads, not a multiple of k's {k.shape[1]}")
    starts = [int(x) for x in query_start_loc]
    if not starts or starts[0] != 0 or starts[-1] > t or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"query_start_loc must rise from 0 to at most T={t}, got {starts[:8]}...")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if out is not None:
        out = check_out("out", out, (t, h_q, d), q.dtype, q.device)
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, "[S + 1]", 1, (torch.int32,), device=q.device)
        check_size("cu_seqlens", "S + 1", cu_seqlens.shape[0], len(starts), "query_start_loc's entries")
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
    if not lengths or max(lengths) == 0:
        return check_out("out", out, (t, h_q, d), q.dtype, q.device)
    group = h_q // k.shape[1]
    choice = choose_backend(q, group, lengths) if backend == "auto" else backend
    if choice in ("fa3", "fa3_batched"):
        if not fa3_usable(q, group):
            if backend != "auto":
                raise ValueError(f"backend {choice!r} needs a Hopper GPU, bfloat16, head_dim <= 256 and the fa3-fwd "
                                 "package")
        else:
            try:
                return _run_fa3(q, k, v, starts, scale, out, cu_seqlens, batched=choice == "fa3_batched")
            except RuntimeError:
                if backend != "auto":
                    raise
                fa3.refusals.add((q.dtype, d, group))
        choice = "triton"
    if choice == "fa4":  # forced only (benchmarks, tests): auto never picks it, see the module doc
        if not q.is_cuda or fa4_forward() is None:
            raise ValueError("backend 'fa4' needs a CUDA device and the flash-attn-4 package")
        return _run_fa4(q, k, v, starts, scale, out)
    if choice in ("cudnn", "flash"):
        if not q.is_cuda or _sdpa_backend(choice) is None:
            raise ValueError(f"backend {choice!r} needs a CUDA device and a torch that has it")
        try:
            if out is None and starts[-1] == t and len(set(lengths)) == 1 and lengths[0] > 1:
                # SDPA's own output, no copy into `out`: cuDNN allocates it in q's layout, so
                # [S, H, L, D] over [S, L, H, D] memory is already [T, H, D]. The copy reads and
                # writes the whole output, by estimate a fifth of a 1k-token prefill's time
                # (bench/README.md, the causal prefill figures).
                return _batched_sdpa(choice, q, k, v, len(lengths), scale).reshape(t, h_q, d)
            out = check_out("out", out, (t, h_q, d), q.dtype, q.device)
            _run_sdpa(choice, q, k, v, starts, scale, out)
            return out
        except RuntimeError:
            if backend != "auto":
                raise
            _refusals.add((choice, q.dtype, d, group))  # e.g. a cuDNN build without these shapes
    out = check_out("out", out, (t, h_q, d), q.dtype, q.device)
    _run_triton(q, k, v, starts, scale, out, cu_seqlens)
    return out


def dense_causal_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start_loc: Sequence[int], scale: float
) -> torch.Tensor:
    """Per-sequence causal SDPA in float32 (rows no sequence owns are zeros)."""
    out = torch.zeros_like(q)
    starts = [int(x) for x in query_start_loc]
    group = q.shape[1] // k.shape[1]
    for a, b in zip(starts[:-1], starts[1:]):
        if b > a:
            qs, ks, vs = (x[a:b].float().transpose(0, 1) for x in (q, k, v))
            ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
            out[a:b] = o.transpose(0, 1).to(q.dtype)
    return out

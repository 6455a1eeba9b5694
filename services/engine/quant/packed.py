"""Quantized weights as they live in memory: the layouts our GEMM kernels read.

Every 4-bit source (quantize-on-load INT4, AWQ, GPTQ, GGUF Q4_0 / Q4_1) is repacked once at
load into one layout, and every 8-bit integer source (INT8 per-channel, GGUF Q8_0) into
another, so one W4A16 and one W8A16 kernel serve them all. The layouts are for a GEMM
``y[M, N] = x[M, K] @ W[K, N]`` (W is the transpose of an nn.Linear weight):

Int4Weight
    qweight  uint8 [Kp // 2, N]   byte (j, n): low nibble q[j, n], high nibble q[j + Kp/2, n]
    scales   float16 [Kp // G, N]
    mins     float16 [Kp // G, N]   w[k, n] = q[k, n] * scales[k // G, n] + mins[k // G, n]
    Kp = K rounded up to a multiple of 2G; rows k >= K hold q = 0 and the kernels never read
    x there. Splitting K in halves (rather than packing neighbours) lets a kernel load both
    nibbles' activations as two contiguous tiles instead of interleaving them.
    ``w = q*s + m`` covers every source: asymmetric INT4/AWQ/GPTQ (m = -z*s), Q4_0 (m = -8d)
    and Q4_1 (m as stored), with q*s+m computed in float32.

Int8Weight
    qweight  int8 [K, N]
    scales   float16 or float32 [K // G, N]   w[k, n] = q[k, n] * scales[k // G, n]
    G = K for per-channel INT8 (one scale row), 32 for GGUF Q8_0.

Fp8Weight
    qweight  float8_e4m3fn [N, K]   (K-major: what Hopper's FP8 tensor cores want for B)
    scales   float32 [N]            w[k, n] = qweight[n, k] * scales[n]
    Activations are quantized per token at run time (W8A8).

Fp8BlockWeight
    qweight  float8_e4m3fn [N, K]
    scales   float32 [ceil(N / BN), ceil(K / BK)]   w[k, n] = qweight[n, k] * scales[n // BN, k // BK]
    block    (BN, BK), 128 x 128 in every checkpoint that ships one (Qwen3-*-FP8, DeepSeek-V3)
    FP8 checkpoints scaled per block (fp8_checkpoint.py); activations are quantized per token
    and BK-channel group at run time, so each BK-wide slice of the product has one activation
    and one weight scale (llmesh/kernels/block_fp8_gemm.py).

W4A8Weight
    qweight       int8 [N, Kp // 2]      signed codes -8..7; byte (n, j): k = 2j in the low
                                         nibble, k = 2j + 1 in the high one
    group_scales  float8_e4m3fn [Kp // G, N]
    scales        float32 [N]            w[k, n] = e4m3(q[n, k] * group_scales[k // G, n]) * scales[n]
    INT4 weights for FP8 activations quantized per token (W4A8): the tensor cores multiply in
    FP8, so past the memory-bound batch sizes it runs at FP8's rate with INT4's bytes. The
    product of code and group scale is rounded to E4M3 because that is what the kernel
    multiplies: FBGEMM's (CUTLASS's) W4A8 GEMM widens a code by looking it up in a table of
    the eight products g * -8 .. g * -1, each stored as an E4M3 value, negated for positive
    codes. Kp = K rounded up to a multiple of G (codes 0 past K; the activations are padded to
    match where K is not). The layout is FBGEMM's (its ``pack_int4``); on a GPU the weight is
    re-laid in place once into its kernel's shuffled order (``shuffled`` True), which only that
    kernel reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from llmesh.kernels.quant_ref import dequantize_int4_ref, dequantize_int8_ref

GGUF_GROUP = 32
"""Values per block of GGUF Q8_0 / Q4_0 / Q4_1."""


def padded_k(k: int, group_size: int) -> int:
    """K rounded up to a multiple of 2 * group_size (the Int4Weight layout's Kp)."""
    step = 2 * group_size
    return -(-k // step) * step


class _Packed:
    """What every packed weight does the same way, over whichever tensor fields it has."""

    def map_tensors(self, fn):
        """A copy with ``fn`` applied to every tensor field (device moves, clones, slices)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device: torch.device | str):
        return self.map_tensors(lambda t: t.to(device))

    def nbytes(self) -> int:
        """Bytes in memory (the act-order permutation included)."""
        return sum(t.numel() * t.element_size() for f in fields(self)
                   if isinstance(t := getattr(self, f.name), torch.Tensor))


@dataclass
class Int4Weight(_Packed):
    qweight: torch.Tensor            # uint8 [Kp // 2, N]
    scales: torch.Tensor             # float16 [Kp // G, N]
    mins: torch.Tensor               # float16 [Kp // G, N]
    group_size: int
    in_features: int                 # K
    perm: torch.Tensor | None = None
    """GPTQ act-order: the GEMM reads x[:, perm] (rows of W were sorted by group)."""

    format: str = "int4"
    """Where it came from (int4, awq, gptq, q4_0, q4_1): for logs and memory reports."""

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def padded_in_features(self) -> int:
        return 2 * self.qweight.shape[0]

    def codes(self) -> torch.Tensor:
        """uint8 [Kp, N]: the codes 0..15 unpacked from the halves layout (what the library
        kernels' packers start from)."""
        return torch.cat([self.qweight & 0x0F, self.qweight >> 4], dim=0)

    def signed_zeros(self) -> torch.Tensor:
        """float32 [Kp / G, N]: the zero of ``w = (q - 8) * scales + zero``, the form tinygemm,
        PyTorch's CPU INT4 kernel and FBGEMM take (our ``w = q * s + m`` with zero = m + 8 s)."""
        return self.mins.float() + 8.0 * self.scales.float()

    def dequantize(self) -> torch.Tensor:
        """W [K, N] in float32 (the torch reference; rows in x's order when perm is set)."""
        w = dequantize_int4_ref(self.qweight, self.scales, self.mins, self.group_size, self.in_features)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w


@dataclass
class Int8Weight(_Packed):
    qweight: torch.Tensor            # int8 [K, N]
    scales: torch.Tensor             # float16 / float32 [K // G, N]
    group_size: int
    format: str = "int8"
    """int8 (per-channel, group_size == K) or q8_0 (group 32)."""

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8_ref(self.qweight, self.scales, self.group_size)


class _NkCodes(_Packed):
    """Codes stored as nn.Linear stores its weight, qweight [N, K] (the FP8 formats)."""

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]


@dataclass
class Fp8Weight(_NkCodes):
    qweight: torch.Tensor            # float8_e4m3fn [N, K]
    scales: torch.Tensor             # float32 [N]
    format: str = "fp8"

    def dequantize(self) -> torch.Tensor:
        return (self.qweight.float() * self.scales[:, None]).t()


@dataclass
class Fp8BlockWeight(_NkCodes):
    qweight: torch.Tensor            # float8_e4m3fn [N, K]
    scales: torch.Tensor             # float32 [ceil(N / BN), ceil(K / BK)]
    block: tuple[int, int]           # (BN, BK)
    format: str = "fp8"

    def dense_scales(self) -> torch.Tensor:
        """float32 [N, K]: each weight's block scale."""
        bn, bk = self.block
        n, k = self.qweight.shape
        return self.scales.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]

    def dequantize(self) -> torch.Tensor:
        return (self.qweight.float() * self.dense_scales()).t()


W4A8_ROW_RANGE = 392.0
"""|w| / row scale of a W4A8 row's largest weight: 7 * 56, so group scales stay at most 56 and
every product code * scale within E4M3's 448 (the kernel's table saturates past it)."""


def w4a8_product(q: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """float32 e4m3(q * g): the value the W4A8 kernel multiplies for code q in group scale g
    (both exact in float32: a 4-bit integer times a 4-bit mantissa)."""
    return (q.float() * group_scale.float()).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def pack_signed_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K / 2] from signed codes q [N, K] in -8..7: k = 2j in the low nibble, k = 2j + 1
    in the high one (FBGEMM's ``pack_int4``; W4A8Weight.codes() unpacks it)."""
    q = q.to(torch.int16)
    return ((q[:, 0::2] & 0x0F) | (q[:, 1::2] << 4)).to(torch.int8).contiguous()


@dataclass
class W4A8Weight(_Packed):
    qweight: torch.Tensor            # int8 [N, Kp // 2]
    group_scales: torch.Tensor       # float8_e4m3fn [Kp // G, N]
    scales: torch.Tensor             # float32 [N]
    group_size: int
    in_features: int                 # K
    shuffled: bool = False
    """True once re-laid for FBGEMM's kernel (fbgemm_kernels.w4a8_shuffle): qweight keeps its
    shape, group_scales become [Kp // G, 8, N]; the codes are then no longer readable here."""
    format: str = "w4a8"

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def padded_in_features(self) -> int:
        return 2 * self.qweight.shape[1]

    def _check_readable(self) -> None:
        if self.shuffled:
            raise ValueError("this W4A8 weight is in FBGEMM's shuffled layout, which only its kernel reads; "
                             "slice or dequantize it before fbgemm_kernels.w4a8_shuffle")

    def codes(self) -> torch.Tensor:
        """int8 [N, Kp]: the signed codes -8..7 (0 in the padding past K)."""
        self._check_readable()
        low = (self.qweight << 4) >> 4  # arithmetic shifts sign-extend each nibble
        high = self.qweight >> 4
        return torch.stack([low, high], dim=-1).reshape(self.out_features, self.padded_in_features)

    def dequantize(self) -> torch.Tensor:
        """W [K, N] in float32: e4m3(code * group scale) times the row scale."""
        return self.unscaled_t()[: self.in_features] * self.scales.float()[None, :]

    def unscaled_t(self) -> torch.Tensor:
        """float32 [Kp, N]: e4m3(code * group scale), what the kernel's tensor cores multiply."""
        g = self.group_scales.repeat_interleave(self.group_size, dim=0)        # [Kp, N]
        return w4a8_product(self.codes().t(), g)


QuantizedWeight = Int4Weight | Int8Weight | Fp8Weight | Fp8BlockWeight | W4A8Weight


def pack_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
              fmt: str = "int4") -> Int4Weight:
    """Int4Weight from unpacked codes. q: [K, N] integers in 0..15; scales, mins: [ceil(K/G), N]
    (any float dtype, stored as float16)."""
    k, n = q.shape
    kp = padded_k(k, group_size)
    groups = kp // group_size
    if scales.shape != mins.shape or scales.shape[1] != n or scales.shape[0] != -(-k // group_size):
        raise ValueError(f"scales/mins must be [{-(-k // group_size)}, {n}] for q [{k}, {n}] and group "
                         f"{group_size}, got {tuple(scales.shape)} / {tuple(mins.shape)}")
    full = torch.zeros(kp, n, dtype=torch.uint8, device=q.device)
    full[:k] = q.to(torch.uint8)
    half = kp // 2
    packed = full[:half] | (full[half:] << 4)
    s = torch.zeros(groups, n, dtype=torch.float16, device=q.device)
    m = torch.zeros(groups, n, dtype=torch.float16, device=q.device)
    s[: scales.shape[0]] = scales.to(torch.float16)
    m[: mins.shape[0]] = mins.to(torch.float16)
    return Int4Weight(packed.contiguous(), s, m, group_size, k, format=fmt)


def cat_out_features(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """One weight whose output columns are the inputs' in order (fused q/k/v, gate/up)."""
    first = weights[0]
    if any(type(w) is not type(first) for w in weights):
        raise ValueError("cannot fuse weights of different formats: " + ", ".join(w.format for w in weights))
    if isinstance(first, Fp8BlockWeight):
        bn = first.block[0]
        if any(w.block != first.block or w.in_features != first.in_features for w in weights) or any(
                w.out_features % bn for w in weights[:-1]):
            raise ValueError("block-scaled FP8 weights fuse only with equal blocks and K, each part a whole number "
                             "of row blocks")
        return Fp8BlockWeight(torch.cat([w.qweight for w in weights], 0), torch.cat([w.scales for w in weights], 0),
                              first.block, format=first.format)
    if isinstance(first, Fp8Weight):
        return Fp8Weight(torch.cat([w.qweight for w in weights], 0), torch.cat([w.scales for w in weights], 0),
                         format=first.format)
    if isinstance(first, W4A8Weight):
        if any(w.group_size != first.group_size or w.in_features != first.in_features or w.shuffled
               for w in weights):
            raise ValueError("W4A8 weights fuse only with equal group size and K, before they are shuffled")
        return W4A8Weight(torch.cat([w.qweight for w in weights], 0), torch.cat([w.group_scales for w in weights], 1),
                          torch.cat([w.scales for w in weights], 0), first.group_size, first.in_features,
                          format=first.format)
    if isinstance(first, Int8Weight):
        if any(w.group_size != first.group_size for w in weights):
            raise ValueError("cannot fuse INT8 weights with different group sizes")
        return Int8Weight(torch.cat([w.qweight for w in weights], 1), torch.cat([w.scales for w in weights], 1),
                          first.group_size, format=first.format)
    if any(w.group_size != first.group_size or w.in_features != first.in_features or w.perm is not None
           for w in weights):
        raise ValueError("INT4 weights fuse only with equal group size, equal K and no act-order permutation")
    return Int4Weight(torch.cat([w.qweight for w in weights], 1), torch.cat([w.scales for w in weights], 1),
                      torch.cat([w.mins for w in weights], 1), first.group_size, first.in_features,
                      format=first.format)

"""4-bit AWQ (GEMM) and GPTQ checkpoints → Int4Weight (packed.py).

Both store, per nn.Linear [N, K], integer codes q, integer zero points z and float16 scales s
with w[k, n] = (q[k, n] - z[g, n]) * s[g, n], g the group of input channel k. We repack
into Int4Weight with mins = -z * s rounded to float16 (the only rounding added: q*s + min
differs from (q - z)*s by at most half a float16 ulp of z*s).

Checkpoint tensors (int32 words hold 8 nibbles; "value i" is bits 4i..4i+3):

AWQ GEMM (AutoAWQ WQLinear_GEMM)
    qweight int32 [K, N/8]      packed along N: word (k, c) holds columns 8c..8c+7, with
                                value i = column 8c + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
                                (column 8c + j is value AWQ_REVERSE_ORDER[j], [0, 4, 1, 5, 2, 6, 3, 7])
    qzeros  int32 [K/G, N/8]    packed like qweight; z as is
    scales  float16 [K/G, N]

GPTQ (AutoGPTQ / GPTQModel QuantLinear)
    qweight int32 [K/8, N]      packed along K: word (r, n) holds rows 8r..8r+7, value i = row 8r + i
    qzeros  int32 [ceil(K/G), N/8]  packed along N in plain order: value i = column 8c + i
    scales  float16 [ceil(K/G), N]
    g_idx   int32 [K]           group of each input channel (k // G unless act-order)
    checkpoint_format "gptq" (v1) stores z - 1 and we read nibble + 1 (as AutoGPTQ's and
    vLLM's kernels do); "gptq_v2" stores z.

Act-order (desc_act) GPTQ quantizes channels in a permuted order, so g_idx is not k // G.
We sort the rows of W by group (perm = stable argsort of g_idx) so each group is again G
contiguous rows, and set Int4Weight.perm: the GEMM reads x[:, perm], and dequantize()
scatters the rows back to x's order.

Per-channel checkpoints (group_size -1, one group of K) are stored with a smaller group and
repeated scale rows (``storage_group_size``): Int4Weight pads K to a multiple of 2G, which
for G = K would double the weight's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmesh.engine.errors import UnsupportedModelError
from llmesh.engine.quant.packed import Int4Weight, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ GEMM: value i of a packed word is column AWQ_ORDER[i] of its 8 columns."""
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""AWQ GEMM: column j of a word's 8 columns is value AWQ_REVERSE_ORDER[j]."""

SUPPORTED_METHODS = ("awq", "gptq")
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)

_PACK = 8          # 4-bit values per int32
_STORAGE_GROUP_MAX = 128


@dataclass(frozen=True)
class QuantCheckpointConfig:
    """The parts of an HF ``quantization_config`` that decide how tensors are read."""

    method: str                       # "awq" | "gptq"
    bits: int                         # 4
    group_size: int                   # input channels per scale; -1: per output channel (whole K)
    sym: bool = False                 # GPTQ symmetric (z = 8); informational, the zeros are stored
    desc_act: bool = False            # GPTQ act-order: g_idx may permute channels
    zero_point: bool = True           # AWQ asymmetric
    checkpoint_format: str = "gptq"   # GPTQ: "gptq" (v1, zeros stored minus 1) or "gptq_v2"
    version: str = "gemm"             # AWQ packing
    modules_to_not_convert: tuple[str, ...] = ()

    @property
    def zero_offset(self) -> int:
        """Added to every stored zero nibble (1 for GPTQ v1)."""
        return 1 if self.method == "gptq" and self.checkpoint_format == "gptq" else 0

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def _unsupported_bits(bits: object) -> UnsupportedModelError:
    return UnsupportedModelError(f"quantization_config bits={bits!r}: llmesh loads only 4-bit AWQ/GPTQ "
                                 f"checkpoints")


def parse_quant_config(d: dict) -> QuantCheckpointConfig:
    """QuantCheckpointConfig from config.json's ``quantization_config``; UnsupportedModelError
    names whatever llmesh cannot load (method, bit width, packing version or format)."""
    method = str(d.get("quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise UnsupportedModelError(
            f"quantization_config quant_method={d.get('quant_method')!r} is not supported "
            f"(supported checkpoint methods: {', '.join(SUPPORTED_METHODS)})")
    bits = d.get("bits", d.get("w_bit"))
    if bits != 4:
        raise _unsupported_bits(bits)
    group_size = d.get("group_size", d.get("q_group_size", 128))
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise UnsupportedModelError(f"quantization_config group_size={group_size!r}: expected a positive "
                                    f"integer or -1 (per-channel)")
    skip = tuple(d.get("modules_to_not_convert") or ())
    if method == "awq":
        version = str(d.get("version", "gemm")).lower()
        if version not in AWQ_VERSIONS:
            raise UnsupportedModelError(
                f"AWQ version {d.get('version')!r} is not supported (only {', '.join(AWQ_VERSIONS)}); "
                f"re-export the checkpoint with version='gemm'")
        zero_point = bool(d.get("zero_point", True))
        if not zero_point:
            raise UnsupportedModelError("AWQ checkpoints without zero points (zero_point=false) are not "
                                        "supported; use an asymmetric (zero_point=true) GEMM checkpoint")
        return QuantCheckpointConfig("awq", 4, group_size, zero_point=zero_point, version=version,
                                     modules_to_not_convert=skip)
    fmt = str(d.get("checkpoint_format", "gptq")).lower()
    if d.get("is_marlin_format") or fmt not in GPTQ_FORMATS:
        shown = "marlin" if d.get("is_marlin_format") else d.get("checkpoint_format")
        raise UnsupportedModelError(f"GPTQ checkpoint_format {shown!r} is not supported "
                                    f"(supported: {', '.join(GPTQ_FORMATS)})")
    if d.get("dynamic"):
        raise UnsupportedModelError("GPTQ per-module overrides (quantization_config 'dynamic') are not "
                                    "supported")
    return QuantCheckpointConfig("gptq", 4, group_size, sym=bool(d.get("sym", True)),
                                 desc_act=bool(d.get("desc_act", False)), checkpoint_format=fmt,
                                 modules_to_not_convert=skip)


def storage_group_size(in_features: int, group_size: int) -> int:
    """The Int4Weight group for a checkpoint group: itself, except per-channel (G = K), which
    becomes the largest power of two <= 128 with K a multiple of 2G (scale rows repeated),
    so no K padding is needed; K without such a divisor (>= 16) keeps G = K."""
    if group_size != in_features:
        return group_size
    g = min(_STORAGE_GROUP_MAX, (in_features & -in_features) // 2)
    return g if g >= 16 else in_features


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)   # [8]


def _unpack_last(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] → nibbles [R, C, 8], value i of each word at [..., i]."""
    return (words.unsqueeze(-1) >> _shifts(words.device)) & 0x0F


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 words in 0..2^32-1 → int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise UnsupportedModelError(what)


def _repack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
            fmt: str, perm: torch.Tensor | None = None) -> Int4Weight:
    """Int4Weight from codes q [K, N] (rows already in storage order), zeros and scales
    [ceil(K/G), N] for checkpoint group G."""
    k = q.shape[0]
    g = storage_group_size(k, group_size)
    mins = -(zeros.float() * scales.float())                        # [groups, N]
    scales16 = scales.to(torch.float16)
    if g != group_size:                                             # per-channel: repeat the one row
        scales16 = scales16.expand(k // g, -1)
        mins = mins.expand(k // g, -1)
    w = pack_int4(q, scales16, mins, g, fmt=fmt)
    w.perm = perm
    return w


def awq_to_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  cfg: QuantCheckpointConfig) -> Int4Weight:
    """One AWQ GEMM layer → Int4Weight. qweight int32 [K, N/8], qzeros int32 [K/G, N/8],
    scales float16 [K/G, N] (ceil(K/G) rows accepted)."""
    k, n = qweight.shape[0], qweight.shape[1] * _PACK
    g = cfg.group_for(k)
    groups = -(-k // g)
    _check(qweight.dtype == qzeros.dtype == torch.int32, f"AWQ qweight/qzeros must be int32, got "
           f"{qweight.dtype}/{qzeros.dtype}")
    _check(tuple(qzeros.shape) == (groups, n // _PACK) and tuple(scales.shape) == (groups, n),
           f"AWQ tensors do not match: qweight {tuple(qweight.shape)} (K={k}, N={n}, group {g}) needs "
           f"qzeros {(groups, n // _PACK)} and scales {(groups, n)}, got {tuple(qzeros.shape)} and "
           f"{tuple(scales.shape)}")
    order = torch.tensor(AWQ_REVERSE_ORDER, device=qweight.device)
    q = _unpack_last(qweight)[..., order].reshape(k, n)             # [K, N]
    z = _unpack_last(qzeros)[..., order].reshape(groups, n)         # [K/G, N]
    return _repack(q, z, scales, g, "awq")


def _act_order_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """None when g_idx is k // G; else the stable sort of rows by group, checked to leave
    every group as G contiguous rows (what GPTQ's act-order produces)."""
    k = g_idx.numel()
    plain = torch.arange(k, device=g_idx.device) // group_size
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, plain):
        return None
    perm = torch.argsort(g_idx, stable=True)
    _check(torch.equal(g_idx[perm], plain),
           f"GPTQ g_idx does not assign {group_size} input channels to each group; cannot repack it")
    return perm


def gptq_to_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor | None, cfg: QuantCheckpointConfig) -> Int4Weight:
    """One GPTQ layer → Int4Weight. qweight int32 [K/8, N], qzeros int32 [ceil(K/G), N/8],
    scales float16 [ceil(K/G), N], g_idx int32 [K] or None (= k // G)."""
    k, n = qweight.shape[0] * _PACK, qweight.shape[1]
    g = cfg.group_for(k)
    groups = -(-k // g)
    _check(qweight.dtype == qzeros.dtype == torch.int32, f"GPTQ qweight/qzeros must be int32, got "
           f"{qweight.dtype}/{qzeros.dtype}")
    _check(tuple(qzeros.shape) == (groups, n // _PACK) and tuple(scales.shape) == (groups, n),
           f"GPTQ tensors do not match: qweight {tuple(qweight.shape)} (K={k}, N={n}, group {g}) needs "
           f"qzeros {(groups, n // _PACK)} and scales {(groups, n)}, got {tuple(qzeros.shape)} and "
           f"{tuple(scales.shape)}")
    _check(g_idx is None or tuple(g_idx.shape) == (k,),
           f"GPTQ g_idx must be [{k}], got {None if g_idx is None else tuple(g_idx.shape)}")
    q = _unpack_last(qweight.t()).reshape(n, k).t()                 # [K, N]
    z = _unpack_last(qzeros).reshape(groups, n) + cfg.zero_offset   # [groups, N]
    perm = None if g_idx is None else _act_order_perm(g_idx, g)
    if perm is not None:
        q = q.index_select(0, perm)
    return _repack(q, z, scales, g, "gptq", perm)


def _check_codes(name: str, v: torch.Tensor, lo: int = 0) -> None:
    if v.numel() and (int(v.min()) < lo or int(v.max()) > 15):
        raise ValueError(f"{name} must hold integers in {lo}..15")


def _pack_words(values: torch.Tensor) -> torch.Tensor:
    """[..., 8] codes → int32 [...]: value i at bits 4i (AutoAWQ/AutoGPTQ: word |= v << 4i)."""
    words = torch.zeros(values.shape[:-1], dtype=torch.int64, device=values.device)
    for i in range(_PACK):
        words |= values[..., i].to(torch.int64) << (4 * i)
    return _to_int32(words)


def pack_awq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AWQ GEMM checkpoint tensors from codes q [K, N], zeros [K/G, N] (integers 0..15) and
    scales [K/G, N]: {"qweight", "qzeros", "scales"}, as AutoAWQ's WQLinear_GEMM.from_linear
    writes them (for each word column c and i in 0..7, word |= col[8c + AWQ_ORDER[i]] << 4i)."""
    _check_codes("q", q)
    _check_codes("zeros", zeros)
    if q.shape[1] % _PACK:
        raise ValueError(f"N must be a multiple of {_PACK}, got q {tuple(q.shape)}")
    order = list(AWQ_ORDER)

    def pack(codes: torch.Tensor) -> torch.Tensor:
        rows, cols = codes.shape
        return _pack_words(codes.reshape(rows, cols // _PACK, _PACK)[..., order])

    return {"qweight": pack(q), "qzeros": pack(zeros), "scales": scales.to(torch.float16).contiguous()}


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
              g_idx: torch.Tensor | None = None, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """GPTQ checkpoint tensors from codes q [K, N] (rows in x's order), zeros and scales
    [ceil(K/G), N] indexed by g_idx [K] (default k // G): {"qweight", "qzeros", "scales",
    "g_idx"}, as AutoGPTQ's QuantLinear.pack writes them (qweight rows of 8 K values, qzeros
    8 N values per word, v1 "gptq" storing zeros - 1). group_size -1 means per-channel.
    v1 cannot store a zero of 0 (AutoGPTQ's packer would corrupt the word): ValueError."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r}")
    k, n = q.shape
    if k % _PACK or n % _PACK:
        raise ValueError(f"K and N must be multiples of {_PACK}, got q {tuple(q.shape)}")
    _check_codes("q", q)
    offset = 1 if checkpoint_format == "gptq" else 0
    _check_codes("zeros", zeros, lo=offset)
    g = k if group_size == -1 else group_size
    if g_idx is None:
        g_idx = torch.arange(k, device=q.device) // g
    qweight = _pack_words(q.t().reshape(n, k // _PACK, _PACK)).t().contiguous()   # [K/8, N]
    stored = zeros.to(torch.int64) - offset
    qzeros = _pack_words(stored.reshape(zeros.shape[0], n // _PACK, _PACK))       # [groups, N/8]
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.to(torch.float16).contiguous(),
            "g_idx": g_idx.to(torch.int32).contiguous()}

"""Weights of one linear layer, fused across checkpoint tensors as they load.

A checkpoint stores q/k/v and gate/up as separate tensors (HF names); the model keeps one
weight per fused projection so each runs as one GEMM. Parts arrive in any order, are
quantized one by one when the engine quantizes on load (int8 / int4 / fp8: per-output-column
scales, so quantizing parts equals quantizing the whole), and are fused when the last one
arrives. Parts that cannot share a kernel (a GGUF file may store q/k/v in different block
types) stay a list, multiplied one by one.
"""

from __future__ import annotations

import torch

from llmesh.engine.model.shard import ShardSpec, own_storage, slice_in_features, slice_out_features
from llmesh.engine.quant.linear import Weight
from llmesh.engine.quant.packed import QuantizedWeight, cat_out_features
from llmesh.engine.quant.quantize import QUANTIZERS


def weight_nbytes(w: Weight | list[Weight] | None) -> int:
    """Bytes in memory, packed weights at their packed size."""
    if w is None:
        return 0
    if isinstance(w, list):
        return sum(weight_nbytes(p) for p in w)
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes()


def fuse_out_features(parts: list[Weight]) -> Weight | list[Weight]:
    """One weight computing all parts' outputs in one GEMM, or the list itself when the
    parts cannot share a kernel."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(w, torch.Tensor) for w in parts):
        return torch.cat(parts, 0).contiguous()
    try:
        return cat_out_features(parts)
    except ValueError:
        return parts


class FusedLinear:
    """y = x @ W^T + b where W stacks ``out_parts`` output blocks (one per checkpoint tensor).

    ``method``: none (float, in the model dtype), int8 / int4 / fp8 (quantize float parts as
    they load), keep (store what the checkpoint holds: packed stays packed, float stays float).

    ``parallel`` (with a ``shard`` of several ranks): column (this rank keeps its range of
    every output block) or row (its range of the input features; the caller all-reduces the
    partial products, and only rank 0 adds the bias). Sizes given are the whole layer's; the
    attributes hold this rank's. A float weight that quantizes on load is quantized whole and
    then sliced, so a shard equals the matching part of the unsharded layer.
    """

    def __init__(self, in_features: int, out_parts: list[int], bias: bool, method: str, *,
                 dtype: torch.dtype, device: torch.device, shard: ShardSpec | None = None,
                 parallel: str | None = None) -> None:
        self.shard = shard if shard is not None and shard.parallel and parallel else None
        self.parallel = parallel if self.shard is not None else None
        self.full_in_features, self.full_out_parts = in_features, list(out_parts)
        if self.parallel == "column":
            out_parts = [b - a for a, b in (self.shard.range(n) for n in out_parts)]
        elif self.parallel == "row":
            a, b = self.shard.range(in_features)
            in_features = b - a
        self.in_features, self.out_parts, self.method = in_features, out_parts, method
        self.has_bias, self.dtype, self.device = bias, dtype, device
        self.weight: Weight | list[Weight] | None = None
        self.bias: torch.Tensor | None = None
        self._weights: list[Weight | None] = [None] * len(out_parts)
        self._biases: list[torch.Tensor | None] = [None] * len(out_parts)

    @property
    def out_features(self) -> int:
        return sum(self.out_parts)

    @property
    def loaded(self) -> bool:
        return self.weight is not None and (self.bias is not None or not self.has_bias)

    def load(self, part: int, kind: str, t: Weight) -> None:
        """Take checkpoint tensor ``kind`` (weight or bias) of output block ``part``.
        Raises ValueError on a shape that does not fit."""
        n, k = self.full_out_parts[part], self.full_in_features
        if kind == "bias":
            if not self.has_bias:
                raise ValueError("is a bias, and this layer has none")
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
                raise ValueError(f"has shape {tuple(getattr(t, 'shape', ()))}, the model expects {(n,)}")
            if self.parallel == "column":
                t = t[slice(*self.shard.range(n))]
            elif self.parallel == "row" and self.shard.rank != 0:
                t = torch.zeros_like(t)  # the partial sums are added up: one rank adds the bias
            self._biases[part] = t.to(device=self.device, dtype=self.dtype)
        elif kind == "weight":
            self._weights[part] = self._shard(self._convert(t, n, k), n, k)
        else:
            raise ValueError(f"is a {kind!r} tensor; a linear layer takes weight and bias")
        if self.weight is None and all(w is not None for w in self._weights):
            self.weight, self._weights = fuse_out_features(self._weights), []
        if self.has_bias and self.bias is None and all(b is not None for b in self._biases):
            self.bias, self._biases = torch.cat(self._biases, 0).contiguous(), []

    def _convert(self, t: Weight, n: int, k: int) -> Weight:
        if isinstance(t, torch.Tensor):
            if tuple(t.shape) != (n, k):
                raise ValueError(f"has shape {tuple(t.shape)}, the model expects {(n, k)}")
            if self.method not in QUANTIZERS:
                t = self._shard(t, n, k)  # only this rank's slice travels to the device
            t = t.to(self.device)
            return QUANTIZERS[self.method](t) if self.method in QUANTIZERS else t.to(self.dtype)
        if not isinstance(t, QuantizedWeight.__args__):
            raise ValueError(f"is a {type(t).__name__}, not a tensor or a packed weight")
        if (t.in_features, t.out_features) != (k, n):
            raise ValueError(f"is a {t.format} weight of {t.in_features} → {t.out_features} features, "
                             f"the model expects {k} → {n}")
        return t.to(self.device)

    def _shard(self, w: Weight, n: int, k: int) -> Weight:
        """This rank's slice of a whole part (itself when already sliced or unsharded)."""
        if self.parallel is None:
            return w
        rows, cols = (w.shape if isinstance(w, torch.Tensor) else (w.out_features, w.in_features))
        if (rows, cols) != (n, k):
            return w
        if self.parallel == "column":
            part = slice_out_features(w, *self.shard.range(n))
        else:
            part = slice_in_features(w, *self.shard.range(k))
        return own_storage(part) if isinstance(part, torch.Tensor) else part.map_tensors(own_storage)

    def nbytes(self) -> int:
        return weight_nbytes(self.weight) + weight_nbytes(self.bias)

    def __repr__(self) -> str:
        w = self.weight
        kind = ("unloaded" if w is None else "dense" if isinstance(w, torch.Tensor)
                else "+".join(p.format if not isinstance(p, torch.Tensor) else "dense" for p in w)
                if isinstance(w, list) else w.format)
        return f"FusedLinear({self.in_features} → {self.out_parts}, {self.method}: {kind})"

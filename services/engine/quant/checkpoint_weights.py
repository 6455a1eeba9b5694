"""AWQ / GPTQ checkpoints streamed as (name.weight, Int4Weight) pairs.

Their safetensors hold each linear layer as several tensors (qweight, qzeros, scales and,
for GPTQ, g_idx) that may be stored in any order and across shards; this gathers them per
layer and converts the layer as soon as its last part has been read, so at most a few
layers' worth of packed tensors are buffered.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llmesh.engine.errors import ModelLoadError
from llmesh.engine.loader.hf_folder import SafetensorsWeights
from llmesh.engine.quant.awq_gptq import QuantCheckpointConfig, awq_to_weight, gptq_to_weight
from llmesh.engine.quant.packed import Int4Weight

PARTS = ("qweight", "qzeros", "scales", "g_idx")


class PackedCheckpointWeights:
    def __init__(self, weights: SafetensorsWeights, cfg: QuantCheckpointConfig) -> None:
        self._weights, self._cfg = weights, cfg
        self._parts: dict[str, set[str]] = {}
        for name in weights.names:
            prefix, _, part = name.rpartition(".")
            if part in PARTS:
                self._parts.setdefault(prefix, set()).add(part)
        for prefix, parts in self._parts.items():
            missing = {"qweight", "qzeros", "scales"} - parts
            if missing:
                raise ModelLoadError(f"{cfg.method.upper()} layer {prefix!r} lacks " + ", ".join(sorted(missing)))

    def __len__(self) -> int:
        return len(self._weights) - sum(len(p) - 1 for p in self._parts.values())

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self._weights:
            prefix, _, part = name.rpartition(".")
            if prefix not in self._parts or part not in PARTS:
                yield name, tensor
                continue
            got = pending.setdefault(prefix, {})
            got[part] = tensor
            if len(got) == len(self._parts[prefix]):
                del pending[prefix]
                yield f"{prefix}.weight", self._convert(prefix, got)

    def _convert(self, prefix: str, t: dict[str, torch.Tensor]) -> Int4Weight:
        try:
            if self._cfg.method == "awq":
                return awq_to_weight(t["qweight"], t["qzeros"], t["scales"], self._cfg)
            return gptq_to_weight(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), self._cfg)
        except ValueError as exc:
            raise ModelLoadError(f"{self._cfg.method.upper()} layer {prefix!r}: {exc}") from exc

"""FP8 checkpoints: the E4M3 weights a float model was quantized to offline, served as they are.

Two writers make almost all of them, and both store each linear layer's ``weight`` as
float8_e4m3fn [N, K] beside its scale:

compressed-tensors (llm-compressor; RedHat's ``*-FP8-dynamic`` / ``*-FP8`` models)
    quantization_config: {"quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8,
    "type": "float", "strategy": "channel" | "tensor"}, "input_activations": {...}}},
    "ignore": ["lm_head", ...], "kv_cache_scheme": ...}
    tensors: ``weight_scale`` float [N, 1] (channel) or [1] / [] (tensor); ``input_scale`` for
    static activation scales; ``k_scale`` / ``v_scale`` with a kv_cache_scheme. The ignored
    modules are stored in float and pass through as float tensors.

"fp8" (AutoFP8, and Transformers' fine-grained FP8 of Qwen3-*-FP8 and DeepSeek-V3)
    quantization_config: {"quant_method": "fp8", "activation_scheme": "dynamic" | "static",
    "weight_block_size": [128, 128] (fine-grained only)}
    tensors: ``weight_scale`` [] per tensor (AutoFP8), or ``weight_scale_inv`` float32
    [ceil(N/128), ceil(K/128)] one scale per 128 x 128 block (fine-grained; despite the name it
    multiplies: w = q * s, as the writers' own dequantization does).

Per-tensor and per-channel weights become Fp8Weight (one scale per output channel: a tensor's
scale repeated, exact) and run the same kernels as ``quantization="fp8"`` quantized on load.
Activations are quantized per token at run time (dynamic). A static checkpoint's ``input_scale``
is one scale for every token; the per-token scale is never coarser, so it is read and dropped
rather than applied; likewise the KV scales (kv_cache_dtype="fp8" scales per token and head).
Block-scaled weights keep their blocks (Fp8BlockWeight) and multiply
activations quantized per token and 128-channel group (llmesh/kernels/block_fp8_gemm.py), the
scheme they were calibrated for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llmesh.engine.errors import ModelLoadError, UnsupportedModelError
from llmesh.engine.loader.hf_folder import SafetensorsWeights
from llmesh.engine.quant.packed import Fp8BlockWeight, Fp8Weight

log = logging.getLogger(__name__)

FP8_METHODS = ("fp8", "compressed-tensors")
"""quantization_config quant_method values that hold FP8 weights (compressed-tensors: when its
scheme is an 8-bit float one)."""
WEIGHT_STRATEGIES = ("tensor", "channel", "block")
SCALE_PARTS = ("weight_scale", "weight_scale_inv")
DROPPED_PARTS = ("input_scale", "k_scale", "v_scale", "output_scale")
"""Static activation and KV scales: activations are quantized per token (and the KV pool per
token and head) at run time, from the values themselves."""


@dataclass(frozen=True)
class Fp8CheckpointConfig:
    """How an FP8 checkpoint's weights are scaled, from its ``quantization_config``."""

    writer: str                          # "compressed-tensors" | "fp8"
    strategy: str                        # tensor | channel | block
    block: tuple[int, int] = (0, 0)      # (rows, columns) of a weight block; block strategy only
    activations: str = "dynamic"         # dynamic | static (static scales are dropped, see the module doc)


def is_fp8_checkpoint(d: dict | None) -> bool:
    """Whether config.json's quantization_config describes FP8 weights (compressed-tensors
    configs of other schemes are refused by parse_fp8_config, with what they hold)."""
    return bool(d) and str(d.get("quant_method", "")).lower() in FP8_METHODS


def parse_fp8_config(d: dict) -> Fp8CheckpointConfig:
    """Fp8CheckpointConfig from a quantization_config; UnsupportedModelError names what llmesh
    cannot serve (another compressed-tensors scheme, another float format, a block shape)."""
    method = str(d.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = str(d.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise UnsupportedModelError(f"FP8 checkpoint fmt={d.get('fmt')!r}: llmesh serves E4M3 weights only")
        activations = _activation_scheme(d.get("activation_scheme", "dynamic"))
        block = d.get("weight_block_size")
        if block is None:
            return Fp8CheckpointConfig("fp8", "tensor", activations=activations)
        return Fp8CheckpointConfig("fp8", "block", _block_shape(block), activations)
    if method != "compressed-tensors":
        raise UnsupportedModelError(f"quantization_config quant_method={d.get('quant_method')!r} is not an FP8 "
                                    f"checkpoint")
    fmt = str(d.get("format", "")).lower()
    groups = d.get("config_groups") or {}
    if fmt != "float-quantized" or len(groups) != 1:
        raise UnsupportedModelError(
            f"compressed-tensors checkpoint format={d.get('format')!r} with {len(groups)} config group(s): llmesh "
            f"serves only 'float-quantized' FP8 checkpoints with one scheme (W8A8 FP8, e.g. *-FP8-dynamic); "
            f"for 4-bit weights use an AWQ or GPTQ checkpoint")
    scheme = next(iter(groups.values()))
    w = scheme.get("weights") or {}
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise UnsupportedModelError(f"compressed-tensors weights {w.get('num_bits')}-bit {w.get('type')!r}: llmesh "
                                    f"serves 8-bit float (FP8) weights from compressed-tensors checkpoints")
    strategy = str(w.get("strategy", "")).lower()
    if strategy not in WEIGHT_STRATEGIES:
        raise UnsupportedModelError(f"compressed-tensors FP8 weight strategy {w.get('strategy')!r} is not supported "
                                    f"(supported: {', '.join(WEIGHT_STRATEGIES)})")
    block = _block_shape(w.get("block_structure")) if strategy == "block" else (0, 0)
    acts = scheme.get("input_activations")
    if acts is not None and (acts.get("type") != "float" or acts.get("num_bits") != 8):
        raise UnsupportedModelError(f"compressed-tensors input activations {acts.get('num_bits')}-bit "
                                    f"{acts.get('type')!r}: llmesh serves FP8 weights with FP8 activations or none")
    activations = "dynamic" if acts is None or acts.get("dynamic", True) else "static"
    return Fp8CheckpointConfig("compressed-tensors", strategy, block, activations)


def _activation_scheme(v: object) -> str:
    s = str(v).lower()
    if s not in ("dynamic", "static"):
        raise UnsupportedModelError(f"FP8 checkpoint activation_scheme={v!r}: expected 'dynamic' or 'static'")
    return s


def _block_shape(v: object) -> tuple[int, int]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(b, int) and b > 0 and b & (b - 1) == 0 and b >= 16 for b in v)):
        raise UnsupportedModelError(f"FP8 weight block size {v!r}: expected two powers of two >= 16, e.g. [128, 128]")
    return int(v[0]), int(v[1])


def fp8_checkpoint_weight(q: torch.Tensor, scale: torch.Tensor, cfg: Fp8CheckpointConfig) -> Fp8Weight | Fp8BlockWeight:
    """One layer's stored weight [N, K] and scale → the weight the kernels take; ValueError
    when the shapes disagree with the config."""
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise ValueError(f"weight is {q.dtype} {tuple(q.shape)}, expected float8_e4m3fn [N, K]")
    n, k = q.shape
    s = scale.to(torch.float32)
    if cfg.strategy == "block":
        bn, bk = cfg.block
        want = (-(-n // bn), -(-k // bk))
        if tuple(s.shape) != want:
            raise ValueError(f"block scales {tuple(s.shape)}, expected {want} for weight {(n, k)} in {bn}x{bk} blocks")
        return Fp8BlockWeight(q.contiguous(), s.contiguous(), cfg.block)
    if s.numel() == 1:
        return Fp8Weight(q.contiguous(), s.reshape(1).expand(n).contiguous())
    if s.numel() != n or (s.dim() == 2 and s.shape[1] != 1):
        raise ValueError(f"scale {tuple(s.shape)}, expected one per output channel ({n}) or one for the tensor")
    return Fp8Weight(q.contiguous(), s.reshape(n).contiguous())


class Fp8CheckpointWeights:
    """The checkpoint's tensors with each FP8 layer's weight and scale joined into one packed
    weight under ``<layer>.weight``; static activation and KV scales dropped; float tensors (the
    layers the writer ignored, norms, embeddings) as they are."""

    def __init__(self, weights: SafetensorsWeights, cfg: Fp8CheckpointConfig) -> None:
        self._weights, self._cfg = weights, cfg
        names = set(weights.names)
        self._scaled = {n.rpartition(".")[0] for n in names if n.rpartition(".")[2] in SCALE_PARTS}
        for prefix in self._scaled:
            if f"{prefix}.weight" not in names:
                raise ModelLoadError(f"FP8 checkpoint layer {prefix!r} has a weight scale but no weight")
        self._dropped = sum(1 for n in names if n.rpartition(".")[2] in DROPPED_PARTS)
        if self._dropped:
            log.info("FP8 checkpoint: its static activation / KV scales are not used; activations are quantized per "
                     "token at run time",
                     extra={"writer": cfg.writer, "dropped_scales": self._dropped, "activations": cfg.activations})

    def __len__(self) -> int:
        return len(self._weights) - len(self._scaled) - self._dropped

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | Fp8Weight | Fp8BlockWeight]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self._weights:
            prefix, _, part = name.rpartition(".")
            if part in DROPPED_PARTS:
                continue
            if prefix not in self._scaled or part not in ("weight", *SCALE_PARTS):
                if tensor.dtype == torch.float8_e4m3fn:
                    raise ModelLoadError(f"FP8 checkpoint tensor {name!r} is float8 but has no weight scale")
                yield name, tensor
                continue
            got = pending.setdefault(prefix, {})
            got["scale" if part in SCALE_PARTS else "weight"] = tensor
            if len(got) == 2:
                del pending[prefix]
                try:
                    yield f"{prefix}.weight", fp8_checkpoint_weight(got["weight"], got["scale"], self._cfg)
                except ValueError as exc:
                    raise ModelLoadError(f"FP8 checkpoint layer {prefix!r}: {exc}") from exc

"""Which quantization an engine serves, decided once from the request, the checkpoint and
the device, with an error that names what is missing when it cannot be served."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from llmesh.engine.errors import UnsupportedModelError

log = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "none", "int8", "int4", "fp8", "w4a8", "gguf", "awq", "gptq")
"""auto: what the checkpoint holds (AWQ/GPTQ/FP8 as such, GGUF blocks kept on a GPU), else none.
none: full precision (a GGUF is dequantized). int8 / int4 / fp8 / w4a8: quantize on load
(w4a8: INT4 weights for FP8 activations, FBGEMM's kernel).
gguf / awq / gptq: serve the checkpoint's own quantized tensors (fp8 does too, for an FP8
checkpoint: fp8_checkpoint.py)."""

GGUF_KEPT_TYPES = frozenset({"Q8_0", "Q4_0", "Q4_1"})
"""GGUF block types served as they are; other types in a kept file are dequantized on load."""

CHECKPOINT_METHODS = ("awq", "gptq", "fp8")
"""Checkpoints whose quantized tensors are served as stored (fp8: compressed-tensors and fp8 writers)."""
CHECKPOINT_ONLY = ("awq", "gptq")
"""Quantizations that need such a checkpoint (fp8 also quantizes a float model on load)."""


@dataclass(frozen=True)
class QuantSpec:
    name: str
    """What is served: none, int8, int4, fp8, w4a8, gguf, awq or gptq."""
    linear_method: str
    """How the model's linear layers load: none (plain nn.Linear), int8 / int4 / fp8 / w4a8
    (quantize float weights on load; fp8 also serves an FP8 checkpoint, whose packed weights
    are stored as they come) or keep (store packed checkpoint tensors as they come)."""

    @property
    def quantized(self) -> bool:
        return self.linear_method != "none"


_ACTIVATION_FORMAT_NEEDS = {
    "fp8": "an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper)",
    "w4a8": "FBGEMM's kernel on an NVIDIA Hopper GPU",
}
"""The formats that quantize activations to FP8, and what runs them."""


def _activation_format_problem(req: str, device: torch.device, backend: str) -> str | None:
    if device.type == "cpu":
        if backend == "torch":
            return None
        return (f"quantization {req!r} needs {_ACTIVATION_FORMAT_NEEDS[req]}; on the CPU only the torch backend "
                f"can emulate it (--backend torch)")
    if req == "fp8":
        from llmesh.kernels.fp8_gemm import fp8_support

        return fp8_support(device)
    from llmesh.engine.quant.fbgemm_kernels import unavailable_reason

    if (why := unavailable_reason()) is not None:
        return f"quantization 'w4a8' needs FBGEMM's W4A8 kernel: {why} (pip install 'llmesh[gpu]')"
    return None


def resolve_quantization(requested: str | None, *, model: str, source_format: str,
                         checkpoint_method: str | None, device: torch.device, backend: str) -> QuantSpec:
    """``checkpoint_method``: awq/gptq for a pre-quantized HF checkpoint, else None."""
    req = (requested or "auto").lower()
    if req not in QUANTIZATION_CHOICES:
        raise UnsupportedModelError(f"quantization {requested!r} is not supported; choose one of "
                                    + ", ".join(QUANTIZATION_CHOICES))
    if checkpoint_method is not None:
        if checkpoint_method not in CHECKPOINT_METHODS:
            raise UnsupportedModelError(
                f"{model} is quantized with {checkpoint_method!r}; llmesh serves AWQ, GPTQ and FP8 checkpoints, "
                f"or float checkpoints quantized on load (int8, int4, fp8)")
        if req in ("auto", checkpoint_method):
            if checkpoint_method in _ACTIVATION_FORMAT_NEEDS:
                problem = _activation_format_problem(checkpoint_method, device, backend)
                if problem is not None:
                    raise UnsupportedModelError(f"{model} is an FP8 checkpoint: {problem}")
                # The fp8 method takes the checkpoint's packed weights as they come and gives the
                # routed experts FP8 storage (which "keep" would leave in the model dtype).
                return QuantSpec(checkpoint_method, checkpoint_method)
            return QuantSpec(checkpoint_method, "keep")
        raise UnsupportedModelError(
            f"{model} is a {checkpoint_method.upper()} checkpoint; it is served as quantization="
            f"'{checkpoint_method}' (or 'auto'), not {req!r}")
    if req in CHECKPOINT_ONLY:
        raise UnsupportedModelError(
            f"quantization={req!r} needs a {req.upper()} checkpoint (config.json with quantization_config."
            f"quant_method = {req!r}); {model} has none. To quantize a float model on load use int4 or int8")
    if req == "gguf" or (req == "auto" and source_format == "gguf" and device.type == "cuda"):
        if source_format != "gguf":
            raise UnsupportedModelError(
                f"quantization='gguf' keeps a GGUF file's quantized blocks; {model} is not a GGUF file. "
                f"To quantize it on load use int8, int4 or fp8")
        return QuantSpec("gguf", "keep")
    if req == "auto":
        # A GGUF on the CPU is dequantized: there are no compiled CPU kernels, and dense
        # float32 matmuls are the fast path there.
        return QuantSpec("none", "none")
    if req in _ACTIVATION_FORMAT_NEEDS:
        problem = _activation_format_problem(req, device, backend)
        if problem is not None:
            raise UnsupportedModelError(problem)
        if device.type == "cpu":
            log.warning(f"{req} on the CPU: the torch backend emulates it in float32 (for quality checks, not speed)")
    return QuantSpec(req, req)

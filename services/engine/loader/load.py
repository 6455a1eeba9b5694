"""Model loading from local files: a Hugging Face folder or a GGUF file, never a hub.

    loaded = load_model("/models/Llama-3.2-1B-Instruct")       # HF folder
    loaded = load_model(find_demo_model())                      # SmolLM2-135M GGUF
    for hf_name, tensor in loaded.weights: ...

Both formats come out the same way: a ModelConfig, weights under HF names in HF layout
(GGUF dequantized to float32), and where the tokenizer lives. ``weights_for(spec)`` gives
them as a quantization loads them instead: GGUF blocks, AWQ/GPTQ or FP8 tensors kept packed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmesh.engine.errors import ModelLoadError
from llmesh.engine.loader.gguf_file import GGUFFile, GGUFWeights, gguf_model_config, open_gguf
from llmesh.engine.loader.gguf_tokenizer import GGUFTokenizerData, gguf_tokenizer_data
from llmesh.engine.loader.hf_config import model_config_from_hf
from llmesh.engine.loader.hf_folder import SafetensorsWeights, read_config_json
from llmesh.engine.model.config import ModelConfig
from llmesh.engine.quant.config import QuantSpec
from llmesh.engine.quant.packed import QuantizedWeight
from llmesh.engine.loader.random_weights import PREFIX as RANDOM_PREFIX
from llmesh.engine.loader.random_weights import RandomWeights, random_model_config, random_tokenizer_data
from llmesh.demo_model import DEMO_FILE as DEMO_MODEL_FILE, find_demo_model  # noqa: F401 (re-exported)

GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedModel:
    """A model ready to build: its config, its weights (lazy) and its tokenizer's source."""

    config: ModelConfig
    weights: Iterable[tuple[str, torch.Tensor]]
    """HF names, produced lazily one tensor at a time; float tensors in the source dtype
    (GGUF: float32, already dequantized and in HF layout). Re-iterable; len() works."""
    tokenizer_source: GGUFTokenizerData | str
    """The tokenizer rebuilt from GGUF metadata, or the HF folder path (tokenizer.json and
    tokenizer_config.json live there)."""
    source_format: str
    """"hf", "gguf" or "random"."""
    quantization_config: dict | None = None
    """config.json's quantization_config: the checkpoint's tensors are already quantized."""
    gguf: GGUFFile | None = None

    @property
    def checkpoint_method(self) -> str | None:
        """awq / gptq / fp8 (or another quant_method, refused when the engine resolves it). An FP8
        checkpoint's scheme is checked here, so one llmesh cannot serve fails before loading."""
        if not self.quantization_config:
            return None
        from llmesh.engine.quant.fp8_checkpoint import is_fp8_checkpoint, parse_fp8_config

        if is_fp8_checkpoint(self.quantization_config):
            parse_fp8_config(self.quantization_config)  # refuses a scheme llmesh cannot serve
            return "fp8"
        return str(self.quantization_config.get("quant_method", "unknown")).lower()

    def weights_for(self, spec: QuantSpec) -> Iterable[tuple[str, torch.Tensor | QuantizedWeight]]:
        """The weights as the resolved quantization loads them."""
        if spec.name == "gguf":
            return GGUFWeights(self.gguf, self.config, keep_quantized=True)
        if spec.name in ("awq", "gptq"):
            from llmesh.engine.quant.awq_gptq import parse_quant_config
            from llmesh.engine.quant.checkpoint_weights import PackedCheckpointWeights

            return PackedCheckpointWeights(self.weights, parse_quant_config(self.quantization_config))
        if spec.name == "fp8" and self.checkpoint_method == "fp8":
            from llmesh.engine.quant.fp8_checkpoint import Fp8CheckpointWeights, parse_fp8_config

            return Fp8CheckpointWeights(self.weights, parse_fp8_config(self.quantization_config))
        return self.weights


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc


def _load_hf(folder: Path, name: str) -> LoadedModel:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is a folder without config.json; expected a Hugging Face model folder "
            f"(config.json, *.safetensors, tokenizer.json) or the path of a .gguf file")
    raw = read_config_json(folder)
    config = model_config_from_hf(raw, name)
    return LoadedModel(config=config, weights=SafetensorsWeights(folder), tokenizer_source=str(folder),
                       source_format="hf", quantization_config=raw.get("quantization_config"))


def _load_gguf(file: Path, name: str) -> LoadedModel:
    if not _is_gguf(file):
        raise ModelLoadError(
            f"{file} is not a GGUF file (it does not start with the GGUF magic); expected a .gguf "
            f"file or a Hugging Face model folder")
    gguf = open_gguf(str(file))
    config = gguf_model_config(gguf, name)
    weights = GGUFWeights(gguf, config)
    tokenizer = gguf_tokenizer_data(gguf.metadata)
    return LoadedModel(config=config, weights=weights, tokenizer_source=tokenizer, source_format="gguf", gguf=gguf)


def load_model(path: str, *, name: str | None = None) -> LoadedModel:
    """Open a local model. ``name`` is the served model name (default: the folder name or the
    file name without .gguf). Checks config, tensor names and tensor types before returning,
    so an unsupported model fails here rather than halfway through building."""
    if path.startswith(RANDOM_PREFIX):
        config = random_model_config(path, name)
        return LoadedModel(config=config, weights=RandomWeights(config), tokenizer_source=random_tokenizer_data(config),
                           source_format="random")
    model_path = Path(path).expanduser()
    if not model_path.exists():
        raise ModelLoadError(f"model path {model_path} does not exist")
    if model_path.is_dir():
        return _load_hf(model_path, name or model_path.name)
    return _load_gguf(model_path, name or model_path.stem)



"""EngineConfig is the one source of the engine's options: every leaf field is a flag (and
its LLMESH_ENGINE_* variable), a models-file key and an LLM keyword argument, with the same
name and the same default; unknown names and wrong types fail with the valid names listed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from llmesh.config import MISSING, UnknownOptionError, load_config, options
from llmesh.engine import EngineConfig, LLMEngine, SamplingParams, build_engine_config
from llmesh.engine.service.config import EngineServiceConfig
from llmesh.launcher import UpConfig, engine_env
from llmesh.models_file import SET_BY_SPEC, ModelsFileError, parse_models

ENGINE_OPTIONS = options(EngineConfig)

# A valid value other than the default for every option: a new option must be added here,
# so the round trips below cover it.
SAMPLES = {
    "model": "/models/m", "served_model_name": "m2", "dtype": "float16", "device": "cpu", "backend": "triton",
    "cuda_graphs": False, "quantization": "int8", "async_scheduling": True, "seed": 7, "max_model_len": 1024,
    "block_size": 32, "kv_cache_memory": 1 << 28, "gpu_memory_utilization": 0.5, "num_kv_blocks": 100,
    "enable_prefix_caching": False, "kv_cache_dtype": "fp8", "max_num_batched_tokens": 4096, "max_num_seqs": 8,
    "enable_chunked_prefill": False, "max_waiting_requests": 4, "tensor_parallel_size": 2,
    "enable_expert_parallel": True, "pooling": "mean", "normalize": True, "matryoshka": True,
    "speculative_method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5, "prompt_lookup_min": 2,
    "speculative_model": "/models/draft", "speculative_disable_batch_size": 4,
    "activation_aware": True, "calibration_text": "/texts/calib.txt",
}
VLLM_NAMES = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "enable_prefix_caching",
              "enable_chunked_prefill", "block_size", "num_kv_blocks", "kv_cache_memory", "max_model_len", "dtype",
              "device", "backend", "quantization", "seed", "cuda_graphs", "async_scheduling", "served_model_name",
              "tensor_parallel_size", "enable_expert_parallel", "kv_cache_dtype")


@pytest.fixture(autouse=True)
def _no_engine_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("LLMESH_ENGINE_"):
            monkeypatch.delenv(k)


def _text(value) -> str:
    """A value as a flag or variable spells it (and as the launcher writes it)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _get(cfg: EngineConfig, name: str):
    value = cfg
    for part in ENGINE_OPTIONS[name].path:
        value = getattr(value, part)
    return value


def test_every_option_has_a_sample_and_the_known_flat_names_stay():
    assert set(SAMPLES) == set(ENGINE_OPTIONS)
    assert set(VLLM_NAMES) <= set(ENGINE_OPTIONS)
    for name, value in SAMPLES.items():
        assert value != ENGINE_OPTIONS[name].default, name


def test_defaults_are_the_same_for_flags_kwargs_and_the_dataclasses():
    from_flags = load_config(EngineServiceConfig, ["--model", "/models/m"], service="engine").engine
    from_kwargs = build_engine_config("/models/m")
    assert from_flags == from_kwargs == EngineConfig(model="/models/m")
    service = options(EngineServiceConfig)
    for name, opt in ENGINE_OPTIONS.items():
        assert service[name].path == ("engine", *opt.path)
        assert service[name].help == opt.help
        if name != "model":  # the service serves the demo model by default; LLM needs a path
            assert service[name].default == opt.default
            assert _get(from_kwargs, name) == opt.default
    assert service["model"].default == "demo" and ENGINE_OPTIONS["model"].default is MISSING


@pytest.mark.parametrize("name", list(SAMPLES))
def test_option_round_trips_as_flag_env_var_kwarg_and_models_file_key(name, monkeypatch):
    value = SAMPLES[name]
    base = ["--model", "/models/m"] if name != "model" else []
    from_kwarg = build_engine_config(**{"model": "/models/m", name: value})
    assert _get(from_kwarg, name) == value
    opt = options(EngineServiceConfig)[name]
    from_flag = load_config(EngineServiceConfig, [*base, opt.flag, _text(value)], service="engine").engine
    assert from_flag == from_kwarg
    monkeypatch.setenv(opt.env("engine"), _text(value))
    assert load_config(EngineServiceConfig, base, service="engine").engine == from_kwarg
    monkeypatch.delenv(opt.env("engine"))
    if name in SET_BY_SPEC:
        return
    # models file → `llmesh up`'s engine environment → the engine's config
    spec = parse_models({"models": [{"name": "m", "path": "/models/m", "engine": {name: value}}]}).models[0]
    for key, text in engine_env(spec, 0, "127.0.0.1:5", UpConfig(), 0).items():
        monkeypatch.setenv(key, text)
    from_file = load_config(EngineServiceConfig, [], service="engine").engine
    assert from_file == build_engine_config("/models/m", served_model_name="m", **{name: value})


def test_help_shows_every_engine_option_with_its_default_and_help():
    out = subprocess.run([sys.executable, "-m", "llmesh.engine.service.main", "--help"],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("LLMESH_ENGINE_")})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for opt in options(EngineServiceConfig).values():
        assert f"{opt.flag} " in text
        assert f"{' '.join(opt.help.split())} (env {opt.env('engine')}; default: {opt.default!r})" in text, opt.name


def test_unknown_kwarg_names_it_and_lists_the_valid_ones():
    with pytest.raises(UnknownOptionError) as e:
        build_engine_config("/models/m", max_num_seq=8)
    msg = str(e.value)
    assert "'max_num_seq' (did you mean 'max_num_seqs'?)" in msg
    assert all(name in msg for name in ENGINE_OPTIONS)
    with pytest.raises(TypeError, match="max_num_seqs must be int, got '8'"):
        build_engine_config("/models/m", max_num_seqs="8")
    with pytest.raises(TypeError, match="no_such_option"):
        from llmesh.engine import LLM

        LLM("/models/m", no_such_option=1)


def test_unknown_models_file_key_names_it_and_lists_the_valid_ones():
    def parse(engine):
        return parse_models({"models": [{"name": "m", "path": "p", "engine": engine}]}, where="models.yaml")

    with pytest.raises(ModelsFileError) as e:
        parse({"dtype": "float32", "chunked_prefill": False})
    msg = str(e.value)
    assert msg.startswith("models.yaml: models[0].engine: unknown option 'chunked_prefill'")
    assert all(name in msg for name in ENGINE_OPTIONS if name not in SET_BY_SPEC)
    with pytest.raises(ModelsFileError, match="model cannot be set here: it is the model's 'path'"):
        parse({"model": "other"})
    with pytest.raises(ModelsFileError, match="gpu_memory_utilization must be float, got 'high'"):
        parse({"gpu_memory_utilization": "high"})
    assert parse({"enable_chunked_prefill": False, "gpu_memory_utilization": 0.5, "num_kv_blocks": None}).models


def _engine_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMESH_ENGINE_")}
    return subprocess.run([sys.executable, "-m", "llmesh.engine.service.main", "--device", "cpu",
                           "--dtype", "float32", "--port", "0", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_new_flags_parse_and_validate(monkeypatch):
    cfg = load_config(EngineServiceConfig, ["--gpu-memory-utilization", "0.25", "--enable-chunked-prefill", "false",
                                            "--max-num-batched-tokens", "4096"], service="engine").engine
    assert cfg.cache.gpu_memory_utilization == 0.25 and cfg.scheduler.enable_chunked_prefill is False
    # a bare boolean flag means true, as in vLLM
    monkeypatch.setenv("LLMESH_ENGINE_ENABLE_CHUNKED_PREFILL", "false")
    assert load_config(EngineServiceConfig, [], service="engine").engine.scheduler.enable_chunked_prefill is False
    bare = load_config(EngineServiceConfig, ["--enable-chunked-prefill"], service="engine").engine
    assert bare.scheduler.enable_chunked_prefill is True
    monkeypatch.delenv("LLMESH_ENGINE_ENABLE_CHUNKED_PREFILL")
    out = _engine_cli("--gpu-memory-utilization", "1.5")
    assert out.returncode == 2 and "gpu_memory_utilization must be in (0, 1], got 1.5" in out.stderr
    out = _engine_cli("--enable-chunked-prefill", "maybe")
    assert out.returncode == 2 and "expected true or false, got 'maybe'" in out.stderr
    out = _engine_cli("--enable-chunked-prefill", "false", "--max-model-len", "512", "--max-num-batched-tokens", "256")
    assert out.returncode == 2 and "without chunked prefill, max_num_batched_tokens (256)" in out.stderr


def test_tensor_parallel_size_is_validated():
    assert build_engine_config("/models/m", tensor_parallel_size=4).tensor_parallel_size == 4
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be an integer in \[1, 64\], got 0"):
        build_engine_config("/models/m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="'draft' does not run with tensor_parallel_size > 1"):
        build_engine_config("/models/m", tensor_parallel_size=2, speculative_method="draft",
                            speculative_model="/models/d")
    out = _engine_cli("--tensor-parallel-size", "-1")
    assert out.returncode == 2 and "tensor_parallel_size must be an integer in [1, 64], got -1" in out.stderr


def test_kv_cache_dtype_accepts_vllms_fp8_e4m3():
    assert build_engine_config("/models/m", kv_cache_dtype="fp8_e4m3").cache.kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, got 'int8'"):
        build_engine_config("/models/m", kv_cache_dtype="int8")


def _step_once(tiny_llama: str, chunked: bool) -> LLMEngine:
    engine = LLMEngine(build_engine_config(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=64,
                                           max_model_len=256, max_num_batched_tokens=256,
                                           enable_chunked_prefill=chunked))
    for i in range(2):
        engine.add_request([10 + i] * 150, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    engine.step()
    return engine


def test_enable_chunked_prefill_decides_whether_a_prefill_is_split(tiny_llama):
    # two 150-token prompts, a 256-token budget: chunked, the second starts with a 106-token chunk
    chunked = _step_once(tiny_llama, True)
    assert (chunked.scheduler.num_running, chunked.scheduler.num_waiting) == (2, 0)
    whole = _step_once(tiny_llama, False)
    assert (whole.scheduler.num_running, whole.scheduler.num_waiting) == (1, 1)
    for engine in (chunked, whole):
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.kv.num_used_blocks == 0


def test_without_chunked_prefill_the_resolved_window_must_fit_the_budget(tiny_llama):
    # no max_model_len: the model's own window (1024) only becomes known at load
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(512\) must be ≥ max_model_len \(1024\)"):
        LLMEngine(build_engine_config(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=16,
                                      max_num_batched_tokens=512, enable_chunked_prefill=False))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the KV pool fraction applies on a GPU")
def test_gpu_memory_utilization_sizes_the_kv_pool(tiny_llama):
    def blocks(fraction: float) -> int:
        engine = LLMEngine(build_engine_config(tiny_llama, dtype="bfloat16", device="cuda",
                                               gpu_memory_utilization=fraction))
        n = engine.runner.num_blocks
        del engine
        __import__("torch").cuda.empty_cache()
        return n

    small, large = blocks(0.05), blocks(0.1)
    assert 1.8 < large / small < 2.2


def test_derived_fields_are_not_options():
    # the scheduler's window is resolved from the model; users set EngineConfig.max_model_len
    assert ENGINE_OPTIONS["max_model_len"].path == ("max_model_len",)
    assert "max_model_len" in {f.name for f in dataclasses.fields(type(EngineConfig(model="m").scheduler))}

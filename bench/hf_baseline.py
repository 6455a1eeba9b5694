"""Baseline: Hugging Face transformers `generate` on the engine's offline workload.

What a user gets without a serving engine: LlamaForCausalLM of the same shapes (random
bf16 weights, built directly on the GPU), greedy `generate` over static batches. Prompts
are sorted by input length before batching (a user knows prompt lengths, so this is the
generous baseline: less left padding), each batch is left-padded and runs to its longest
requested output (min_new_tokens = max_new_tokens, so nothing stops early), with HF's
default dynamic KV cache and SDPA attention.

Throughput counts each request's own output tokens (`hf_offline_out_tok_s`, what users
receive); `hf_offline_generated_tok_s` counts every token generated, padding rows included.

Usage: python bench/hf_baseline.py [--model random:llama3-8b] [--num-prompts 256] [--batch-size 64]
Writes bench/results/hf_baseline_<size>_<dev>.json. bench/decode_gpu.py --hf-baseline runs it in-process.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from gpu_ceilings import device_name, device_tag, pick_device, results_dir_for, rounded, software_versions
from llmesh.bench_results import write_result
from llmesh.engine.loader.random_weights import PRESETS, random_model_config
from llmesh.engine.model.config import ModelConfig


def hf_llama_config(cfg: ModelConfig):
    """The transformers LlamaConfig of the same shapes (RoPE scaling left out: it costs no time)."""
    from transformers import LlamaConfig

    if cfg.architecture != "llama":
        raise ValueError(f"the HF baseline builds Llama models; got architecture {cfg.architecture!r}")
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        pad_token_id=0)


def build_hf_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """Random weights (HF's own normal init), created on `device` in `dtype`: no CPU copy, no fp32 pass."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_llama_config(cfg), dtype=dtype)
    return model.eval()


def left_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): [B, L], prompts right-aligned, pad id 0 with mask 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], new_tokens: int, device: torch.device) -> int:
    """Greedy generate of exactly `new_tokens` for every prompt; returns the tokens generated."""
    ids, mask = left_padded(prompts, device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    got = out.shape[1] - ids.shape[1]
    if got != new_tokens:
        raise RuntimeError(f"HF generate produced {got} new tokens, expected {new_tokens}")
    return got * len(prompts)


def hf_offline_throughput(prompts: Sequence[Sequence[int]], outputs: Sequence[int], batch_size: int, *,
                          model_config: ModelConfig | None = None, device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.bfloat16, max_seconds: float | None = None) -> dict[str, float]:
    """Output tok/s of HF generate over `prompts` (request i wants outputs[i] tokens).

    Builds the model (default: the Llama-3-8B preset's shapes), warms it up untimed, runs the
    static batches and frees the model. With `max_seconds`, stops after the batch that
    crosses that much generate time; `hf_requests` says how many requests ran.
    """
    if len(prompts) != len(outputs) or not prompts:
        raise ValueError(f"need one output length per prompt, got {len(prompts)} prompts, {len(outputs)} lengths")
    cfg = model_config or PRESETS["llama3-8b"]
    device = pick_device(str(device) if device is not None else None)
    t0 = time.perf_counter()
    model = build_hf_model(cfg, device, dtype)
    generate_batch(model, [list(p[:16]) for p in prompts[:2]], 4, device)  # cuBLAS / SDPA set-up, untimed
    print(f"[hf] built {cfg.num_hidden_layers}-layer model on {device} in {time.perf_counter() - t0:.1f}s", flush=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    wall = useful = generated = done = 0
    for k, batch in enumerate(batches):
        new = max(outputs[i] for i in batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        generated += generate_batch(model, [prompts[i] for i in batch], new, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        wall += dt
        useful += sum(outputs[i] for i in batch)
        done += len(batch)
        print(f"[hf] batch {k + 1}/{len(batches)}: {len(batch)} x (<= {len(prompts[batch[-1]])} in, {new} out) "
              f"in {dt:.1f}s", flush=True)
        if max_seconds is not None and wall > max_seconds and k + 1 < len(batches):
            print(f"[hf] stopping after {done} of {len(prompts)} requests: {wall:.0f}s > {max_seconds:g}s budget",
                  flush=True)
            break
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[hf] {done} requests: {useful / wall:.0f} out tok/s ({generated / wall:.0f} generated tok/s)", flush=True)
    return {"hf_offline_out_tok_s": useful / wall, "hf_offline_generated_tok_s": generated / wall,
            "hf_requests": done, "hf_wall_s": wall}


def main() -> None:
    from decode_gpu import SMOKE_PRESET, SMOKE_WORKLOAD, Workload, make_workload, model_tag, register_smoke_preset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama3-8b", help="a random:<preset> model (its shapes are used)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--num-prompts", type=int, default=256, help="the first N prompts of decode_gpu's workload")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop after the batch that crosses this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few prompts (CPU check)")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args()
    device = pick_device(args.device)
    work = Workload(seed=args.seed)
    if args.smoke:
        register_smoke_preset()
        args.model, work = f"random:{SMOKE_PRESET}", SMOKE_WORKLOAD
        args.num_prompts, args.batch_size = min(args.num_prompts, 6), min(args.batch_size, 4)
    if not args.model.startswith("random:"):
        ap.error("--model must be a random:<preset> model; the baseline builds its own random weights")
    cfg = random_model_config(args.model, None)
    prompts, outputs = make_workload(work, cfg.vocab_size)
    n = min(args.num_prompts, len(prompts))
    metrics = hf_offline_throughput(prompts[:n], outputs[:n], args.batch_size, model_config=cfg, device=device,
                                    max_seconds=args.max_seconds)
    workload = {"model": args.model, "offline": {"first_prompts": n, "of": asdict(work)},
                "batching": f"sorted by input length, static batches of {args.batch_size}, left-padded, greedy, "
                            "min_new_tokens = max_new_tokens = the batch's longest output",
                "software": software_versions(), "smoke": args.smoke}
    path = write_result(f"hf_baseline_{model_tag(args.model)}_{device_tag(device)}", workload, rounded(metrics),
                        device=device_name(device), results_dir=results_dir_for(args))
    print(f"[hf] wrote {path}", flush=True)


if __name__ == "__main__":
    main()

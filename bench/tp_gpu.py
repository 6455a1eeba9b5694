"""Tensor parallelism on 2 GPUs: a Llama-3-70B-shaped random-weight model split over two ranks.

(a) all-reduce bus bandwidth (NCCL, two processes, before the engine starts) at the decode
    message size (hidden 8192 x bf16 x batch 1 = 16 KiB: what each layer all-reduces twice per
    decode step) and at 64 MiB; bus bandwidth = 2 (n - 1) / n x bytes / time (nccl-tests' busbw).
    The small size is latency-bound: its "bandwidth" says how much of a decode step the
    2 x layers all-reduces cost (time per call is reported too).
(b) batch-1 decode of the 70B shape (80 layers, hidden 8192, ffn 28672, 64 q / 8 KV heads,
    vocab 128256, random bf16 weights) with tensor_parallel_size=2: one 128-token prompt,
    256 new tokens, tok/s after the first token, against the roofline
    copy_bw / (weight + K/V bytes per GPU) with copy_bw = 4.26e12 B/s (H200 device-to-device
    copy, bench/gpu_ceilings.py) and the input embedding not counted (a step reads one row).
    ``--layers L`` builds the model with L layers instead of 80 to save load time: the
    roofline is then computed for those L layers (the fraction, not the tok/s, is what
    carries over to 80 layers: every layer is the same work and the same two all-reduces;
    the fixed per-step costs, LM head and sampling, weigh a little more at fewer layers, so
    the fraction at L < 80 is a slight underestimate). The JSON records L.
(a') the per-step message rank 0 sends each worker (the staged step packed into one int64
    buffer over a pipe): one-way time of a decode step of batch 1 and 256 at 1024 tokens of
    context, measured as a round trip to a spawned process, halved.
(c) offline throughput of bench/decode_gpu.py's workload (1000 prompts, lognormal lengths,
    greedy, ignore_eos, all submitted at once; ``--num-prompts`` to shrink).

Usage (2 GPUs, about 6 minutes at 80 layers):
    python bench/tp_gpu.py [--layers 80] [--num-prompts 1000]
Writes bench/results/tp_<device>.json after each part.
--smoke: CPU, gloo, a tiny model, small sizes (checks the script end to end).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from decode_gpu import SMOKE_WORKLOAD, Workload, bytes_per_decode_step, make_workload, offline
from gpu_ceilings import device_name, device_tag, pick_device, results_dir_for, rounded, software_versions
from llmesh.bench_results import write_result
from llmesh.engine import LLM, SamplingParams
from llmesh.engine.loader.random_weights import PRESETS
from llmesh.engine.model.config import ModelConfig

COPY_BW_B_S = 4.26e12
"""H200 device-to-device copy bandwidth (the decode roofline's denominator)."""

LLAMA3_70B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=500000.0, bos_token_id=128000, eos_token_ids=[128001], torch_dtype="bfloat16")
SMOKE_MODEL = replace(LLAMA3_70B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_ids=[2])


# ---- (a) all-reduce ---------------------------------------------------------------------
def _allreduce_rank(rank: int, world: int, port: int, device_type: str, sizes: list[int], iters: int,
                    out: dict) -> None:
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    dtype = torch.bfloat16 if cuda else torch.float32
    for nbytes in sizes:
        x = torch.ones(nbytes // dtype.itemsize, dtype=dtype, device=device)
        for _ in range(10):
            torch.distributed.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.distributed.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / iters
        if rank == 0:
            out[nbytes] = seconds
    torch.distributed.destroy_process_group()


def measure_allreduce(device: torch.device, sizes: list[int], iters: int) -> dict[int, float]:
    """Seconds per all-reduce of each size (bytes), two processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_allreduce_rank, args=(2, port, device.type, sizes, iters, out), nprocs=2,
                           start_method="spawn", join=True)
        return dict(out)


# ---- (a') the step message --------------------------------------------------------------
def _echo(conn) -> None:
    from llmesh.engine.core.tp_messages import unpack_step

    while True:
        buf = conn.recv_bytes()
        if unpack_step(buf) is None:
            return
        conn.send_bytes(b"k")


def decode_step_host(batch: int, context: int, block_size: int = 16):
    """The HostStep of a decode step of ``batch`` sequences at ``context`` tokens."""
    from llmesh.engine.step_inputs import HostStep

    blocks = -(-context // block_size)
    seqs = np.arange(batch)
    return HostStep(
        num_tokens=batch, num_seqs=batch, token_ids=np.arange(batch), positions=np.full(batch, context - 1),
        slot_mapping=seqs * blocks * block_size + context - 1, query_start_loc=np.arange(batch + 1),
        seq_lens=np.full(batch, context), block_ids=np.arange(batch * blocks), table_lens=np.full(batch, blocks),
        logits_indices=seqs, sampling_requests=[], spec_drafts=[], pending_index=list(range(batch)),
        pending_requests=[], max_query_len=1, max_seq_len=context)


def measure_step_message(batches: list[int], context: int, iters: int) -> dict[str, float]:
    """Round trip of one step's message to a spawned process over a pipe (what rank 0 sends
    each worker per step: pack, send, receive, unpack), halved: the one-way cost."""
    import multiprocessing as mp

    from llmesh.engine.core.tp_messages import STOP_MESSAGE, pack_step

    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_echo, args=(theirs,), daemon=True)
    child.start()
    out = {}
    try:
        for batch in batches:
            host = decode_step_host(batch, context)
            samples = []
            for i in range(iters + 20):  # the first 20 warm the pipe and the child up
                t0 = time.perf_counter()
                mine.send_bytes(pack_step(host))
                mine.recv_bytes()
                if i >= 20:
                    samples.append(time.perf_counter() - t0)
            out[f"tp_step_message_b{batch}_one_way_us"] = float(np.median(samples)) / 2 * 1e6
            out[f"tp_step_message_b{batch}_bytes"] = len(pack_step(host))
    finally:
        mine.send_bytes(STOP_MESSAGE)
        child.join(5)
    return out


# ---- (b) batch-1 decode -----------------------------------------------------------------
def decode_b1_tp(llm: LLM, prompt: list[int], new_tokens: int, tp: int, copy_bw: float) -> dict[str, float]:
    eng = llm.engine
    if eng.device.type == "cuda":
        torch.cuda.synchronize(eng.device)
    req = eng.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    t_first = t_last = None
    while eng.has_unfinished_requests():
        eng.step()
        now, n = time.perf_counter(), req.num_output_tokens
        if t_first is None and n >= 1:
            t_first = now
        if t_last is None and n >= new_tokens:
            t_last = now
    if t_first is None or t_last is None:
        raise RuntimeError(f"batch-1 request produced {req.num_output_tokens} tokens, expected {new_tokens}")
    tok_s = (new_tokens - 1) / (t_last - t_first)
    w_bytes, kv_bytes = bytes_per_decode_step(eng.model_config, eng.dtype.itemsize, len(prompt) + new_tokens / 2)
    per_gpu = (w_bytes + kv_bytes) / tp  # every rank reads its shard of each weight and its KV heads
    roofline = copy_bw / per_gpu
    print(f"[tp] (b) batch 1: {tok_s:.1f} tok/s, roofline {roofline:.1f} tok/s ({per_gpu / 1e9:.2f} GB per GPU "
          f"per step) -> {tok_s / roofline:.3f}", flush=True)
    return {"tp2_70b_decode_b1_tok_s": tok_s, "tp2_70b_decode_b1_roofline_tok_s": roofline,
            "tp2_70b_decode_b1_roofline_frac": tok_s / roofline, "tp2_70b_decode_b1_step_ms": 1e3 / tok_s,
            "tp2_70b_weight_bytes_per_gpu": w_bytes / tp}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=80, help="decoder layers of the 70B shape (80: the real one)")
    ap.add_argument("--num-prompts", type=int, default=None, help="offline workload size (default 1000)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--backend", choices=("triton", "torch"), default=None, help="default triton (smoke: torch)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--copy-bw", type=float, default=COPY_BW_B_S, help="roofline copy bandwidth, B/s")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU (gloo), tiny model, small sizes")
    ap.add_argument("--results-dir", default=None)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    t_start = time.perf_counter()

    def clock() -> str:
        return f"[{time.perf_counter() - t_start:6.1f}s]"

    cfg = replace(SMOKE_MODEL if args.smoke else LLAMA3_70B, num_hidden_layers=2 if args.smoke else args.layers)
    preset = f"tp-bench-{'smoke' if args.smoke else f'llama3-70b-{args.layers}l'}"
    PRESETS[preset] = cfg  # rank 0's config travels to the workers; they do not look it up
    work = SMOKE_WORKLOAD if args.smoke else Workload()
    work = replace(work, num_prompts=args.num_prompts or work.num_prompts)
    backend = args.backend or ("torch" if args.smoke else "triton")
    decode_bytes = cfg.hidden_size * 2  # one token's hidden state in bf16
    sizes = [decode_bytes, (1 << 20) if args.smoke else (64 << 20)]
    name = f"tp_{device_tag(device)}x{args.tp}" if args.tp > 1 else f"tp_{device_tag(device)}"
    metrics: dict[str, float] = {}
    workload = {
        "model_config": {k: v for k, v in asdict(cfg).items() if k != "name"}, "layers": cfg.num_hidden_layers,
        "tensor_parallel_size": args.tp, "backend": backend, "copy_bw_b_s": args.copy_bw,
        "allreduce": f"2 processes, {'gloo' if args.smoke else 'NCCL'}, sizes {sizes} bytes; busbw = 2(n-1)/n x bytes/t",
        "decode_b1": "one 128-token prompt, 256 new tokens, greedy; roofline = copy_bw / per-GPU (weights except "
                     "the input embedding + K/V at mean context) / tp",
        "offline": {**asdict(work), "sampling": "greedy, ignore_eos, random token ids, all submitted at once"},
        "software": software_versions(), "smoke": args.smoke,
    }
    results_dir = results_dir_for(args)

    def save() -> None:
        path = write_result(name, workload, rounded(metrics), device=device_name(device), results_dir=results_dir)
        print(f"{clock()} [tp] wrote {path}", flush=True)

    per_call = measure_allreduce(device, sizes, iters=20 if args.smoke else 200)
    for nbytes, label in zip(sizes, ("decode", "64mb")):
        t = per_call[nbytes]
        metrics[f"tp2_allreduce_bus_bw_gb_s_{label}"] = 2 * (2 - 1) / 2 * nbytes / t / 1e9
        metrics[f"tp2_allreduce_us_{label}"] = t * 1e6
        print(f"{clock()} [tp] (a) all-reduce {nbytes} B: {t * 1e6:.1f} us, "
              f"bus {metrics[f'tp2_allreduce_bus_bw_gb_s_{label}']:.1f} GB/s", flush=True)
    metrics["tp2_allreduce_bus_bw_gb_s"] = metrics["tp2_allreduce_bus_bw_gb_s_64mb"]
    metrics.update(measure_step_message([1, 256], context=1024, iters=50 if args.smoke else 500))
    print(f"{clock()} [tp] (a') step message one way: b1 {metrics['tp_step_message_b1_one_way_us']:.1f} us, "
          f"b256 {metrics['tp_step_message_b256_one_way_us']:.1f} us", flush=True)
    save()

    engine_kwargs = dict(backend=backend, dtype="float32" if args.smoke else "bfloat16", device=str(device),
                         tensor_parallel_size=args.tp, max_num_seqs=8 if args.smoke else args.max_num_seqs,
                         max_num_batched_tokens=256 if args.smoke else args.max_num_batched_tokens,
                         max_model_len=128 if args.smoke else args.max_model_len)
    if args.smoke:
        engine_kwargs["num_kv_blocks"] = 256
    workload["engine"] = engine_kwargs
    llm = LLM(f"random:{preset}", **engine_kwargs)
    print(f"{clock()} [tp] loaded the {cfg.num_hidden_layers}-layer model on {args.tp} ranks: "
          f"{llm.engine.runner.num_blocks} KV blocks", flush=True)
    rng = np.random.default_rng(1)
    llm.generate([rng.integers(10, cfg.vocab_size, size=n).tolist() for n in (8, 64)],
                 SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm every path
    b1_prompt, b1_new = (16, 12) if args.smoke else (128, 256)
    metrics.update(decode_b1_tp(llm, rng.integers(10, cfg.vocab_size, size=b1_prompt).tolist(), b1_new, args.tp,
                                args.copy_bw))
    save()
    if not args.skip_offline:
        prompts, outputs = make_workload(work, cfg.vocab_size)
        got = offline(llm, prompts, outputs, prefix="tp2_70b_offline")
        metrics.update(got)
        save()
    llm.engine.core.shutdown()


if __name__ == "__main__":
    main()

"""The device's measured ceilings: copy bandwidth and bf16 GEMM throughput.

Every other GPU benchmark states its result as a fraction of these, so "80% of the copy
bandwidth" means 80% of what this device sustains on a plain device-to-device copy, not of
the datasheet figure. Also the shared timing helper (`time_ms`) and device naming
(`device_tag`) of the other bench/*_gpu.py scripts, which import this file as a module
(running `python bench/<script>.py` puts bench/ on the import path).

Usage: python bench/gpu_ceilings.py [--copy-gib 2] [--gemm-n 8192] [--smoke]
Writes bench/results/ceilings_<dev>.json (metrics copy_tb_s, gemm_bf16_tflops).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmesh.bench_results import RESULTS_DIR, device_tag, write_result  # noqa: F401 (device_tag re-exported)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def software_versions() -> dict[str, str]:
    """Recorded in every workload: kernel speed depends on the torch / Triton build."""
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("flash-attn-4", "fa3-fwd", "nvidia-cutlass-dsl", "fbgemm-gpu-genai", "gemlite"):  # kernel libraries dispatched to
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return versions


def pick_device(requested: str | None) -> torch.device:
    """The device a run uses: the one asked for, else the GPU when there is one."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_reps: int = 3) -> float:
    """Median milliseconds of one call of `fn`.

    On a GPU: triton.testing.do_bench, which flushes the L2 cache before each call (so a
    working set that would fit in L2 is still read from memory) and times each call with
    CUDA events; the flush also keeps the GPU busy while the host launches the call, so
    launch overhead stays out of the figure. `fn` must not synchronise with the host.
    On the CPU (smoke runs): wall-clock median of `cpu_reps` calls after one warm-up.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """time_ms of `fn` replayed from a CUDA graph: the GPU time of a call whose host side (many
    small launches) would otherwise be timed instead, as it is in the engine's decode graphs.
    `fn` must be capturable (no host synchronisation). On the CPU: time_ms of one call (the
    scripts that graph-time run there only as smoke checks, through Triton's interpreter, whose
    times are no figures: more calls would only lengthen the check)."""
    if device.type != "cuda":
        return time_ms(fn, device, cpu_reps=1)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, device)


def measure_copy_tb_s(device: torch.device, gib: float = 2.0) -> float:
    """TB/s of a device-to-device copy of `gib` GiB (bytes read + bytes written per second).

    One source/destination pair suffices: at GiB sizes the buffers are ~40x the L2 cache,
    so every call streams from and to memory with nothing left cached by the call before.
    """
    n = int(gib * (1 << 30)) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms=200)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return moved / (ms * 1e-3) / 1e12


def measure_gemm_tflops(device: torch.device, n: int = 8192) -> float:
    """TFLOP/s of an n x n x n bf16 matmul on random data (2 n^3 flops per call)."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=gen, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.mm(a, b, out=c), device, rep_ms=200)
    del a, b, c
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_ceilings(device: torch.device | str, *, copy_gib: float = 2.0, gemm_n: int = 8192,
                     gemm: bool = True) -> dict[str, float]:
    """{copy_tb_s, gemm_bf16_tflops} of `device` (gemm=False measures only the copy)."""
    device = torch.device(device)
    out = {"copy_tb_s": measure_copy_tb_s(device, copy_gib)}
    if gemm:
        out["gemm_bf16_tflops"] = measure_gemm_tflops(device, gemm_n)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def rounded(metrics: dict[str, float]) -> dict[str, float]:
    """Four significant digits: more would be noise between runs."""
    return {k: v if isinstance(v, int) else float(f"{v:.4g}") for k, v in metrics.items()}


def results_dir_for(args: argparse.Namespace) -> Path:
    """Smoke runs write to a scratch folder, so CPU numbers never replace real results."""
    if args.results_dir:
        return Path(args.results_dir)
    return Path(tempfile.mkdtemp(prefix="llmesh-smoke-")) if args.smoke else RESULTS_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--copy-gib", type=float, default=2.0, help="size of the copied buffer (read + write = 2x)")
    ap.add_argument("--gemm-n", type=int, default=8192, help="GEMM size n (n x n x n)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, results to a scratch folder (CPU check)")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.smoke:
        args.copy_gib, args.gemm_n = 1 / 16, 256
    t0 = time.perf_counter()
    metrics = measure_ceilings(device, copy_gib=args.copy_gib, gemm_n=args.gemm_n)
    print(f"[ceilings] {device_name(device)}: copy {metrics['copy_tb_s']:.3f} TB/s, "
          f"bf16 GEMM {metrics['gemm_bf16_tflops']:.1f} TFLOP/s ({time.perf_counter() - t0:.1f}s)", flush=True)
    workload = {"copy": f"device-to-device copy of {args.copy_gib:g} GiB; bytes = read + written; median "
                        "of do_bench calls (L2 flushed before each)",
                "gemm": f"torch.mm {args.gemm_n}^3 bf16, random normal data; flops = 2 n^3; median",
                "software": software_versions(), "smoke": args.smoke}
    path = write_result(f"ceilings_{device_tag(device)}", workload, rounded(metrics), device=device_name(device),
                        results_dir=results_dir_for(args))
    print(f"[ceilings] wrote {path}", flush=True)


if __name__ == "__main__":
    main()

"""Float32 GEMMs on the CPU: which layout and library each row count wants.

For the demo model's projections (SmolLM2-135M: qkv, o, gate_up, down, the tied LM head)
and M = 1..128 rows, the time of one ``x @ W^T`` with W
- ``nk``: stored [N, K] as checkpoints hold it (F.linear → MKL),
- ``kn``: stored [K, N] behind the same shape (F.linear → MKL; ``cpu_layout`` stores W so
  when N >= K),
- ``onednn``: oneDNN's prepacked copy (what ``cpu_dense_matmul`` runs where it is chosen).
Each timing cycles through enough copies of the weight (a model's worth of layers) that they
come from memory, not the cache, as in a real step. quant/cpu_matmul.py measures the same
choice on the model's own weights when it loads (``calibrate``); these figures show it per M.

Writes bench/results/cpu_linear_cpu.json: per shape and M the microseconds of each variant,
and the summary ratios ``cpu_f32_m1_layout_vs_nk_x`` (cpu_layout's choice at one row),
``cpu_f32_m1_onednn_vs_mkl_x`` and ``cpu_f32_m5_onednn_vs_mkl_x`` (oneDNN against the faster
MKL layout at one row, and at five rows, a verify step's width), geometric means over the
shapes, above 1 meaning faster. Usage: python bench/cpu_linear.py [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from llmesh.bench_results import write_result
from llmesh.engine.quant.cpu_matmul import cpu_layout, run_gemm_path


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x @ W^T through oneDNN's packed copy at any row count (None without oneDNN)."""
    return run_gemm_path("onednn", x, w, None)

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}
"""name → (K, N) of the demo model's linears."""
ROWS = (1, 2, 4, 5, 8, 16, 64, 128)
CACHE_BYTES = 256 << 20
"""Each variant cycles through this many bytes of weights (far past any CPU's cache)."""


def _time_us(fns, min_s: float = 0.3) -> float:
    """Mean microseconds per call over whole passes through ``fns``, the best of three."""
    for f in fns[:2]:
        f()
    best = math.inf
    for _ in range(3):
        calls, t0 = 0, time.perf_counter()
        while True:
            for f in fns:
                f()
            calls += len(fns)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                break
        best = min(best, elapsed / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="cpu_linear_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    metrics: dict[str, float] = {}
    m1, m1_onednn, m5 = [], [], []
    with torch.inference_mode():
        for name, (k, n) in SHAPES.items():
            copies = max(2, min(30, CACHE_BYTES // (4 * k * n)))
            nk = [torch.randn(n, k) for _ in range(copies)]
            kn = [w.t().contiguous().t() for w in nk]
            chosen = "kn" if cpu_layout(nk[0]).stride(0) == 1 else "nk"
            for m in ROWS:
                x = torch.randn(m, k)
                ref = torch.nn.functional.linear(x, nk[0])
                got = onednn(x, kn[0])
                if got is not None:
                    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
                t = {"nk": _time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in nk]),
                     "kn": _time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in kn])}
                if got is not None:
                    t["onednn"] = _time_us([lambda w=w: onednn(x, w) for w in kn])
                for variant, us in t.items():
                    metrics[f"cpu_linear_{name}_m{m}_{variant}_us"] = us
                print(f"{name:8s} M={m:3d} " + "  ".join(f"{v} {us:9.1f} us" for v, us in t.items()), flush=True)
                if m == 1:
                    m1.append(t["nk"] / t[chosen])
                    if "onednn" in t:
                        m1_onednn.append(min(t["nk"], t["kn"]) / t["onednn"])
                if m == 5 and "onednn" in t:
                    m5.append(min(t["nk"], t["kn"]) / t["onednn"])
            del nk, kn
    metrics["cpu_f32_m1_layout_vs_nk_x"] = math.exp(sum(map(math.log, m1)) / len(m1))
    if m1_onednn:
        metrics["cpu_f32_m1_onednn_vs_mkl_x"] = math.exp(sum(map(math.log, m1_onednn)) / len(m1_onednn))
    if m5:
        metrics["cpu_f32_m5_onednn_vs_mkl_x"] = math.exp(sum(map(math.log, m5)) / len(m5))
    print({k: round(v, 3) for k, v in metrics.items() if k.endswith("_x")})
    workload = {"shapes_k_n": SHAPES, "rows": list(ROWS), "threads": args.threads, "dtype": "float32",
                "weights_cycled_mib": CACHE_BYTES >> 20}
    print("wrote", write_result(args.name, workload, metrics))


if __name__ == "__main__":
    main()

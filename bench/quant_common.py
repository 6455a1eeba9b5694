"""Shared by bench/quant_gpu.py and bench/quant_gemm.py: the run record (metrics, workload,
failures, skips, saved after every item), per-part time budgets, and CUDA-graph timing."""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gpu_ceilings import device_name, device_tag, results_dir_for, rounded, software_versions, time_ms

from llmesh.bench_results import write_result

def auto_splits(tiles: int, iters: int, sms: int, cap: int) -> int:
    """Split-K for a launch of `tiles` output tiles of `iters` K steps each: enough splits to
    give every SM about two programs, each split at least two K steps, at most `cap`."""
    return max(1, min(-(-2 * sms // tiles), iters // 2, cap))


class Run:
    """Metrics, workload description, failures and skips of this run; saves after every item."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device, self.t0 = args, device, time.perf_counter()
        self.metrics: dict[str, float] = {}
        self.failed: list[str] = []
        self.skipped: list[str] = []
        self.workload: dict = {"software": software_versions(), "smoke": args.smoke, "parts": args.parts,
                               "failed": self.failed, "skipped": self.skipped}
        self.results_dir = results_dir_for(args)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] [quant] {msg}", flush=True)

    def save(self) -> None:
        write_result(f"quant_{device_tag(self.device)}{self.args.suffix}", self.workload, rounded(self.metrics),
                     device=device_name(self.device), results_dir=self.results_dir)

    def fail(self, what: str) -> None:
        print(traceback.format_exc(limit=-4), end="", flush=True)  # the innermost frames say enough
        self.failed.append(what)
        self.log(f"{what}: FAILED")

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def timer(self, fns: list[Callable[[], object]], quick: bool = False) -> float:
        """Milliseconds per call. On a GPU: the calls replayed from one CUDA graph (how the engine
        runs decode steps, so host launch overhead is out of the figure), each call on its own
        copy of the weights so that together they overflow L2 and every call reads memory."""
        if self.device.type != "cuda":
            return time_ms(fns[0], self.device, cpu_reps=1)
        return graph_ms(fns, reps=3 if quick else 10)

    def time_candidates(self, candidates: list, ref: torch.Tensor, label: str,
                        describe: Callable[[object], str]) -> list[tuple[float, object]]:
        """(ms, config) of each (config, calls) candidate whose first call matches ``ref`` (a
        sweep's default path) to the GEMM's tolerance, timed quickly over its calls (one a
        weight copy); one that raises or differs is left out and named under
        workload.gemm_configs.errors."""
        errors = self.workload.setdefault("gemm_configs", {}).setdefault("errors", [])
        ref = ref.float()
        times = []
        for cfg, fns in candidates:
            try:
                got = fns[0](cfg).float()
                if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
                    raise ValueError(f"wrong result: max |diff| {(got - ref).abs().max().item():.3g}")
                times.append((self.timer([lambda c=c, cfg=cfg: c(cfg) for c in fns], quick=True), cfg))
            except Exception as e:  # e.g. out of shared memory: that candidate is out
                errors.append(f"{label} {describe(cfg)}: {type(e).__name__}: {str(e)[:120]}")
        return times


@dataclass
class Budget:
    """Starts an item only while the part's elapsed time + the mean item time fits the budget."""

    seconds: float
    start: float = 0.0
    items: int = 0
    spent: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def allows(self) -> bool:
        mean = self.spent / self.items if self.items else 0.0
        return time.perf_counter() - self.start + mean <= self.seconds

    @contextlib.contextmanager
    def item(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.items, self.spent = self.items + 1, self.spent + time.perf_counter() - t


def seeded_weight(n: int, k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A random bf16 weight [N, K] with a weight-like scale (0.02), the same on every run."""
    gen = torch.Generator(device).manual_seed(seed)
    return (0.02 * torch.randn(n, k, device=device, generator=gen)).to(torch.bfloat16)


def graph_ms(fns: list[Callable[[], object]], reps: int = 10) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (reps * len(fns))

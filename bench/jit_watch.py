"""The Triton specializations a block of code made: which kernels, how many, and the seconds
spent making them (compiling, or loading from Triton's cache on disk).

A timed run that makes one has compiled inside its timing. The offline figures of a fresh
machine's first engine read 20-30% under the same engine run next in another process
(moe_h100_part_*_engine.json, sessions 58-59), and a warm-up on the whole workload did not close
the gap; decode_gpu.offline counts what its timed run made, so a result file says whether its
figure paid for compiles.

Triton calls ``knobs.runtime.jit_cache_hook`` before it makes a specialization a kernel's
in-memory cache lacks and ``jit_post_compile_hook`` after; the watch chains itself in front
of hooks already set and gives them back on exit. Where this Triton has no such knobs, the
watch says so (``available`` False) and counts nothing. It sees this process only: the benchmarks'
``LLM`` steps its runner in process, but a tensor-parallel engine's workers compile in their own.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class JitWatch:
    """``with JitWatch() as w: ...``; then ``w.count``, ``w.seconds``, ``w.kernels``."""

    kernels: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    available: bool = False
    _started: float | None = None
    _saved: tuple = ()

    @property
    def count(self) -> int:
        return sum(self.kernels.values())

    def summary(self, top: int = 6) -> str:
        names = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in self.kernels.most_common(top))
        more = len(self.kernels) - top
        return f"{self.count} in {self.seconds:.1f}s ({names}{f', {more} more' if more > 0 else ''})"

    def _before(self, previous):
        def hook(*args, **kwargs):
            fn = kwargs.get("fn")
            self.kernels[getattr(fn, "name", None) or "?"] += 1
            self._started = time.perf_counter()
            return previous(*args, **kwargs) if previous else None
        return hook

    def _after(self, previous):
        def hook(*args, **kwargs):
            if self._started is not None:
                self.seconds += time.perf_counter() - self._started
                self._started = None
            return previous(*args, **kwargs) if previous else None
        return hook

    def __enter__(self) -> JitWatch:
        try:
            from triton import knobs
            runtime = knobs.runtime
            before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
        except (ImportError, AttributeError):
            return self
        self._saved = (runtime, before, after)
        runtime.jit_cache_hook = self._before(before)
        runtime.jit_post_compile_hook = self._after(after)
        self.available = True
        return self

    def __exit__(self, *exc) -> None:
        if self._saved:
            runtime, before, after = self._saved
            runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
            self._saved = ()

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


def _variant(hook_kwargs: dict) -> str:
    """One specialization: the kernel's name, its arguments' types by name, the attributes Triton
    specialised them on (``tt.divisibility`` 16 where an integer or a pointer is a multiple of 16,
    keyed by argument index) and the constexprs' values. (The hook's own ``repr`` pairs the names
    with the characters of its key string in Triton 3.9, so it is built here from ``compile``.)"""
    fn, c = hook_kwargs.get("fn"), hook_kwargs.get("compile") or {}
    name = getattr(fn, "name", None) or "?"
    if not c.get("signature"):
        return str(hook_kwargs.get("repr") or name)
    return f"{name} {c['signature']} attrs={c.get('configs')} constants={c.get('constants')}"


@dataclass
class JitWatch:
    """``with JitWatch() as w: ...``; then ``w.count``, ``w.seconds``, ``w.kernels``, and
    ``w.variants``: the first MAX_VARIANTS specializations described (``_variant``), to say
    which argument made a new one."""

    MAX_VARIANTS = 32

    kernels: Counter = field(default_factory=Counter)
    variants: list[str] = field(default_factory=list)
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
            if len(self.variants) < self.MAX_VARIANTS:
                self.variants.append(_variant(kwargs))
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

"""bench/jit_watch.py on this Triton's own knobs: the watch counts each specialization Triton
announces through ``jit_cache_hook`` by kernel, times it to ``jit_post_compile_hook``, passes
both calls on to hooks set before it, and gives those back on exit. (Making a specialization
needs a GPU driver, so here the hooks are called as JITFunction._do_compile calls them; the
offline runs on the GPU report the real counts as ``offline_jit_specializations``.)"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from jit_watch import JitWatch  # noqa: E402

knobs = pytest.importorskip("triton").knobs
jit = pytest.importorskip("triton.runtime.jit")


def _announce(name: str, compile_s: float, signature: dict | None = None, attrs: dict | None = None) -> None:
    """What _do_compile does around one compile, with its keyword arguments."""
    info = jit.JitFunctionInfo(module=None, name=name, jit_function=None)
    compile_ = dict(key=name, signature=signature, configs=[attrs or {}], constants={"BLOCK": 64}) if signature else {}
    kwargs = dict(key=name, repr=name, fn=info, compile=compile_, is_manual_warmup=False, already_compiled=False)
    if knobs.runtime.jit_cache_hook is not None and knobs.runtime.jit_cache_hook(**kwargs):
        return
    time.sleep(compile_s)
    if knobs.runtime.jit_post_compile_hook is not None:
        knobs.runtime.jit_post_compile_hook(**kwargs)


def test_counts_each_kernels_specializations_and_their_seconds():
    with JitWatch() as w:
        _announce("_fused_moe_kernel", 0.02, {"N": "i32", "BLOCK": "constexpr"}, {(0,): [["tt.divisibility", 16]]})
        _announce("_fused_moe_kernel", 0.02, {"N": "i32", "BLOCK": "constexpr"})
        _announce("_rmsnorm_kernel", 0.0)
    assert w.available
    assert w.variants == [
        "_fused_moe_kernel {'N': 'i32', 'BLOCK': 'constexpr'} attrs=[{(0,): [['tt.divisibility', 16]]}] "
        "constants={'BLOCK': 64}",
        "_fused_moe_kernel {'N': 'i32', 'BLOCK': 'constexpr'} attrs=[{}] constants={'BLOCK': 64}",
        "_rmsnorm_kernel"]
    assert w.count == 3 and w.kernels == {"_fused_moe_kernel": 2, "_rmsnorm_kernel": 1}
    assert 0.04 <= w.seconds < 1.0
    assert w.summary().startswith("3 in ") and "_fused_moe_kernel x2" in w.summary()
    _announce("_after_exit", 0.0)  # no longer watched
    assert w.count == 3


def test_hooks_set_before_still_run_and_come_back(monkeypatch):
    seen = []

    def before(**kw):
        seen.append(("before", kw["fn"].name))

    def after(**kw):
        seen.append(("after", kw["fn"].name))

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", before)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", after)
    with JitWatch() as w:
        _announce("k", 0.0)
    assert w.count == 1 and seen == [("before", "k"), ("after", "k")]
    assert knobs.runtime.jit_cache_hook is before and knobs.runtime.jit_post_compile_hook is after


def test_nothing_watched_leaves_no_hook():
    before, after = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    with JitWatch() as w:
        pass
    assert w.count == 0 and w.seconds == 0.0 and w.summary().startswith("0 in ")
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == (before, after)

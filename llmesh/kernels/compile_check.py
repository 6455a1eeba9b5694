"""Compile a Triton kernel for Hopper (sm90) on any machine and read what the compiler made of it.

``triton.compile`` for a ``GPUTarget`` needs no GPU: the front end, the LLVM passes and ptxas
(shipped in Triton's wheel) run on the CPU. That catches what Triton's interpreter accepts and
its compiler rejects, and it shows, before any device time is spent, which loads of a K loop
Triton software-pipelined: in the TTGIR those are ``async_copy_global_to_local`` ops (cp.async
copies into shared memory, num_stages deep); a plain ``tt.load`` left inside a loop makes every
step wait out its latency unless its value is only used a step later. Pipelining needs loads
wide enough for cp.async, so the compile must assume what a launch specialises: every pointer
16-byte aligned (torch's allocations are) and the integer arguments a launch sees divisible by
16 (strides, K, split lengths); without that nothing is pipelined.

Run it without ``TRITON_INTERPRET`` (under it, @triton.jit gives interpreter objects).
Used by tests/kernels/test_hopper_compile.py and bench/ttgir_audit.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FLOAT_ARGS = frozenset({"eps", "scale_log2"})
"""Scalar arguments that are floats; every other non-pointer, non-constexpr argument is an i32."""


def signature(fn, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Triton's signature of ``fn``: pointers typed by ``pointers`` (default bf16), scalars i32
    (fp32 for FLOAT_ARGS), constexprs as given (all must be, except those with a default). An
    argument that is neither (a TMA descriptor) takes its full type from ``pointers``, e.g.
    ``"tensordesc<fp8e4nv[64, 128]>"``."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif not p.name.endswith("_ptr") and p.name in pointers:
            sig[p.name] = pointers[p.name]
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + pointers.get(p.name, "bf16")
        else:
            sig[p.name] = "fp32" if p.name in FLOAT_ARGS else "i32"
    defaults = {p.name for p in fn.params if p.is_constexpr and p.has_default}
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in constexprs and n not in defaults]
    if missing:
        raise ValueError(f"{fn.__name__}: give constexprs {missing}")
    return sig


def compile_sm90(fn, pointers: dict[str, str], constexprs: dict[str, object], *,
                 divisible: frozenset[str] = frozenset(), num_warps: int = 4, num_stages: int = 3):
    """The compiled kernel for sm90. ``divisible``: integer arguments a launch sees divisible by
    16 (empty: no specialisation at all, pointers included, as the PDL check needs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = signature(fn, pointers, constexprs)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    names = list(sig)
    attrs = None
    if divisible:
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                 if t.startswith("*") or n in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                              num_stages=num_stages))


@dataclass
class LoopReport:
    async_copies: int
    """cp.async copies in the whole kernel (prologue and loop bodies); TMA copies are tma_copies."""
    wgmma: int
    """Hopper warp-group MMAs (tl.dot on tiles of 64 rows or more)."""
    wgmma_register_lhs: int = 0
    """Those of them whose left operand is in registers (a dot-operand tensor, as a value computed
    in the kernel, e.g. widened INT4 codes, can be), not read from shared memory."""
    waited_loads: list[list[str]] = field(default_factory=list)
    """Per scf.for loop, in order: the types of the plain tt.loads whose value the same step uses
    (each step waits out their latency)."""
    carried_loads: list[list[str]] = field(default_factory=list)
    """Per loop: plain tt.loads whose value goes straight to the next step (loaded a step ahead)."""
    tma_copies: int = 0
    """Copies through the tensor memory accelerator (a TMA descriptor's tiles), prologue and loops."""


_WGMMA = re.compile(r"ttng\.warp_group_dot [^\n]*? : ([^\n]*?) \* ")
_LOAD = re.compile(r"(%[\w#]+) = tt\.load [^:]*: (tensor<[^>]*>|!tt\.ptr<\w+>)")


def loop_report(ttgir: str) -> LoopReport:
    starts = [m.start() for m in re.finditer(r"scf\.for ", ttgir)]
    waited, carried = [], []
    for i, start in enumerate(starts):
        body = ttgir[start:starts[i + 1] if i + 1 < len(starts) else len(ttgir)]
        end = body.find("scf.yield")
        yielded = set(re.findall(r"%[\w#]+", body[end:body.find("\n", end)])) if end >= 0 else set()
        loads = _LOAD.findall(body[:end if end >= 0 else len(body)])
        waited.append([ty for name, ty in loads if name not in yielded])
        carried.append([ty for name, ty in loads if name in yielded])
    lhs = _WGMMA.findall(ttgir)
    return LoopReport(async_copies=ttgir.count("async_copy_global_to_local"),
                      wgmma=len(re.findall(r"warp_group_dot ", ttgir)),
                      wgmma_register_lhs=sum("#ttg.dot_op<{opIdx = 0" in t and "memdesc" not in t for t in lhs),
                      waited_loads=waited, carried_loads=carried,
                      tma_copies=ttgir.count("async_tma_copy_global_to_local"))


def nvidia_backend() -> bool:
    """Whether this Triton build can compile for NVIDIA targets (the sm90 checks skip without)."""
    try:
        from triton.backends import backends
    except Exception:  # noqa: BLE001 - no Triton, or an older one without the backends registry
        return False
    return "nvidia" in backends

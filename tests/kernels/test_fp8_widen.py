"""kv_quant.widen_e4m3's integer route (E4M3 -> bfloat16 without a conversion instruction):
exact for every finite code by its integer reference on the CPU, its asm assembled for sm_90
by Triton's own ptxas where the CUDA backend is installed, and equal to torch's conversion on
a GPU that has FP8 (sm_89+)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from llmesh.kernels.kv_quant import BF16_TWO_POW_120, _widen_e4m3_asm, widen_e4m3_bits_ref  # noqa: E402

CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)


def _reference() -> torch.Tensor:
    return CODES.view(torch.float8_e4m3fn).to(torch.bfloat16)


def test_integer_route_is_exact_for_every_finite_code():
    bits = widen_e4m3_bits_ref(CODES)
    two_pow_120 = torch.tensor([BF16_TWO_POW_120], dtype=torch.int16).view(torch.bfloat16)
    assert two_pow_120.float().item() == 2.0 ** 120
    got = (bits.view(torch.bfloat16).float() * two_pow_120.float()).to(torch.bfloat16)
    want = _reference()
    finite = ~torch.isnan(want)
    assert finite.sum() == 254  # E4M3 has two NaN codes and no infinities
    assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))
    assert got[0].item() == 0.0 and got[1].item() == 2.0 ** -9  # zero and the smallest subnormal


_WIDEN_KERNEL_SRC = """
import triton
import triton.language as tl
from llmesh.kernels.kv_quant import _widen_e4m3_asm


@triton.jit
def widen_kernel(x_ptr, y_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y_ptr + o, _widen_e4m3_asm(tl.load(x_ptr + o)))
"""

_COMPILE_SM90 = """
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from widen_kernel import widen_kernel
src = ASTSource(fn=widen_kernel, signature={"x_ptr": "*fp8e4nv", "y_ptr": "*bf16", "N": "constexpr"},
                constexprs={"N": 256})
try:
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
except Exception as e:
    print("SKIP", str(e)[:160].replace("\\n", " "))
    raise SystemExit(0)
ptx = compiled.asm["ptx"]
print("OK" if "fma.rn.bf16x2" in ptx and "cvt.bf16.f16" not in ptx and len(compiled.asm["cubin"]) else "BAD")
"""


def test_asm_assembles_for_sm90(tmp_path):
    """In a child process without TRITON_INTERPRET (the interpreter compiles nothing): the asm
    through Triton's code generator and ptxas for sm_90, and no F2F conversion left in the PTX."""
    (tmp_path / "widen_kernel.py").write_text(_WIDEN_KERNEL_SRC)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SM90, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    verdict = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if verdict.startswith("SKIP"):
        pytest.skip(f"no sm_90 toolchain in this Triton build: {verdict[5:]}")
    assert verdict == "OK", out.stdout[-2000:]


@triton.jit
def _widen_kernel(x_ptr, y_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y_ptr + o, _widen_e4m3_asm(tl.load(x_ptr + o)))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="E4M3 tensors and the asm need a GPU with FP8 (sm_89+)")
def test_asm_matches_torch_on_gpu():
    x = CODES.cuda().view(torch.float8_e4m3fn)
    y = torch.empty(256, dtype=torch.bfloat16, device="cuda")
    _widen_kernel[(1,)](x, y, N=256)
    want = _reference()
    finite = ~torch.isnan(want)
    assert torch.equal(y.cpu()[finite].view(torch.int16), want[finite].view(torch.int16))


_COMPILE_DECODE = """
import sys
from llmesh.kernels.compile_check import compile_sm90
from llmesh.kernels.paged_decode_attention import _decode_partition_kernel
pointers = {"k_cache_ptr": "fp8e4nv", "v_cache_ptr": "fp8e4nv", "k_scale_ptr": "u8", "v_scale_ptr": "u8",
            "block_tables_ptr": "i32", "seq_lens_ptr": "i32", "part_m_ptr": "fp32", "part_l_ptr": "fp32",
            "part_acc_ptr": "fp32", "lock_ptr": "i32"}
constexprs = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=64, PARTITION=512,
                  SPLIT=True, FOLD=True, NUM_KV_HEADS=8, FP8=True, DOT_F32=False, DOT_PRECISION="tf32",
                  INTERPRET=False, PDL=False)
divisible = frozenset({"stride_qb", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs",
                       "stride_vh", "stride_bt", "stride_ob", "stride_oh"})  # as a launch specialises them
try:
    from llmesh.kernels.compile_check import loop_report
    kernel = compile_sm90(_decode_partition_kernel, pointers, constexprs, divisible=divisible)
except Exception as e:
    print("SKIP", str(e)[:160].replace("\\n", " "))
    raise SystemExit(0)
ptx, report = kernel.asm["ptx"], loop_report(kernel.asm["ttgir"])
print(ptx.count("fma.rn.bf16x2"), ptx.count("cvt.bf16.f16"), len(report.waited_loads[0]),
      len(report.carried_loads[0]), report.async_copies)
"""


@pytest.mark.parametrize("route", ["default", "convert"])
def test_fp8_decode_kernel_takes_the_route_asked_for(route):
    """The FP8 pool's decode kernel, compiled for sm_90 in a child process: by default K and V
    codes widen by the integer route (paired multiplies, no F2F conversion); with
    LLMESH_FP8_WIDEN=convert by Triton's cast (whose bf16 step is cvt.bf16.f16). Either way its
    K loop waits on no plain load."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLMESH_FP8_WIDEN")}
    if route == "convert":
        env["LLMESH_FP8_WIDEN"] = "convert"
    out = subprocess.run([sys.executable, "-c", _COMPILE_DECODE], env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    verdict = out.stdout.strip().splitlines()[-1]
    if verdict.startswith("SKIP"):
        pytest.skip(f"no sm_90 toolchain in this Triton build: {verdict[5:]}")
    fma, cvt, waited, carried, copies = (int(x) for x in verdict.split())
    if route == "default":
        assert fma > 0 and cvt == 0, verdict
    else:
        assert cvt > 0, verdict
    # The K/V tiles and their block-table entries are cp.async copies; the 1-byte scale gathers
    # (and the table entries that address them) are loaded a step ahead: no plain load is
    # waited on in the step that issues it.
    assert copies >= 4 and waited == 0 and carried == 3, verdict


_COMPILE_LOOPS = """
import json
from llmesh.kernels.compile_check import compile_sm90, loop_report
from llmesh.kernels.prefill_attention import _prefill_kernel
from llmesh.kernels.unified_attention import _short_query_kernel
pointers = {"k_cache_ptr": "fp8e4nv", "v_cache_ptr": "fp8e4nv", "k_scale_ptr": "u8", "v_scale_ptr": "u8",
            "block_tables_ptr": "i32", "query_start_loc_ptr": "i32", "seq_lens_ptr": "i32",
            "part_m_ptr": "fp32", "part_l_ptr": "fp32", "part_acc_ptr": "fp32"}
attn = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, NUM_KV_HEADS=8, FP8=True, DOT_F32=False,
            DOT_PRECISION="tf32", INTERPRET=False)
divisible = frozenset({"stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs",
                       "stride_vh", "stride_bt", "stride_ot", "stride_oh"})  # as a launch specialises them
kernels = [(_short_query_kernel, dict(attn, BLOCK_M=16, BLOCK_Q=4, BLOCK_N=64, NUM_SEGMENTS=4, MIN_SEGMENT=256,
                                      PDL=False)),
           (_prefill_kernel, dict(attn, BLOCK_M=128, BLOCK_Q=32, BLOCK_N=64, MIN_QUERY_LEN=5))]
for fn, constexprs in kernels:
    try:
        report = loop_report(compile_sm90(fn, pointers, constexprs, divisible=divisible).asm["ttgir"])
    except Exception as e:
        print("SKIP", str(e)[:160].replace("\\n", " "))
        raise SystemExit(0)
    print(json.dumps([fn.__name__, [len(w) for w in report.waited_loads], [len(c) for c in report.carried_loads]]))
"""


def test_fp8_prefill_and_unified_loops_carry_their_scales():
    """The unified kernel's short-query loops and the prefill kernel's loops over an FP8 pool,
    compiled for sm_90: as in the decode kernel, the scale codes and the table entries that
    address them are carried a step ahead (kv_quant.scale_carry_step), so no step waits on a
    plain load it issued (two loops each: whole tiles, then the masked ones). Before the carry
    each loop waited on three."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLMESH_FP8_WIDEN")}
    out = subprocess.run([sys.executable, "-c", _COMPILE_LOOPS], env=env, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    if lines[-1].startswith("SKIP"):
        pytest.skip(f"no sm_90 toolchain in this Triton build: {lines[-1][5:]}")
    reports = [json.loads(line) for line in lines[-2:]]
    assert [name for name, _, _ in reports] == ["_short_query_kernel", "_prefill_kernel"], lines
    for name, waited, carried in reports:
        # carried: the scale codes and their table entries at least (Triton 3.6 carries the
        # short-query loop's K/V table entries too: 6 there, 3 with 3.9)
        assert waited == [0, 0] and min(carried) >= 3, (name, waited, carried)

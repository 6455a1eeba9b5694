"""The decode-path kernels compile for Hopper (sm90) with programmatic dependent launch on, here
on the CPU: Triton's interpreter, which runs the other kernel tests on a machine without a GPU,
accepts code its compiler rejects (a global that is not a constexpr, return statements of
different types in dead constexpr branches), and the PDL branch (griddepcontrol) never runs
under the interpreter at all. triton.compile for a GPUTarget needs no GPU: the front end,
the LLVM passes and ptxas (shipped in Triton's wheel) run here. The compiler runs in a child
process without TRITON_INTERPRET (under it, @triton.jit gives interpreter objects), one child
for every case."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.compile_check import compile_sm90, loop_report, nvidia_backend  # noqa: E402

_NVIDIA = nvidia_backend()

# (module, kernel, pointer element types by argument (default bf16), constexprs)
ATTN = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, NUM_KV_HEADS=8, FP8=False, DOT_F32=False,
            DOT_PRECISION="tf32", INTERPRET=False)
_PERSISTENT_PTRS = {"a_desc": "tensordesc<bf16[64, 64]>", "b_desc": "tensordesc<bf16[128, 64]>", "scale_ptr": "fp32",
                    "topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "num_post_ptr": "i32"}
CASES = [
    ("skinny_gemm", "_skinny_kernel", {"part_ptr": "fp32", "lock_ptr": "i32"},
     dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, DOT=False, SPLIT=True, HAS_BIAS=False, EVEN_K=True, DOT_F32=False,
          INTERPRET=False, LATE=False)),
    ("skinny_gemm", "_skinny_kernel", {"part_ptr": "fp32"},
     dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, DOT=True, SPLIT=False, HAS_BIAS=True, EVEN_K=False, DOT_F32=False,
          INTERPRET=False, LATE=False)),
    ("skinny_gemm", "_skinny_kernel", {"part_ptr": "fp32"},
     dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, DOT=False, SPLIT=False, HAS_BIAS=False, EVEN_K=True, DOT_F32=False,
          INTERPRET=False, LATE=True)),
    # split-K summed in the launch by the last split to arrive, the bias added then, with the norm prologue
    ("fused_skinny", "_fused_skinny_kernel", {"part_ptr": "fp32", "lock_ptr": "i32"},
     dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, BLOCK_H=1024, DOT=False, SPLIT=True, HAS_BIAS=True, EVEN_K=True,
          NORM=True, HAS_RESIDUAL=True, DOT_F32=False, INTERPRET=False, LATE=True)),
    ("fused_skinny", "_fused_skinny_kernel", {"part_ptr": "fp32"},
     dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, BLOCK_H=1024, DOT=False, SPLIT=False, HAS_BIAS=False, EVEN_K=True,
          NORM=True, HAS_RESIDUAL=True, DOT_F32=False, INTERPRET=False, LATE=False)),
    ("fused_skinny", "_fused_skinny_kernel", {"part_ptr": "fp32", "lock_ptr": "i32"},
     dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, BLOCK_H=256, DOT=True, SPLIT=True, HAS_BIAS=False, EVEN_K=False,
          NORM=False, HAS_RESIDUAL=False, DOT_F32=False, INTERPRET=False, LATE=False)),
    ("argmax", "_argmax_chunk_kernel", {"x_ptr": "fp32", "key_ptr": "fp32", "nan_ptr": "i32", "idx_ptr": "i32"},
     dict(CHUNK=2048)),
    ("argmax", "_argmax_final_kernel", {"key_ptr": "fp32", "nan_ptr": "i32", "idx_ptr": "i32", "out_ptr": "i64"},
     dict(BLOCK_C=64)),
    ("rmsnorm", "_rmsnorm_kernel", {"scale_ptr": "fp32"},
     dict(HIDDEN=4096, BLOCK=4096, HAS_RESIDUAL=True, FP8=False, INTERPRET=False)),
    ("rmsnorm", "_rmsnorm_kernel", {"out_ptr": "fp8e4nv", "scale_ptr": "fp32"},
     dict(HIDDEN=4096, BLOCK=4096, HAS_RESIDUAL=True, FP8=True, INTERPRET=False)),
    ("activation", "_silu_and_mul_kernel", {}, dict(INTER=14336, BLOCK=1024, INTERPRET=False)),
    ("activation", "_silu_and_mul_fp8_kernel", {"xq_ptr": "fp8e4nv", "scale_ptr": "fp32"},
     dict(INTER=14336, BLOCK=1024, INTERPRET=False)),
    ("activation", "_silu_and_mul_fp8_kernel", {"xq_ptr": "fp8e4nv", "scale_ptr": "fp32"},
     dict(INTER=14336, BLOCK=16384, INTERPRET=False)),
    ("rope_kv_write", "_rope_kv_write_kernel", {"pos_ptr": "i64", "slot_ptr": "i64", "cos_sin_ptr": "fp32"},
     dict(NUM_Q_HEADS=32, NUM_KV_HEADS=8, BLOCK_HQ=32, BLOCK_HKV=8, HALF=64, BLOCK_HALF=64, BLOCK_SIZE=16, FP8=False,
          QK_NORM=True, INTERPRET=False)),
    ("rope", "_rope_kernel", {"pos_ptr": "i64", "cache_ptr": "fp32"},
     dict(NUM_Q_HEADS=32, NUM_KV_HEADS=8, BLOCK_HQ=32, BLOCK_HKV=8, HALF=64, BLOCK_HALF=64, INTERPRET=False)),
    ("kv_cache_write", "_kv_cache_write_kernel", {"slot_ptr": "i64"},
     dict(NUM_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, BLOCK_SIZE=16, FP8=False, INTERPRET=False)),
    ("paged_decode_attention", "_decode_partition_kernel",
     {"block_tables_ptr": "i32", "seq_lens_ptr": "i32", "part_m_ptr": "fp32", "part_l_ptr": "fp32",
      "part_acc_ptr": "fp32", "lock_ptr": "i32"},
     dict(ATTN, BLOCK_G=16, BLOCK_N=64, PARTITION=64, SPLIT=True, FOLD=True)),
    ("paged_decode_attention", "_decode_reduce_kernel",
     {"seq_lens_ptr": "i32", "part_m_ptr": "fp32", "part_l_ptr": "fp32", "part_acc_ptr": "fp32"},
     dict(HEAD_DIM=128, BLOCK_D=128, PARTITION=64, BLOCK_P=16, INTERPRET=False)),
    ("unified_attention", "_short_query_kernel",
     {"block_tables_ptr": "i32", "query_start_loc_ptr": "i32", "seq_lens_ptr": "i32", "part_m_ptr": "fp32",
      "part_l_ptr": "fp32", "part_acc_ptr": "fp32"},
     dict(ATTN, BLOCK_M=16, BLOCK_Q=4, BLOCK_N=64, NUM_SEGMENTS=4, MIN_SEGMENT=256)),
    ("unified_attention", "_short_query_reduce_kernel",
     {"query_start_loc_ptr": "i32", "seq_lens_ptr": "i32", "part_m_ptr": "fp32", "part_l_ptr": "fp32",
      "part_acc_ptr": "fp32"},
     dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_Q=4, BLOCK_N=64, NUM_SEGMENTS=4, MIN_SEGMENT=256,
          INTERPRET=False)),
    ("moe_router", "_topk_softmax_kernel", {"ids_ptr": "i64", "counts_ptr": "i64", "counted_ptr": "i64"},
     dict(K=8, BLOCK_E=128, RENORM=True, COUNT=True, INTERPRET=False)),
    ("moe_align", "_moe_align_kernel", {p: "i32" for p in ("sorted_ptr", "expert_ids_ptr", "num_post_ptr",
                                                             "next_ptr")} | {"ids_ptr": "i64"},
     dict(BLOCK_M=16, E_P2=16, CHUNK=32)),  # 8 experts: at 128 (E_P2 256) ptxas takes minutes here
    ("moe_align", "_chunk_counts_kernel", {"ids_ptr": "i64", "counts_ptr": "i32", "sorted_ptr": "i32"},
     dict(E_P2=16, SPAN=256, CHUNK=32, HIST=False)),
    ("moe_align", "_chunk_scan_kernel", {p: "i32" for p in ("counts_ptr", "base_ptr", "expert_ids_ptr",
                                                              "num_post_ptr", "ends_ptr")},
     dict(BLOCK_M=16, E_P2=16, ROWS=16, CHUNK=32, OWNERS=True)),
    ("moe_align", "_chunk_place_kernel", {"ids_ptr": "i64", "base_ptr": "i32", "sorted_ptr": "i32"},
     dict(E_P2=16, SPAN=256, CHUNK=32)),
    ("fused_moe", "_moe_gemm_kernel",
     {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "num_post_ptr": "i32",
      "part_ptr": "fp32", "lock_ptr": "i32", "scale_ptr": "fp32"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=False, GROUP=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
          SPLIT_K=1, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False)),
    ("fused_moe", "_moe_gemm_kernel",  # INT4 experts: uint8 codes, float16 group scales and mins
     {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "num_post_ptr": "i32",
      "part_ptr": "fp32", "lock_ptr": "i32", "b_ptr": "u8", "scale_ptr": "fp16", "min_ptr": "fp16"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=True, GROUP=128, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
          SPLIT_K=1, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False)),
    ("fused_moe", "_moe_gemm_kernel",  # INT4 prefill tiles (weights widened) in float16
     {"a_ptr": "fp16", "out_ptr": "fp16", "topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32",
      "num_post_ptr": "i32", "part_ptr": "fp32", "lock_ptr": "i32", "b_ptr": "u8", "scale_ptr": "fp16",
      "min_ptr": "fp16"},
     dict(GATED=False, MUL_WEIGHT=True, SCALED=False, INT4=True, GROUP=128, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64,
          SPLIT_K=1, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False)),
    ("fused_moe", "_moe_gemm_kernel",  # INT4 with float32 activations: the codes' plain widening
     {"a_ptr": "fp32", "out_ptr": "fp32", "topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32",
      "num_post_ptr": "i32", "part_ptr": "fp32", "lock_ptr": "i32", "b_ptr": "u8", "scale_ptr": "fp16",
      "min_ptr": "fp16"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=True, GROUP=128, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64,
          SPLIT_K=1, DOT_F32=True, DOT_PRECISION="ieee", INTERPRET=False)),
    ("fused_moe", "_moe_gemm_kernel",  # split-K at decode: the last split runs the epilogue
     {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "num_post_ptr": "i32",
      "part_ptr": "fp32", "lock_ptr": "i32", "b_ptr": "u8", "scale_ptr": "fp16", "min_ptr": "fp16"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=True, GROUP=128, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
          SPLIT_K=4, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False)),
    ("moe_topk_sum", "_moe_sum_kernel", {}, dict(K=8, BLOCK_H=1024, INTERPRET=False)),
    ("fused_moe", "_moe_gemm_kernel",  # one token's down GEMM summing its k rows (one pair a block)
     {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i64", "num_post_ptr": "i32",
      "part_ptr": "fp32", "lock_ptr": "i32", "scale_ptr": "fp32"},
     dict(GATED=False, MUL_WEIGHT=True, SCALED=False, INT4=False, GROUP=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
          SPLIT_K=1, SUM_SLOTS=8, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False)),
    ("skinny_rope_kv", "_skinny_rope_kv_kernel", {"pos_ptr": "i64", "slot_ptr": "i64", "cos_sin_ptr": "fp32"},
     dict(NUM_Q_HEADS=32, NUM_KV_HEADS=8, HALF=64, BLOCK_SIZE=16, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, DOT=False,
          HAS_BIAS=False, EVEN_K=True, DOT_F32=False, INTERPRET=False, LATE=False)),
    ("fused_moe", "_moe_gemm_kernel",  # block-scaled E4M3 experts (an FP8 checkpoint's 128 x 128 blocks)
     {"b_ptr": "fp8e4nv", "topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "num_post_ptr": "i32",
      "part_ptr": "fp32", "lock_ptr": "i32", "scale_ptr": "fp32"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=False, GROUP=1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128,
          SPLIT_K=1, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False, SCALE_BN=128, SCALE_BK=128)),
    ("fused_moe", "_moe_gemm_kernel",  # the GEMV form (one pair a block): gate/up in bf16, split along K
     {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i64", "num_post_ptr": "i32",
      "part_ptr": "fp32", "lock_ptr": "i32", "scale_ptr": "fp32"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=False, GROUP=1, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512,
          SPLIT_K=2, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False)),
    ("fused_moe", "_moe_gemm_kernel",  # the GEMV form's down GEMM summing one token's k rows, E4M3 blocks
     {"b_ptr": "fp8e4nv", "topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i64",
      "num_post_ptr": "i32", "part_ptr": "fp32", "lock_ptr": "i32", "scale_ptr": "fp32"},
     dict(GATED=False, MUL_WEIGHT=True, SCALED=False, INT4=False, GROUP=1, BLOCK_M=1, BLOCK_N=8, BLOCK_K=256,
          SPLIT_K=1, SUM_SLOTS=8, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False, SCALE_BN=128,
          SCALE_BK=128)),
    ("fused_moe", "_moe_gemm_kernel",  # the INT4 experts' GEMV form (gate/up, split along the code rows)
     {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i64", "num_post_ptr": "i32",
      "part_ptr": "fp32", "lock_ptr": "i32", "b_ptr": "u8", "scale_ptr": "fp16", "min_ptr": "fp16"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=True, GROUP=128, BLOCK_M=1, BLOCK_N=64, BLOCK_K=64,
          SPLIT_K=2, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False)),
    # the producers of a block-scaled FP8 layer's input: scales per token and 128 channels
    ("rmsnorm", "_rmsnorm_kernel", {"out_ptr": "fp8e4nv", "scale_ptr": "fp32"},
     dict(HIDDEN=4096, BLOCK=4096, HAS_RESIDUAL=True, FP8=True, INTERPRET=False, GROUP=128)),
    ("activation", "_silu_and_mul_fp8_kernel", {"xq_ptr": "fp8e4nv", "scale_ptr": "fp32"},
     dict(INTER=14336, BLOCK=1024, INTERPRET=False, GROUP=128)),
    ("activation", "_silu_and_mul_fp8_kernel", {"xq_ptr": "fp8e4nv", "scale_ptr": "fp32"},
     dict(INTER=12288, BLOCK=16384, INTERPRET=False, GROUP=128)),
    # the "sorted" path at Qwen3-30B-A3B's 128 experts (bucket 128 for other ranks' pairs: 256 bins)
    ("moe_align", "_chunk_counts_kernel", {"ids_ptr": "i64", "counts_ptr": "i32", "sorted_ptr": "i32"},
     dict(E_P2=256, SPAN=256, CHUNK=32, HIST=True)),
    ("moe_align", "_chunk_scan_kernel", {p: "i32" for p in ("counts_ptr", "base_ptr", "expert_ids_ptr",
                                                              "num_post_ptr", "ends_ptr")},
     dict(BLOCK_M=64, E_P2=256, ROWS=16, CHUNK=32, OWNERS=False)),
    ("moe_align", "_sorted_place_kernel", {p: "i32" for p in ("counts_ptr", "base_ptr", "ends_ptr", "sorted_ptr",
                                                                "expert_ids_ptr")} | {"ids_ptr": "i64"},
     dict(BLOCK_M=64, E_P2=256, SPAN=256, CHUNK=32)),
    # the down GEMM summing each token's k rows itself (fused_moe.TOKEN_SUM_ON_CUDA), grouped order
    ("fused_moe", "_moe_gemm_kernel",
     {"topk_w_ptr": "bf16", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "num_post_ptr": "i32",
      "lock_ptr": "i32"},
     dict(GATED=False, MUL_WEIGHT=True, SCALED=False, INT4=False, GROUP=1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
          SPLIT_K=1, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False, TOKEN_SUM=8, GROUP_M=1)),
    # the persistent down GEMM (MoEConfig.persistent) over the sorted hidden rows
    ("fused_moe_persistent", "_moe_down_persistent_kernel", _PERSISTENT_PTRS,
     dict(SCALED=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, PROGRAMS=264, DOT_F32=False,
          DOT_PRECISION="tf32", INTERPRET=False, WARP_SPEC=False)),
    # the GEMV form with its weight tiles loaded a step ahead (num_stages 2), gate/up split along K
    ("fused_moe", "_moe_gemm_kernel",
     {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i64", "num_post_ptr": "i32",
      "part_ptr": "fp32", "lock_ptr": "i32", "scale_ptr": "fp32"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=False, GROUP=1, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512,
          SPLIT_K=2, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False, GEMV_PREFETCH=True)),
]
# the INT4 experts' GEMV form (case 36) with its code tiles loaded a step ahead
CASES.append(("fused_moe", "_moe_gemm_kernel", CASES[36][2], dict(CASES[36][3], GEMV_PREFETCH=True)))
# the MoE entry in one launch: norm, router GEMV, the last program's top-k (Qwen3-30B-A3B's 128 experts)
CASES.append(("moe_norm_router", "_norm_router_kernel",
              {"weights_ptr": "bf16", "ids_ptr": "i64", "counts_ptr": "i64", "counted_ptr": "i64", "lock_ptr": "i32"},
              dict(TOP_K=8, BLOCK_E=4, BLOCK_ALL=128, BLOCK_H=512, HAS_RESIDUAL=True, RENORM=True, COUNT=True,
                   INTERPRET=False)))

# Kernels whose K loop Triton must software-pipeline (its loads become cp.async copies into
# shared memory, num_stages deep): (case index in CASES, the least number of async copies:
# three a tile at 3 stages, two in the prologue and one in the loop: the dense gate/up GEMM's
# a, gate and up tiles; the INT4 one's two activation halves and two code tiles; INT4 down's three;
# the INT4 gate/up GEMM split four ways along K; the block-scaled FP8 experts' gate/up GEMM, whose
# block scales are carried a step ahead).
# Compiled as a launch specialises them (pointers and the named ints divisible by 16): without
# that, no load is wide enough for cp.async and nothing is pipelined. The INT4 experts' code
# tiles stay pipelined only while their loads reach tl.dot through the widening in the same
# step (carried across steps in registers, as a manual prefetch would, Triton left them plain);
# their scale and min rows, which Triton does not pipeline, must be carried a step ahead, not
# waited on (llmesh/kernels/compile_check.py's LoopReport).
PIPELINED = [(25, 9), (26, 12), (27, 9), (29, 12), (33, 9)]
# Kernels whose weight stream must be 16-byte loads, as a launch specialises them (case index in
# CASES): the GEMV form reads its weight rows with plain loads, whose width is all its speed.
VECTOR_LOADS = [34, 35, 36, 45, 46, 47]
_DIVISIBLE_INTS = frozenset({"N", "K", "KH", "k_split", "stride_am", "stride_be", "stride_bn", "stride_se",
                             "stride_sg", "stride_om", "H", "stride_w", "stride_x", "stride_r"})
# (k_split: a multiple of BLOCK_K)

_GLOBAL_ACCESS = re.compile(r"\b(ld\.global|st\.global|atom\.|red\.|cp\.async)")


def check_ptx(ptx: str) -> str | None:
    """None when the kernel waits on its predecessor before its first global memory access, then
    lets its dependents launch, and reads nothing on the read-only path, else what is wrong."""
    wait = ptx.find("griddepcontrol.wait")
    if wait < 0:
        return "no griddepcontrol.wait in the PTX"
    first = _GLOBAL_ACCESS.search(ptx)
    if first is not None and first.start() < wait:
        return f"global access before the wait: {ptx[first.start():first.start() + 60]!r}"
    if "griddepcontrol.launch_dependents" not in ptx:
        return "no griddepcontrol.launch_dependents in the PTX"
    if "ld.global.nc" in ptx:  # Triton 3.6 emits none; the CUDA kernels' rule (llmesh/kernels/README.md)
        return "a read-only load (ld.global.nc): under PDL it may serve what the kernel before has not written"
    return None


def pdl_kernels() -> set[str]:
    """Every @triton.jit kernel in llmesh/kernels/ that takes PDL (so may be launched with it)."""
    from triton.runtime.jit import JITFunction

    found = set()
    for path in sorted((Path(__file__).resolve().parents[2] / "llmesh" / "kernels").glob("*.py")):
        mod = importlib.import_module(f"llmesh.kernels.{path.stem}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__ and "PDL" in obj.arg_names \
                    and name.startswith("_") and name.endswith("_kernel"):
                found.add(name)
    return found


def compile_cases() -> dict[str, str | None]:
    """Case id -> None when it compiled to PTX that waits on its predecessor first, else the
    error; "coverage" -> the PDL kernels no case compiles."""
    out: dict[str, str | None] = {}
    for i, (module, name, pointers, constexprs) in enumerate(CASES):
        try:
            fn = getattr(importlib.import_module(f"llmesh.kernels.{module}"), name)
            kernel = compile_sm90(fn, pointers, dict(constexprs, PDL=True), num_warps=4, num_stages=3)
            out[_case_id(i)] = check_ptx(kernel.asm["ptx"])
        except Exception as e:  # noqa: BLE001 - reported per case
            cause = e.__cause__ or e
            out[_case_id(i)] = f"{type(cause).__name__}: {cause}"[-3000:]
    for i, least in PIPELINED:
        module, name, pointers, constexprs = CASES[i]
        try:
            fn = getattr(importlib.import_module(f"llmesh.kernels.{module}"), name)
            kernel = compile_sm90(fn, pointers, dict(constexprs, PDL=True), divisible=_DIVISIBLE_INTS)
            report = loop_report(kernel.asm["ttgir"])
            problems = [f"{report.async_copies} async copies in the TTGIR, expected >= {least}"] \
                if report.async_copies < least else []
            if report.waited_loads[0]:
                problems.append(f"the K loop waits on plain loads each step: {report.waited_loads[0]}")
            out[f"pipelined-{_case_id(i)}"] = "; ".join(problems) or None
        except Exception as e:  # noqa: BLE001 - reported per case
            cause = e.__cause__ or e
            out[f"pipelined-{_case_id(i)}"] = f"{type(cause).__name__}: {cause}"[-3000:]
    for i in VECTOR_LOADS:
        module, name, pointers, constexprs = CASES[i]
        try:
            fn = getattr(importlib.import_module(f"llmesh.kernels.{module}"), name)
            ptx = compile_sm90(fn, pointers, dict(constexprs, PDL=True), divisible=_DIVISIBLE_INTS).asm["ptx"]
            out[f"vector-{_case_id(i)}"] = None if re.search(r"ld\.global[.\w:]*\.v4", ptx) \
                else "no 16-byte loads in the PTX"
        except Exception as e:  # noqa: BLE001 - reported per case
            cause = e.__cause__ or e
            out[f"vector-{_case_id(i)}"] = f"{type(cause).__name__}: {cause}"[-3000:]
    missing = sorted(pdl_kernels() - {c[1] for c in CASES})
    out["coverage"] = f"PDL kernels without a case: {missing}" if missing else None
    return out


# The TMA variants (MoEConfig.weight_tma and a_tma, Fp8GemmConfig.tma): their descriptor tiles must
# reach the K loop as TMA copies, software-pipelined like the cp.async ones (name, module, kernel,
# argument types, constexprs, least TMA copies: the MoE gate/up GEMM's gate and up tiles, a
# stage each in the prologue and the loop; the MoE down GEMM's hidden and weight tiles in the sorted
# layout; the FP8 GEMM's activation and weight tiles).
_MOE_PTRS = {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "num_post_ptr": "i32",
             "part_ptr": "fp32", "lock_ptr": "i32", "scale_ptr": "fp32"}
TMA_CASES = [
    ("moe-gate-up", "fused_moe", "_moe_gemm_kernel", {**_MOE_PTRS, "b_desc": "tensordesc<bf16[128, 64]>"},
     dict(GATED=True, MUL_WEIGHT=False, SCALED=False, INT4=False, GROUP=1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
          SPLIT_K=1, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False, PDL=True, WEIGHT_TMA=True), 4),
    ("moe-down-sorted", "fused_moe", "_moe_gemm_kernel",
     {**_MOE_PTRS, "a_desc": "tensordesc<bf16[128, 64]>", "b_desc": "tensordesc<bf16[128, 64]>"},
     dict(GATED=False, MUL_WEIGHT=True, SCALED=False, INT4=False, GROUP=1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
          SPLIT_K=1, DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False, PDL=True, WEIGHT_TMA=True, GROUP_M=1,
          A_SORTED=True, A_TMA=True), 4),
    ("fp8-gemm", "fp8_gemm", "_fp8_gemm_kernel",
     {"xq_ptr": "fp8e4nv", "w_ptr": "fp8e4nv", "xs_ptr": "fp32", "ws_ptr": "fp32", "part_ptr": "fp32",
      "lock_ptr": "i32", "x_desc": "tensordesc<fp8e4nv[128, 128]>", "w_desc": "tensordesc<fp8e4nv[64, 128]>"},
     dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, EVEN_K=True, SPLIT=False, INTERPRET=False, TMA=True), 4),
]


def _loop_cases(cases, copies: str, divisible: frozenset[str]) -> dict[str, str | None]:
    """Case name -> None when its K loop has at least the least number of ``copies`` (a LoopReport
    count: tma_copies or async_copies) and waits on no plain load a step, else what is wrong."""
    out: dict[str, str | None] = {}
    for name, module, kernel_name, types, constexprs, options, least in cases:
        try:
            fn = getattr(importlib.import_module(f"llmesh.kernels.{module}"), kernel_name)
            kernel = compile_sm90(fn, types, constexprs, divisible=divisible, **options)
            report = loop_report(kernel.asm["ttgir"])
            got = getattr(report, copies)
            problems = [f"{got} {copies} in the TTGIR, expected >= {least}"] if got < least else []
            if report.waited_loads and report.waited_loads[0]:
                problems.append(f"the K loop waits on plain loads each step: {report.waited_loads[0]}")
            out[name] = "; ".join(problems) or None
        except Exception as e:  # noqa: BLE001 - reported per case
            cause = e.__cause__ or e
            out[name] = f"{type(cause).__name__}: {cause}"[-3000:]
    return out


def tma_cases() -> dict[str, str | None]:
    """Case name -> None when its K loop copies its descriptor tiles through TMA, pipelined, with
    no plain load waited on a step, else what is wrong."""
    cases = [(*case[:5], dict(num_stages=3), case[5]) for case in TMA_CASES]
    return _loop_cases(cases, "tma_copies", _DIVISIBLE_INTS | {"K_PER_SPLIT", "stride_xm", "stride_wn"})


# Kernels without PDL whose K loop must still be software-pipelined with nothing waited on a step:
# (name, module, kernel, argument types, constexprs, launch options, least cp.async copies).
PLAIN_PIPELINED = [
    ("block-fp8-gemm-decode", "block_fp8_gemm", "_block_fp8_gemm_kernel",
     {"xq_ptr": "fp8e4nv", "w_ptr": "fp8e4nv", "xs_ptr": "fp32", "ws_ptr": "fp32"},
     dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BN=128, GROUP_M=8, EVEN_K=True, INTERPRET=False),
     dict(num_warps=4, num_stages=4), 6),
    ("block-fp8-gemm-prefill", "block_fp8_gemm", "_block_fp8_gemm_kernel",
     {"xq_ptr": "fp8e4nv", "w_ptr": "fp8e4nv", "xs_ptr": "fp32", "ws_ptr": "fp32"},
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, BN=128, GROUP_M=8, EVEN_K=True, INTERPRET=False),
     dict(num_warps=8, num_stages=3), 4),
]


def plain_pipelined_cases() -> dict[str, str | None]:
    """Case name -> None when its K loop copies its tiles with cp.async and waits on no plain
    load (scales carried a step ahead), else what is wrong."""
    return _loop_cases(PLAIN_PIPELINED, "async_copies",
                       _DIVISIBLE_INTS | {"stride_xm", "stride_wn", "stride_xs", "stride_ws"})


# MoEConfig.warp_spec: the sorted-layout down GEMM's K loop, and the persistent down GEMM's tile
# loop, must come out of the compiler partitioned into producer and consumer warps (a
# ttg.warp_specialize region) at 4 warps, with the top-k sum in the epilogue or not; a loop under
# an early return fails the pass (fused_moe.py). 64-row tiles, the tallest MoEConfig takes for it
# (WARP_SPEC_MAX_ROWS: at 128 rows and 4 warps Triton 3.9's pass fails the first, and 3.6 partitions
# it but the kernel never returned on an H100).
WARP_SPEC_CASES = [(f"moe-down-warp-spec-sum{token_sum}", TMA_CASES[1][1], TMA_CASES[1][2],
                    dict(TMA_CASES[1][3], a_desc="tensordesc<bf16[64, 64]>"),
                    dict(TMA_CASES[1][4], BLOCK_M=64, WARP_SPEC=True, TOKEN_SUM=token_sum)) for token_sum in (0, 8)]
WARP_SPEC_CASES.append(("moe-down-persistent-warp-spec", "fused_moe_persistent", "_moe_down_persistent_kernel",
                        _PERSISTENT_PTRS, dict(CASES[44][3], PDL=True, WARP_SPEC=True)))


def warp_spec_cases() -> dict[str, str | None]:
    """Case name -> None when its K loop is warp-specialized, else what is wrong."""
    out: dict[str, str | None] = {}
    for name, module, kernel_name, types, constexprs in WARP_SPEC_CASES:
        try:
            fn = getattr(importlib.import_module(f"llmesh.kernels.{module}"), kernel_name)
            ttgir = compile_sm90(fn, types, constexprs, divisible=_DIVISIBLE_INTS, num_warps=4,
                                 num_stages=4).asm["ttgir"]
            out[name] = None if "ttg.warp_specialize" in ttgir else "the K loop is not warp-specialized"
        except Exception as e:  # noqa: BLE001 - reported per case
            cause = e.__cause__ or e
            out[name] = f"{type(cause).__name__}: {cause}"[-3000:]
    return out


def loop_cases() -> dict[str, str | None]:
    """tma_cases, plain_pipelined_cases and warp_spec_cases together (their names are distinct)."""
    return {**tma_cases(), **plain_pipelined_cases(), **warp_spec_cases()}


# Kernels without a K loop or PDL that must still compile for sm90 (the interpreter runs code the
# compiler rejects): (name, module, kernel, argument types, constexprs).
PLAIN = [
    ("gather-kv", "extend_attention", "_gather_kv_kernel", {"tables_ptr": "i32", "cu_k_ptr": "i32"},
     dict(NUM_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, BLOCK_SIZE=16, FP8=False)),
    ("gather-kv-fp8", "extend_attention", "_gather_kv_kernel",
     {"tables_ptr": "i32", "cu_k_ptr": "i32", "k_cache_ptr": "fp8e4nv", "v_cache_ptr": "fp8e4nv",
      "k_scale_ptr": "u8", "v_scale_ptr": "u8"},
     dict(NUM_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, BLOCK_SIZE=16, FP8=True)),
]


def plain_cases() -> dict[str, str | None]:
    """Case name -> None when it compiles for sm90 with vector loads, else what is wrong."""
    out: dict[str, str | None] = {}
    for name, module, kernel_name, types, constexprs in PLAIN:
        try:
            fn = getattr(importlib.import_module(f"llmesh.kernels.{module}"), kernel_name)
            strides = frozenset(p.name for p in fn.params if p.name.startswith("stride_"))
            ptx = compile_sm90(fn, types, constexprs, divisible=strides).asm["ptx"]
            out[name] = None if re.search(r"ld\.global(\.\w+)*\.v[24]", ptx) else "no vector loads in the PTX"
        except Exception as e:  # noqa: BLE001 - reported per case
            cause = e.__cause__ or e
            out[name] = f"{type(cause).__name__}: {cause}"[-3000:]
    return out


def _case_id(i: int) -> str:
    return f"{CASES[i][1]}-{i}"


def _in_child(function: str) -> dict[str, str | None]:
    """What this module's ``function`` returns, run in a child process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json, sys; from tests.kernels.test_hopper_compile import {function}; "
            f"sys.stdout.write('@@' + json.dumps({function}()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "@@" in proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("@@", 1)[1])


@pytest.fixture(scope="module")
def compiled() -> dict[str, str | None]:
    return _in_child("compile_cases")


@pytest.mark.skipif(not _NVIDIA, reason="this Triton build has no NVIDIA backend")
@pytest.mark.parametrize("case_id", [_case_id(i) for i in range(len(CASES))] + ["coverage"])
def test_compiles_for_sm90_with_pdl(compiled, case_id):
    assert compiled[case_id] is None, compiled[case_id]


@pytest.mark.skipif(not _NVIDIA, reason="this Triton build has no NVIDIA backend")
@pytest.mark.parametrize("case_id", [f"pipelined-{_case_id(i)}" for i, _ in PIPELINED])
def test_k_loops_are_software_pipelined(compiled, case_id):
    assert compiled[case_id] is None, compiled[case_id]


@pytest.mark.skipif(not _NVIDIA, reason="this Triton build has no NVIDIA backend")
@pytest.mark.parametrize("case_id", [f"vector-{_case_id(i)}" for i in VECTOR_LOADS])
def test_weight_streams_are_16_byte_loads(compiled, case_id):
    assert compiled[case_id] is None, compiled[case_id]


@pytest.fixture(scope="module")
def compiled_loops() -> dict[str, str | None]:
    """The TMA and the non-PDL loop cases, compiled in one child process."""
    return _in_child("loop_cases")


@pytest.mark.skipif(not _NVIDIA, reason="this Triton build has no NVIDIA backend")
@pytest.mark.parametrize("name", [case[0] for case in TMA_CASES])
def test_tma_tiles_are_pipelined_tma_copies(compiled_loops, name):
    assert compiled_loops[name] is None, compiled_loops[name]


@pytest.mark.skipif(not _NVIDIA, reason="this Triton build has no NVIDIA backend")
@pytest.mark.parametrize("name", [case[0] for case in PLAIN_PIPELINED])
def test_k_loops_without_pdl_are_software_pipelined(compiled_loops, name):
    assert compiled_loops[name] is None, compiled_loops[name]


@pytest.fixture(scope="module")
def compiled_plain() -> dict[str, str | None]:
    return _in_child("plain_cases")


@pytest.mark.skipif(not _NVIDIA, reason="this Triton build has no NVIDIA backend")
@pytest.mark.parametrize("name", [case[0] for case in PLAIN])
def test_plain_kernels_compile_for_sm90_with_vector_loads(compiled_plain, name):
    assert compiled_plain[name] is None, compiled_plain[name]


@pytest.mark.skipif(not _NVIDIA, reason="this Triton build has no NVIDIA backend")
@pytest.mark.parametrize("name", [case[0] for case in WARP_SPEC_CASES])
def test_the_sorted_down_gemm_loop_is_warp_specialized(compiled_loops, name):
    assert compiled_loops[name] is None, compiled_loops[name]

"""Which loads of the GEMM and attention kernels' K loops Triton pipelines, read from an sm90
compile on the CPU (no GPU needed; llmesh/kernels/compile_check.py says how and why).

For each kernel variant below (the shapes and tiles the engine runs), compiled as a launch
specialises it, prints: cp.async copies (pipelined tile loads), wgmma ops, shared memory, and
per K loop the plain loads left in its body: "waited" when the same step uses the value (each
step waits out its latency: that is how the INT4 experts' scale rows were found, docs/moe.md),
"carried" when it goes to the next step (loaded a step ahead). The last loop of a split-K
kernel is its partial sum, outside the K loop.

Usage: python bench/ttgir_audit.py [--only NAME[,NAME]] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

from llmesh.kernels.compile_check import compile_sm90, loop_report  # noqa: E402

_QUANT = dict(DOT_F32=False, DOT_PRECISION="tf32", INTERPRET=False)
_ATTN = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, NUM_KV_HEADS=8, FP8=False, **_QUANT)
_MOE_PTRS = {"topk_w_ptr": "fp32", "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "num_post_ptr": "i32",
             "part_ptr": "fp32", "lock_ptr": "i32"}
_MOE_INT4 = dict(_MOE_PTRS, b_ptr="u8", scale_ptr="fp16", min_ptr="fp16")
_MOE = dict(MUL_WEIGHT=False, SCALED=False, PDL=False, SPLIT_K=1, **_QUANT)
_SPLIT = {"part_ptr": "fp32", "lock_ptr": "i32"}


@dataclass(frozen=True)
class Case:
    name: str
    module: str
    kernel: str
    pointers: dict
    constexprs: dict
    not_divisible: frozenset = field(default_factory=frozenset)
    """Integer arguments a launch does not see divisible by 16 (row counts, split counts)."""
    num_warps: int = 4
    num_stages: int = 3


CASES = (
    Case("moe_dense_decode", "fused_moe", "_moe_gemm_kernel", dict(_MOE_PTRS, scale_ptr="fp32"),
         dict(_MOE, GATED=True, INT4=False, GROUP=1, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128),
         frozenset({"num_pairs", "a_row_div"}), 4, 4),
    Case("moe_dense_prefill", "fused_moe", "_moe_gemm_kernel", dict(_MOE_PTRS, scale_ptr="fp32"),
         dict(_MOE, GATED=True, INT4=False, GROUP=1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
         frozenset({"num_pairs", "a_row_div"}), 8, 4),
    Case("moe_dense_prefill_down", "fused_moe", "_moe_gemm_kernel", dict(_MOE_PTRS, scale_ptr="fp32"),
         dict(_MOE, GATED=False, INT4=False, GROUP=1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
         frozenset({"num_pairs", "a_row_div"}), 8, 4),
    Case("moe_int4_decode", "fused_moe", "_moe_gemm_kernel", _MOE_INT4,
         dict(_MOE, GATED=True, INT4=True, GROUP=128, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64),
         frozenset({"num_pairs", "a_row_div"})),
    Case("moe_int4_prefill", "fused_moe", "_moe_gemm_kernel", _MOE_INT4,
         dict(_MOE, GATED=True, INT4=True, GROUP=128, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
         frozenset({"num_pairs", "a_row_div"}), 8, 4),
    Case("w4a16_bytes", "w4a16_gemm", "_w4a16_kernel", dict(_SPLIT, q_ptr="u8", s_ptr="fp16", mn_ptr="fp16"),
         dict(_QUANT, GROUP=128, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT=True), frozenset({"M", "SPLITS"})),
    Case("w4a16_words", "w4a16_gemm", "_w4a16_words_kernel", dict(_SPLIT, q_ptr="i32", s_ptr="fp16", mn_ptr="fp16"),
         dict(_QUANT, GROUP=128, BLOCK_M=16, BLOCK_C=32, BLOCK_K=64, SPLIT=True), frozenset({"M", "SPLITS"})),
    Case("w4a16_swapped", "w4a16_swapped", "_w4a16_swapped_kernel",
         dict(_SPLIT, q_ptr="u8", s_ptr="fp16", mn_ptr="fp16"),
         dict(_QUANT, GROUP=128, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT=True), frozenset({"M", "SPLITS"}), 4, 4),
    Case("w8a16_grouped_factored", "w8a16_gemm", "_w8a16_kernel", dict(_SPLIT, q_ptr="i8", s_ptr="fp16"),
         dict(_QUANT, GROUP=128, PER_CHANNEL=False, FACTORED=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT=True),
         frozenset({"M", "SPLITS"})),
    Case("w8a16_per_channel", "w8a16_gemm", "_w8a16_kernel", dict(_SPLIT, q_ptr="i8", s_ptr="fp16"),
         dict(_QUANT, GROUP=1, PER_CHANNEL=True, FACTORED=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT=True),
         frozenset({"M", "SPLITS"})),
    Case("fp8_gemm", "fp8_gemm", "_fp8_gemm_kernel",
         {"xq_ptr": "fp8e4nv", "w_ptr": "fp8e4nv", "xs_ptr": "fp32", "ws_ptr": "fp32"},
         dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, EVEN_K=True, INTERPRET=False), frozenset({"M"}), 4, 4),
    Case("skinny_dot", "skinny_gemm", "_skinny_kernel", {"part_ptr": "fp32"},
         dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, DOT=True, SPLIT=False, HAS_BIAS=False, EVEN_K=True, DOT_F32=False,
              INTERPRET=False, PDL=False), frozenset({"M", "NUM_M_BLOCKS"})),
    Case("prefill_attention", "prefill_attention", "_prefill_kernel",
         {"k_scale_ptr": "fp32", "v_scale_ptr": "fp32", "block_tables_ptr": "i32", "query_start_loc_ptr": "i32",
          "seq_lens_ptr": "i32"},
         dict(_ATTN, BLOCK_M=128, BLOCK_Q=32, BLOCK_N=32, MIN_QUERY_LEN=1),
         frozenset({"num_seqs", "stride_bt"}), 4, 4),
)


def audit(case: Case) -> dict:
    fn = getattr(importlib.import_module(f"llmesh.kernels.{case.module}"), case.kernel)
    ints = {p.name for p in fn.params if not p.is_constexpr and not p.name.endswith("_ptr")}
    kernel = compile_sm90(fn, case.pointers, case.constexprs, divisible=frozenset(ints - case.not_divisible),
                          num_warps=case.num_warps, num_stages=case.num_stages)
    report = loop_report(kernel.asm["ttgir"])
    # lop3: the exponent trick's widening of INT4 codes (llmesh/kernels/fused_moe_int4.py) made it to the PTX
    return dict(asdict(report), shared_bytes=kernel.metadata.shared, ptx_lop3=kernel.asm["ptx"].count("lop3.b32"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all): "
                                              + ", ".join(c.name for c in CASES))
    ap.add_argument("--json", default=None, help="also write the reports to this file")
    args = ap.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}")
    reports = {}
    for case in CASES:
        if wanted and case.name not in wanted:
            continue
        r = reports[case.name] = audit(case)
        loops = "; ".join(f"loop {i}: waited {len(w)}" + (f" ({', '.join(sorted(set(w)))})" if w else "")
                          + (f", carried {len(c)}" if c else "")
                          for i, (w, c) in enumerate(zip(r["waited_loads"], r["carried_loads"])))
        print(f"{case.name:26s} cp.async {r['async_copies']:3d}  wgmma {r['wgmma']} ({r['wgmma_register_lhs']} from "
              f"registers)  smem {r['shared_bytes']:6d}  "
              f"{loops}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

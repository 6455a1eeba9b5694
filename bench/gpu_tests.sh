#!/usr/bin/env bash
# The GPU-relevant tests on a CUDA machine, in parallel groups (Triton compiles on the CPU, so
# groups overlap compilation), and a summary in bench/results/gpu_tests_<dev>.json.
# Usage: bash bench/gpu_tests.sh [timeout seconds per group, default 420] [results folder, default bench/results]
# GPU_TEST_GROUPS="3 4": only those groups (0-based), recorded as gpu_tests_<dev>_groups.json (a
# rerun of groups that timed out, beside the full record it completes). The engine's tests are four
# groups (6: the triton backend, 7 and 8: the quantized formats, 11: the library kernels) and the fused
# MoE kernels one (5): on the H100 at 9b22db4 the groups they were split from ran past 400 s, and group
# 8 with the library tests past 450 s at c2f6966. Group 12 holds the CUDA C++ kernels' tests (the MoE
# layer, router and GEMV, and all inside decode graphs), so a change to them can be rerun alone.
# FBGEMM's tests need .fbgemm carried, FlashAttention-3's .fa3 (bench/README.md, the carry section).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${1:-420}
RESULTS=${2:-}
TMP=$(mktemp -d)
groups=(
  "tests/kernels/test_paged_decode_attention.py tests/kernels/test_prefill_attention.py"
  "tests/kernels/test_unified_attention.py tests/kernels/test_dense_causal_attention.py tests/kernels/test_extend_attention.py"
  "tests/kernels/test_rmsnorm.py tests/kernels/test_rope.py tests/kernels/test_rope_kv_write.py tests/kernels/test_activation.py tests/kernels/test_kv_cache_write.py tests/kernels/test_paged_attention_ref.py tests/kernels/test_fp8_gemm.py tests/kernels/test_block_fp8_gemm.py tests/kernels/test_fp8_fused_quant.py tests/kernels/test_kv_fp8_write.py tests/kernels/test_kv_fp8_attention.py tests/kernels/test_fp8_widen.py tests/engine/test_quant_w4a8.py tests/kernels/test_l2_prefetch.py"
  "tests/kernels/test_w4a16_gemm.py tests/kernels/test_w4a16_swapped.py tests/kernels/test_w4a16_mma.py tests/kernels/test_w4a16_mma_norm.py tests/kernels/test_w4a8_mma.py tests/kernels/test_w8a16_gemm.py tests/kernels/test_quant_gemv.py tests/kernels/test_quant_dequant.py"
  "tests/kernels/test_skinny_gemm.py tests/kernels/test_fused_skinny.py tests/kernels/test_skinny_rope_kv.py tests/kernels/test_moe_align.py tests/kernels/test_moe_router.py tests/kernels/test_moe_norm_router.py tests/kernels/test_attention_config.py tests/kernels/test_argmax.py tests/kernels/test_pdl.py"
  "tests/kernels/test_fused_moe.py tests/kernels/test_fused_moe_blocks.py tests/kernels/test_fused_moe_gemv.py tests/kernels/test_fused_moe_tma.py"
  "tests/engine/test_triton_backend.py tests/engine/test_async_scheduling.py tests/engine/test_kv_fp8_engine.py tests/engine/test_structured_output_async.py tests/engine/test_l2_prefetch_engine.py tests/engine/test_eager_warmup.py"
  "tests/engine/test_quant_engine.py tests/engine/test_quant_gguf_blocks.py tests/engine/test_eval_perplexity.py"
  "tests/engine/test_quant_awq_gptq.py tests/engine/test_quant_fp8_checkpoint.py tests/engine/test_int4pack.py"
  "tests/engine/test_spec_decode.py tests/engine/test_embeddings.py tests/engine/test_moe_fidelity.py -k triton"
  "tests/engine/test_tensor_parallel.py tests/engine/test_moe_ep.py -k gpus"
  "tests/engine/test_gemlite_kernels.py tests/engine/test_fbgemm_kernels.py"
  "tests/kernels/test_moe_gemv.py tests/kernels/test_router_gemv.py tests/kernels/test_cuda_sources.py tests/engine/test_cuda_gemv_engine.py"
)
ONLY=${GPU_TEST_GROUPS:-}
declare -A pids=()
for i in "${!groups[@]}"; do
  [ -z "$ONLY" ] || [[ " $ONLY " == *" $i "* ]] || continue
  # shellcheck disable=SC2086
  timeout "$LIMIT" $PY -m pytest -q -p no:cacheprovider --junitxml "$TMP/g$i.xml" ${groups[$i]} \
    > "$TMP/g$i.log" 2>&1 &
  pids[$i]=$!
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; code=$?
  [ "$code" -eq 0 ] || rc=1
  # a group killed by its time limit writes no report: name it so the record says it did not finish
  [ "$code" -eq 124 ] && echo "${groups[$i]}" >> "$TMP/timed_out"
  echo "=== group $i: ${groups[$i]}"; tail -n 15 "$TMP/g$i.log"
done
GPU_TEST_GROUPS="$ONLY" $PY - "$TMP" "$RESULTS" "$LIMIT" <<'PYEOF'
import os, sys, glob, xml.etree.ElementTree as ET
sys.path.insert(0, "bench")
import torch
from llmesh.bench_results import device_tag, write_result
totals = dict(tests=0, failures=0, errors=0, skipped=0)
failed = []
for path in sorted(glob.glob(f"{sys.argv[1]}/g*.xml")):
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    for k in totals:
        totals[k] += int(suite.get(k, 0))
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
metrics = {f"gpu_tests_{k}": v for k, v in totals.items()}
metrics["gpu_tests_passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
timed_out = open(f"{sys.argv[1]}/timed_out").read().split("\n") if os.path.exists(f"{sys.argv[1]}/timed_out") else []
metrics["gpu_tests_groups_timed_out"] = len([g for g in timed_out if g])
print(metrics, failed[:20])
only = os.environ.get("GPU_TEST_GROUPS", "").split()
command = ("GPU_TEST_GROUPS='" + " ".join(only) + "' " if only else "") + f"bash bench/gpu_tests.sh {sys.argv[3]}"
write_result(f"gpu_tests_{device_tag('cuda')}" + ("_groups" if only else ""),
             {"failed": failed, "timed_out_groups": [g for g in timed_out if g], "groups": only or "all",
              "script": "bench/gpu_tests.sh", "limit_s": int(sys.argv[3])}, metrics,
             results_dir=sys.argv[2] or None, command=command)
PYEOF
exit $rc

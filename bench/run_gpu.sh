#!/usr/bin/env bash
# The GPU benchmarks, stage by stage (STAGES, default "ceilings kernel-tests kernels decode": about
# 5-7 minutes on an H100; "serve" alone: about 5 minutes):
#   ceilings -> kernel tests on the GPU -> kernel microbenchmarks -> engine benchmarks + HF baseline
#   serve: the mesh (gateway -> router -> engine) against the engine's own port (bench/serve_gpu.py)
# Further stages, named in STAGES (a device call holds at most 10 minutes: group them to fit):
#   gpu-tests (bench/gpu_tests.sh, GPU_TESTS_LIMIT s per group), timeline (step_timeline.py),
#   structured (structured_output.py, async scheduling on and off), kv-fp8 (kv_fp8_gpu.py),
#   tp and moe-ep (2 GPUs: tp_gpu.py, moe_ep_gpu.py; NCCL multicast off as the device requires),
#   moe (moe_gpu.py), quant-sweep (quant_gpu.py --parts gemm --suffix _sweep),
#   trace (mesh_trace.py: the added TTFT from the services' spans; TRACE_TIMEOUT, 300 s),
#   block-fp8 (block_fp8_gpu.py: BLOCK_FP8_TILES all|table, BLOCK_FP8_SUFFIX).
#   causal-tables (the causal-prefill tables measured, pasted by paste_tables.py, the headline rerun),
#   skinny-tables (the skinny GEMM's TUNED and FUSED_SLOWER measured by gemm_sweep.py and pasted).
# Results: bench/results/{ceilings,kernels,decode_8b,serve_gpu}_<dev>.json; those this run wrote
# are copied to $OUT when it is set.
# A failing benchmark does not stop the next one; the script exits 1 if any failed.
# Knobs (environment): PYTHON (python3), PYTEST_TIMEOUT (150 s), HF_MAX_SECONDS (100 s),
# KERNEL_PARTS and KERNELS_SUFFIX (kernels_gpu.py's --parts and --suffix), NUM_PROMPTS (1000; smoke: 12), MODEL (random:llama3-8b), BACKEND (triton), RESULTS_DIR (bench/results),
# SERVE_TIMEOUT (420 s, a hard bound on the serve stage; its own budget is SERVE_BUDGET_S, 300 s),
# GATEWAY_WORKERS (the gateway's processes in the serve stage; default llmesh up's) and SERVE_CONNECTIONS,
# COMPARE_GATEWAY_WORKERS (M: a second gateway with M workers measured in the same serve run),
# COMPARE_ROUTE_REUSE_MS (R: that second gateway behind a router granting reused routes for R ms),
# SMOKE=1 (every script with --smoke, no nvidia-smi, no kernel tests, results to a scratch
# folder: checks this script on a machine without a GPU).
set -euo pipefail
# shellcheck source=bench/gpu_session.sh
source "$(dirname "$0")/gpu_session.sh"
step() {
  local name=$1; shift
  stamp "$name: $*"
  if ! "$@"; then FAILED+=("$name"); stamp "$name FAILED"; fi
}
OUTDIR=(--results-dir "$RESULTS_DIR")
STAGES=${STAGES:-ceilings kernel-tests kernels decode}
want() { [[ " ${STAGES//,/ } " == *" $1 "* ]]; }
mkdir -p "$RESULTS_DIR"
touch "$RESULTS_DIR/.run_start"

want ceilings && step ceilings $PY bench/gpu_ceilings.py "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
if want kernel-tests && [ "$SMOKE" != 1 ]; then
  stamp "kernel tests on the GPU (timeout ${PYTEST_TIMEOUT:-150}s)"
  timeout "${PYTEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/kernels \
    || stamp "kernel tests: failures or timeout (rc=$?), benchmarks continue"
fi
want kernels && step kernels $PY bench/kernels_gpu.py ${KERNEL_PARTS:+--parts "$KERNEL_PARTS"} \
  ${KERNELS_SUFFIX:+--suffix "$KERNELS_SUFFIX"} "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
HF=(--hf-baseline --hf-max-seconds "${HF_MAX_SECONDS:-100}")
[ "${HF_BASELINE:-1}" = 1 ] || HF=()
# causal-tables: the causal-prefill part once to measure DENSE_CAUSAL_BACKEND / EXTEND_BACKEND
# (kernels_<dev>_tables.json), bench/paste_tables.py writes them into their modules (smoke: --check),
# then causal, unified and rope_kv again for kernels_<dev>.json's headline through the tables just
# pasted (LLMESH_COMMIT, where set, marked +tables); the two modules come back with the results.
if want causal-tables; then
  step causal-measure $PY bench/kernels_gpu.py --parts causal --suffix _tables "${OUTDIR[@]}" \
    ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
  mapfile -t MEASURED < <(find "$RESULTS_DIR" -maxdepth 1 -name 'kernels_*_tables.json' \
    -newer "$RESULTS_DIR/.run_start")
  if [ ${#MEASURED[@]} -gt 0 ]; then
    CHECK=(); [ "$SMOKE" = 1 ] && CHECK=(--check)
    step paste $PY bench/paste_tables.py "${MEASURED[@]}" ${CHECK[@]+"${CHECK[@]}"}
    LLMESH_COMMIT=${LLMESH_COMMIT:+$LLMESH_COMMIT+tables} step causal-headline $PY bench/kernels_gpu.py \
      --parts causal,unified,rope_kv "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
    [ -z "${OUT:-}" ] || { mkdir -p "$OUT"
                           cp llmesh/kernels/dense_causal_attention.py llmesh/kernels/extend_attention.py "$OUT"/; }
  fi
fi
# skinny-tables: the skinny GEMM's sweep (SKINNY_SHAPES, SKINNY_MS, SKINNY_SUFFIX, SKINNY_BUDGET_S:
# gemm_sweep.py's --shapes, --ms, --suffix, --budget-s) and the fused-prologue A/B, then
# bench/paste_tables.py writes both tables (TUNED, FUSED_SLOWER) into skinny_gemm_config.py (smoke:
# --check); the A/B runs after the paste, so it times the configs just measured; the module
# comes back with the results.
if want skinny-tables; then
  step skinny-sweep $PY bench/gemm_sweep.py ${SKINNY_SHAPES:+--shapes "$SKINNY_SHAPES"} \
    ${SKINNY_MS:+--ms "$SKINNY_MS"} ${SKINNY_SUFFIX:+--suffix "$SKINNY_SUFFIX"} \
    --budget-s "${SKINNY_BUDGET_S:-150}" --out "$RESULTS_DIR" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
  CHECK=(); [ "$SMOKE" = 1 ] && CHECK=(--check)
  paste_new() {  # the result files matching $1 that this run wrote
    mapfile -t NEW < <(find "$RESULTS_DIR" -maxdepth 1 -name "$1" -newer "$RESULTS_DIR/.run_start")
    [ ${#NEW[@]} -eq 0 ] || step "paste-${2}" $PY bench/paste_tables.py "${NEW[@]}" ${CHECK[@]+"${CHECK[@]}"}
  }
  paste_new "gemm_sweep_*.json" tuned
  step skinny-ab $PY bench/gemm_sweep.py --ab-fused --out "$RESULTS_DIR" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
  paste_new "gemm_fused_ab_*.json" fused
  [ -z "${OUT:-}" ] || { mkdir -p "$OUT"; cp llmesh/kernels/skinny_gemm_config.py "$OUT"/; }
fi
want decode && step decode $PY bench/decode_gpu.py --model "${MODEL:-random:llama3-8b}" ${NUM_PROMPTS:+--num-prompts "$NUM_PROMPTS"} \
  ${HF[@]+"${HF[@]}"} ${OFFLINE_REPEATS:+--offline-repeats "$OFFLINE_REPEATS"} ${BACKEND:+--backend "$BACKEND"} \
  "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
want timeline && step timeline $PY bench/step_timeline.py ${TIMELINE_REPEATS:+--repeats "$TIMELINE_REPEATS"} \
  "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
if want structured; then
  if [ "$SMOKE" = 1 ]; then
    step structured $PY bench/structured_output.py --smoke
  else
    for mode in on off; do
      step "structured-$mode" $PY bench/structured_output.py --device cuda --backend triton \
        --model random:llama3-8b --requests 64 --new-tokens 256 --async-scheduling "$mode" "${OUTDIR[@]}"
    done
  fi
fi
want kv-fp8 && step kv-fp8 $PY bench/kv_fp8_gpu.py "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
want tp && step tp $PY bench/tp_gpu.py ${NUM_PROMPTS:+--num-prompts "$NUM_PROMPTS"} "${OUTDIR[@]}" \
  ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
want moe-ep && step moe-ep $PY bench/moe_ep_gpu.py ${NUM_PROMPTS:+--num-prompts "$NUM_PROMPTS"} "${OUTDIR[@]}" \
  ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
# moe: the fused MoE layer and the engine on Qwen3-30B-A3B's shape (MOE_AUTOTUNE=1 sweeps the
# tiles first, at MOE_TUNE_M tokens, for MOE_TUNE_WEIGHTS formats; MOE_PARTS, MOE_ENGINE_QUANT,
# MOE_SUFFIX, MOE_OFFLINE_REPEATS: moe_gpu.py's --parts, --engine-quantization, --suffix, --offline-repeats;
# MOE_TUNE_GEMV_ONLY=1: --tune-gemv-only, the batch-1 GEMV sweep alone, e.g. with MOE_PARTS=decode1;
# MOE_TUNE_ORDER_ONLY=1: --tune-order-only, no tile sweep, the refinements on the table's tiles;
# MOE_TUNE_BUDGET_S: --tune-budget-s, the seconds a format's sweep may take before it skips the rest);
# quant-sweep: the weight-only GEMM configs (QUANT_SHAPES, QUANT_MS cut the grid, QUANT_SWEEP_BUDGET_S
# bounds it). Both merge what they measure into llmesh/kernels/*_tuned.json,
# which comes back with the results.
want moe && step moe $PY bench/moe_gpu.py --parts "${MOE_PARTS:-kernel,engine}" ${MOE_AUTOTUNE:+--autotune} \
  ${MOE_TUNE_GEMV_ONLY:+--tune-gemv-only} ${MOE_TUNE_ORDER_ONLY:+--tune-order-only} \
  ${MOE_TUNE_M:+--tune-m "$MOE_TUNE_M"} ${MOE_TUNE_WEIGHTS:+--tune-weights "$MOE_TUNE_WEIGHTS"} \
  ${MOE_TUNE_BUDGET_S:+--tune-budget-s "$MOE_TUNE_BUDGET_S"} \
  ${MOE_ENGINE_QUANT:+--engine-quantization "$MOE_ENGINE_QUANT"} ${MOE_SUFFIX:+--suffix "$MOE_SUFFIX"} \
  ${MOE_OFFLINE_REPEATS:+--offline-repeats "$MOE_OFFLINE_REPEATS"} "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
want quant-sweep && step quant-sweep $PY bench/quant_gpu.py --parts gemm --suffix _sweep \
  ${QUANT_SHAPES:+--gemm-shapes "$QUANT_SHAPES"} ${QUANT_MS:+--gemm-ms "$QUANT_MS"} \
  --gemm-budget-s "${QUANT_SWEEP_BUDGET_S:-300}" "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
# block-fp8: the block-scaled FP8 GEMM's tiles (BLOCK_FP8_TILE) against cuBLASLt's and FBGEMM's
# (BLOCK_FP8_LIBRARY); BLOCK_FP8_TILES=table times only the tiles the table holds (carry .fbgemm)
want block-fp8 && step block-fp8 $PY bench/block_fp8_gpu.py --tiles "${BLOCK_FP8_TILES:-all}" \
  ${BLOCK_FP8_SUFFIX:+--suffix "$BLOCK_FP8_SUFFIX"} "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
if want gpu-tests && [ "$SMOKE" != 1 ]; then
  step gpu-tests bash bench/gpu_tests.sh "${GPU_TESTS_LIMIT:-420}" "$RESULTS_DIR"
fi
# The mesh's services are children of serve_gpu.py and die with it (parent-death signal).
want serve && step serve timeout -k 10 "${SERVE_TIMEOUT:-420}" $PY bench/serve_gpu.py \
  --budget-s "${SERVE_BUDGET_S:-300}" ${GATEWAY_WORKERS:+--gateway-workers "$GATEWAY_WORKERS"} \
  ${COMPARE_GATEWAY_WORKERS:+--compare-gateway-workers "$COMPARE_GATEWAY_WORKERS"} \
  ${COMPARE_ROUTE_REUSE_MS:+--compare-route-reuse-ms "$COMPARE_ROUTE_REUSE_MS"} \
  ${SERVE_CONNECTIONS:+--connections "$SERVE_CONNECTIONS"} "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
# trace: where the mesh's added time to first token goes, from every service's spans
want trace && step trace timeout -k 10 "${TRACE_TIMEOUT:-300}" $PY bench/mesh_trace.py "${OUTDIR[@]}" \
  ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}

stamp "results in $RESULTS_DIR"
# every file this run wrote (tp_<dev>x2, structured_<dev>_sync, ... included)
$PY - "$RESULTS_DIR" <<'EOF'
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
start = (results / ".run_start").stat().st_mtime
for path in sorted(p for p in results.glob("*.json") if p.stat().st_mtime >= start):
    doc = json.loads(path.read_text())
    if "metrics" not in doc:  # a tuned table written beside the results (smoke runs)
        print(f"\n{path.name}  (a tuned table)")
        continue
    print(f"\n{path.name}  ({doc['device']}, {doc['commit']}, {doc['date']})")
    for name, value in doc["metrics"].items():
        print(f"  {name:<40} {value:>14,.4g}" if isinstance(value, float) else f"  {name:<40} {value:>14}")
EOF
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  # Only what this run wrote: the device tool brings back at most 8 files.
  mapfile -t NEW < <(find "$RESULTS_DIR" kernels -maxdepth 1 -name '*.json' -newer "$RESULTS_DIR/.run_start")
  if [ ${#NEW[@]} -le 7 ]; then
    [ ${#NEW[@]} -eq 0 ] || cp "${NEW[@]}" "$OUT"/
  else  # more than the tool brings back one by one: one archive
    tar -czf "$OUT/results.tgz" "${NEW[@]}"
  fi
  stamp "copied ${#NEW[@]} result files to $OUT"
fi
rm -f "$RESULTS_DIR/.run_start"
stamp "done${FAILED:+; failed: ${FAILED[*]}}"
[ ${#FAILED[@]} -eq 0 ]

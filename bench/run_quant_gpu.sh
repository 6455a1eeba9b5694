#!/usr/bin/env bash
# The quantized-weights GPU run in one device call (about 8 minutes on an H200):
#   quant kernel + engine quant tests on the GPU -> bench/quant_gpu.py (ceilings, GEMMs, engine
#   per format, perplexity). Result: bench/results/quant_<dev>.json, copied to $OUT when it is set.
# quant_gpu.py writes its file after every item and runs under a hard timeout, so a slow part
# still leaves what finished (and the copy to $OUT happens). Exit status 1 if anything failed.
# Knobs (environment): PYTHON (python3), PYTEST_TIMEOUT (80 s; SKIP_TESTS=1 skips the tests),
# QUANT_TIMEOUT (420 s, hard cap of quant_gpu.py), PARTS (gemm,engine,ppl), NUM_PROMPTS (400),
# FORMATS (none,int4,fp8,int8), GEMM_BUDGET_S (110), ENGINE_BUDGET_S (190), PPL_BUDGET_S (80),
# MODEL (random:llama3-8b), RESULTS_DIR (bench/results),
# SMOKE=1 (quant_gpu.py --smoke, no nvidia-smi, no tests, results to a scratch folder: checks
# this script on a machine without a GPU).
set -euo pipefail
# shellcheck source=bench/gpu_session.sh
source "$(dirname "$0")/gpu_session.sh"

if [ "$SMOKE" != 1 ] && [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "quant tests on the GPU (timeout ${PYTEST_TIMEOUT:-80}s)"
  # Kernel files whole; elsewhere only the quantization tests. --tb=line keeps failures to a line each.
  if ! timeout "${PYTEST_TIMEOUT:-80}" $PY -m pytest -q -p no:cacheprovider --tb=line -rfE \
      tests/kernels/test_w4a16_gemm.py tests/kernels/test_w8a16_gemm.py tests/kernels/test_fp8_gemm.py \
      tests/kernels/test_quant_gemv.py tests/kernels/test_fp8_fused_quant.py \
      tests/engine -k "gemm or quant or int4 or int8 or fp8 or gguf_blocks"; then
    FAILED+=(tests)
    stamp "quant tests: failures or timeout, the benchmark still runs"
  fi
fi

stamp "quant_gpu.py (hard timeout ${QUANT_TIMEOUT:-420}s)"
if ! timeout "${QUANT_TIMEOUT:-420}" $PY bench/quant_gpu.py --results-dir "$RESULTS_DIR" \
    --parts "${PARTS:-gemm,engine,ppl}" --model "${MODEL:-random:llama3-8b}" \
    ${NUM_PROMPTS:+--num-prompts "$NUM_PROMPTS"} ${FORMATS:+--formats "$FORMATS"} \
    ${GEMM_BUDGET_S:+--gemm-budget-s "$GEMM_BUDGET_S"} ${ENGINE_BUDGET_S:+--engine-budget-s "$ENGINE_BUDGET_S"} \
    ${PPL_BUDGET_S:+--ppl-budget-s "$PPL_BUDGET_S"} ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}; then
  FAILED+=(quant_gpu)
  stamp "quant_gpu.py FAILED or timed out (its file holds what finished)"
fi

# The headline metrics only (the per-shape GEMM entries are in the file): the call's output is cut.
DEV=$(PYTHONPATH="bench${PYTHONPATH:+:$PYTHONPATH}" \
  $PY -c "from gpu_ceilings import device_tag, pick_device; print(device_tag(pick_device(None)))")
$PY - "$RESULTS_DIR/quant_$DEV.json" <<'EOF' || true
import json, sys

doc = json.load(open(sys.argv[1]))
print(f"\n{sys.argv[1]}  ({doc['device']}, {doc['commit']}, {doc['date']})")
for name, value in doc["metrics"].items():
    if not name.startswith("gemm_") or name == "gemm_bf16_tflops":
        print(f"  {name:<34} {value:>12,.4g}")
w = doc["workload"]
for key, c in w.get("gemm_configs", {}).items():
    if key != "errors" and c["best"] != c["default"]:
        b = c["best"]
        print(f"  best {key:<20} {c['best_ms']:.4f} vs {c['default_ms']:.4f} ms: block_n {b['block_n']} "
              f"block_k {b['block_k']} split_k {b['split_k']} warps {b['num_warps']} stages {b['num_stages']}")
print(f"  failed: {w.get('failed')}\n  skipped: {w.get('skipped')}")
EOF
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$RESULTS_DIR"/quant_*.json "$OUT"/ && stamp "copied $(ls "$RESULTS_DIR"/quant_*.json | wc -l) file(s) to $OUT"
  # the dispatch table the GEMM sweep merged this device's winners into (commit it with the results)
  [ "$SMOKE" = 1 ] || cp llmesh/kernels/quant_gemm_tuned.json "$OUT"/

fi
stamp "done${FAILED[0]:+; failed: ${FAILED[*]}}"
[ ${#FAILED[@]} -eq 0 ]

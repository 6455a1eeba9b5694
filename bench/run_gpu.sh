#!/usr/bin/env bash
# All GPU benchmarks of issue 7 in one device call (about 5-7 minutes on an H100):
#   ceilings -> kernel tests on the GPU -> kernel microbenchmarks -> engine benchmarks + HF baseline.
# Results: bench/results/{ceilings,kernels,decode_8b}_<dev>.json, copied to $OUT when it is set.
# A failing benchmark does not stop the next one; the script exits 1 if any failed.
# Knobs (environment): PYTHON (python3), PYTEST_TIMEOUT (150 s), HF_MAX_SECONDS (100 s),
# NUM_PROMPTS (1000; smoke: 12), MODEL (random:llama3-8b), BACKEND (triton), RESULTS_DIR (bench/results),
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

step ceilings $PY bench/gpu_ceilings.py "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
if [ "$SMOKE" != 1 ]; then
  stamp "kernel tests on the GPU (timeout ${PYTEST_TIMEOUT:-150}s)"
  timeout "${PYTEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/kernels \
    || stamp "kernel tests: failures or timeout (rc=$?), benchmarks continue"
fi
step kernels $PY bench/kernels_gpu.py "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
step decode $PY bench/decode_gpu.py --model "${MODEL:-random:llama3-8b}" ${NUM_PROMPTS:+--num-prompts "$NUM_PROMPTS"} \
  --hf-baseline --hf-max-seconds "${HF_MAX_SECONDS:-100}" ${BACKEND:+--backend "$BACKEND"} \
  "${OUTDIR[@]}" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}

stamp "results in $RESULTS_DIR"
DEV=$(PYTHONPATH="bench${PYTHONPATH:+:$PYTHONPATH}" \
  $PY -c "from gpu_ceilings import device_tag, pick_device; print(device_tag(pick_device(None)))")
$PY - "$RESULTS_DIR" "$DEV" <<'EOF'
import json, sys
from pathlib import Path

results, dev = Path(sys.argv[1]), sys.argv[2]
for path in sorted(results.glob(f"*_{dev}.json")):
    doc = json.loads(path.read_text())
    print(f"\n{path.name}  ({doc['device']}, {doc['commit']}, {doc['date']})")
    for name, value in doc["metrics"].items():
        print(f"  {name:<40} {value:>14,.4g}" if isinstance(value, float) else f"  {name:<40} {value:>14}")
EOF
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$RESULTS_DIR"/*.json "$OUT"/
  stamp "copied $(ls "$RESULTS_DIR"/*.json | wc -l) result files to $OUT"
fi
stamp "done${FAILED:+; failed: ${FAILED[*]}}"
[ ${#FAILED[@]} -eq 0 ]

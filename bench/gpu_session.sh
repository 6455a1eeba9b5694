# Sourced by bench/run_gpu.sh and bench/run_quant_gpu.sh: the shared start of a GPU session.
# Sets PY, SMOKE, SMOKE_FLAG, RESULTS_DIR, START, FAILED and stamp(); installs llmesh when it
# does not import (editable, --no-deps, from the wheels carried in .whl/, no network).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  RESULTS_DIR=${RESULTS_DIR:-$(mktemp -d)}
  SMOKE_FLAG=(--smoke)
else
  RESULTS_DIR=${RESULTS_DIR:-bench/results}
  SMOKE_FLAG=()
fi
START=$(date +%s)
FAILED=()

stamp() { echo "=== [$(( $(date +%s) - START ))s] $*"; }

[ "$SMOKE" = 1 ] || nvidia-smi -L
# The package must import as llmesh.engine / llmesh.kernels (setuptools package-dir mapping).
if ! $PY -c "import llmesh.engine.llm, llmesh.kernels" 2>/dev/null; then
  stamp "installing llmesh (editable, --no-deps, offline)"
  if compgen -G ".whl/*.whl" >/dev/null; then $PY -m pip install -q --no-index --no-deps .whl/*.whl; fi
  $PY -m pip install -q --no-deps --no-build-isolation -e .
  $PY -c "import llmesh.engine.llm, llmesh.kernels"
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# Sourced by bench/run_gpu.sh and bench/run_quant_gpu.sh: the shared start of a GPU session.
# Sets PY, SMOKE, SMOKE_FLAG, RESULTS_DIR, START, FAILED and stamp(). What the GPU image lacks
# travels in the ignored folders that bench/carry_gpu_deps.sh fills (no registry there):
#   .whl/*.whl -> pip --target /tmp/site (never into the image's environment), PYTHONPATH=/tmp/site
#   .deb/*.deb -> dpkg -x into /tmp/redisroot (never into /); LLMESH_REDIS_SERVER = a wrapper
#                 that runs its redis-server with the unpacked libraries
# then installs llmesh editable (--no-deps, no network) when it does not import.
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
if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  # a second script in the same call finds them installed (the list of wheels is the stamp)
  if ! ls .whl | cmp -s - /tmp/site/.llmesh_wheels; then
    stamp "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    ls .whl > /tmp/site/.llmesh_wheels
  fi
  [[ ":${PYTHONPATH:-}:" == *":/tmp/site:"* ]] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$SMOKE" != 1 ] && compgen -G ".deb/*.deb" >/dev/null && ! command -v redis-server >/dev/null; then
  stamp "unpacking $(ls .deb/*.deb | wc -l) carried Debian packages into /tmp/redisroot"
  for deb in .deb/*.deb; do dpkg-deb -x "$deb" /tmp/redisroot; done
  # argv[0] must name redis-server: the binary is shared with redis-check-rdb and picks its role by name.
  printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/redisroot/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec /tmp/redisroot/usr/bin/redis-server "$@"\n' \
    >/tmp/redisroot/redis-server.sh
  chmod +x /tmp/redisroot/redis-server.sh
  export LLMESH_REDIS_SERVER=/tmp/redisroot/redis-server.sh
  $LLMESH_REDIS_SERVER --version || stamp "the carried redis-server does not run here"
fi
# The package must import as llmesh.engine / llmesh.kernels (setuptools package-dir mapping).
if ! $PY -c "import llmesh.engine.llm, llmesh.kernels, llmesh.launcher" 2>/dev/null; then
  stamp "installing llmesh (editable, --no-deps, offline)"
  $PY -m pip install -q --no-deps --no-build-isolation -e .
  $PY -c "import llmesh.engine.llm, llmesh.kernels"
fi
$PY -c "import torch, triton, grpc, google.protobuf as pb
print('torch', torch.__version__, 'triton', triton.__version__, 'grpcio', grpc.__version__, 'protobuf', pb.__version__)"

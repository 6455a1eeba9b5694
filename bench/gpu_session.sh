# Sourced by bench/run_gpu.sh and bench/run_quant_gpu.sh: the shared start of a GPU session.
# Sets PY, SMOKE, SMOKE_FLAG, RESULTS_DIR, START, FAILED and stamp(). What the GPU image lacks
# travels in the ignored folders that bench/carry_gpu_deps.sh fills (no registry there):
#   .whl/*.whl, .fbgemm/*.whl, .fa3/*.whl -> pip --target /tmp/site (never into the image's
#                 environment), PYTHONPATH=/tmp/site
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
for folder in .whl .fbgemm .fa3; do
  [ "$SMOKE" != 1 ] && compgen -G "$folder/*.whl" >/dev/null || continue
  # a second script in the same call, or a later call while the machine is warm, finds them
  # installed (each folder's list of wheels is its stamp)
  if ! ls "$folder" | cmp -s - "/tmp/site/.llmesh${folder}"; then
    stamp "installing $(ls "$folder"/*.whl | wc -l) carried wheels from $folder into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$folder"/*.whl
    ls "$folder" > "/tmp/site/.llmesh${folder}"
  fi
  [[ ":${PYTHONPATH:-}:" == *":/tmp/site:"* ]] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
done
if [ "$SMOKE" != 1 ] && [ -f .fa4b/libs_cu13.tar.xz.part1 ] && [ -f .fa4/libs_cu13.tar.xz.part0 ]; then
  # FlashAttention-4 (CuTe DSL): its wheels in .fa4b, and the DSL's 92 MB CUDA-13 library wheel
  # repacked as tar.xz and split over .fa4 and .fa4b: a device call carries at most 64 MiB with
  # the tracked files, so each goes alone, in back-to-back calls (an ignored folder a call does
  # not name stays there while the machine is warm); /tmp/site then keeps the install for the
  # calls after, which carry .whl and .deb.
  if ! ls .fa4 .fa4b | cmp -s - /tmp/site/.llmesh_fa4; then
    stamp "installing FlashAttention-4 and the CuTe DSL into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fa4b/*.whl
    cat .fa4/libs_cu13.tar.xz.part0 .fa4b/libs_cu13.tar.xz.part1 | tar -xJf - -C /tmp/site
    ls .fa4 .fa4b > /tmp/site/.llmesh_fa4
  fi
fi
if [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ]; then
  # what the DSL's .pth file does in a site directory (PYTHONPATH entries read no .pth files)
  [[ ":${PYTHONPATH:-}:" == *":/tmp/site:"* ]] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
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

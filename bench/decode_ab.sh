#!/usr/bin/env bash
# The 8B shape's INT4 batch-1 decode step (bench/kernel_profile.py, its unprofiled step time the
# figure) with each set of fused inputs the dispatch table's entries may pick (LLMESH_MMA_FUSED),
# one process each, in one device call, so the variants compare on one GPU:
#   both (silu_mul and rmsnorm) / silu_mul / rmsnorm / none
# Writes kernel_profile_<dev>_b1_int4_ab_<variant>.json each.
# Usage: bash bench/decode_ab.sh VARIANT...   (RESULTS_DIR, PYTHON and SMOKE_ARG as bench/gpu_plan.sh sets them)
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash bench/decode_ab.sh VARIANT... (both, silu_mul, rmsnorm, none)" >&2; exit 2; }
rc=0
for v in "$@"; do
  case $v in
    both) fused=silu_mul,rmsnorm ;;
    silu_mul | rmsnorm | none) fused=$v ;;
    *) echo "decode_ab: unknown variant '$v'" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  LLMESH_MMA_FUSED=$fused ${PYTHON:-python3} bench/kernel_profile.py --models random:llama3-8b --quantization int4 \
    --suffix "_b1_int4_ab_$v" --results-dir "${RESULTS_DIR:-bench/results}" ${SMOKE_ARG:-} || rc=1
done
exit $rc

#!/usr/bin/env bash
# The 8B shape's INT4 batch-1 decode step (bench/kernel_profile.py, its unprofiled step time the
# figure) under variants of the fragment-order kernel's options, one process each, in one device
# call, so the variants compare on one GPU:
#   both / silu_mul / rmsnorm / none   which fused inputs the table may pick (LLMESH_MMA_FUSED)
#   l2pf<bytes>, e.g. l2pf16M          both, and each launch prefetching that many bytes of its
#                                      codes into L2 before its PDL wait (LLMESH_MMA_L2PF)
# Writes kernel_profile_<dev>_b1_int4_ab_<variant>.json each.
# Usage: bash bench/decode_ab.sh VARIANT...   (RESULTS_DIR, PYTHON and SMOKE_ARG as bench/gpu_plan.sh sets them)
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash bench/decode_ab.sh VARIANT... (both, silu_mul, rmsnorm, none, l2pf16M)" >&2; exit 2; }
rc=0
for v in "$@"; do
  fused=$v
  l2pf=0
  case $v in
    both) fused=silu_mul,rmsnorm ;;
    l2pf*) fused=silu_mul,rmsnorm; l2pf=${v#l2pf} ;;
    silu_mul | rmsnorm | none) ;;
    *) echo "decode_ab: unknown variant '$v'" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  LLMESH_MMA_FUSED=$fused LLMESH_MMA_L2PF=$l2pf ${PYTHON:-python3} bench/kernel_profile.py --models random:llama3-8b \
    --quantization int4 --suffix "_b1_int4_ab_$v" --results-dir "${RESULTS_DIR:-bench/results}" ${SMOKE_ARG:-} || rc=1
done
exit $rc

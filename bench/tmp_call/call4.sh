set -u
export LLMESH_COMMIT=$1
source bench/gpu_session.sh >/dev/null 2>&1
R=$OUT/r; mkdir -p $R
(timeout 330 python3 bench/moe_gpu.py --parts kernel,engine --results-dir $R 2>&1 | grep -E "^\[moe\]|\] \(|offline:")

#!/usr/bin/env bash
# A device call's worth of GPU steps from a plan file: the steps for this machine's GPU, in order,
# each skipped when its estimate no longer fits the call, each one's output kept in its own log
# (its last LOG_TAIL lines, 40, printed when it ends), and after every step everything written so
# far packed into $OUT/plan.tgz, so a call cut at its limit still brings back what finished (the
# reply keeps only the last 12,000 characters). A step runs in a session of its own (setsid):
# when the budget stops it, every process it started goes, those in process groups of their own
# (a script's own `timeout`) included.
# Usage: bash bench/gpu_plan.sh PLAN [BUDGET_S, default 560: a device command holds at most 600 s]
# Plan lines (bench/plans/*.plan; # starts a comment):
#   DEVICES | SECONDS | NAME | COMMAND
#   DEVICES: h100,h200 or * (matched against the GPU nvidia-smi names; cpu when SMOKE=1)
#   SECONDS: what the step is expected to take; it runs only if that fits the time left, and is
#            stopped (timeout) when the call's budget is spent
#   COMMAND: bash, in the repo root, with RESULTS_DIR, SMOKE, SMOKE_ARG (--smoke when SMOKE=1, for
#            a benchmark script run directly) and PYTHON exported and OUT unset
#            (the steps' own scripts would copy into it; this script packs for them), after
#            bench/gpu_session.sh has set the machine up once (carried wheels on PYTHONPATH,
#            llmesh installed; not with SMOKE=1), so a step may run a benchmark script directly
# The results carry LLMESH_COMMIT: the device's copy of the tree has no .git, so the command line
# must set it (the script stops at once otherwise, before any device time goes on results that
# would read "unknown").
# Knobs: STEPS (a comma list of step names: only those, e.g. the second call of a plan longer than
# one), SMOKE=1 (RESULTS_DIR a scratch folder, device "cpu": checks a plan on a machine without a
# GPU), DEVICE_KEY (overrides the GPU's name), RESERVE_S (kept back for the last pack, 15), DRY_RUN=1
# (lists the steps this device would run, as if each took its estimate, and runs none).
set -uo pipefail
cd "$(dirname "$0")/.."
PLAN=${1:?usage: bash bench/gpu_plan.sh PLAN [BUDGET_S]}
BUDGET=${2:-560}
RESERVE=${RESERVE_S:-15}
SMOKE=${SMOKE:-0}
trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; printf '%s' "${s%"${s##*[![:space:]]}"}"; }

[ -f "$PLAN" ] || { echo "gpu_plan: no plan file $PLAN" >&2; exit 2; }
if [ -z "${LLMESH_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "gpu_plan: LLMESH_COMMIT is unset and this tree has no .git: set it to the commit the tree is" >&2
  exit 2
fi
# The plan read once, checked whole (a malformed line, or a STEPS name it lacks, stops it before
# any step runs): P_DEVICES, P_SECONDS, P_NAMES, P_COMMANDS, one entry a step.
P_DEVICES=(); P_SECONDS=(); P_NAMES=(); P_COMMANDS=()
while IFS='|' read -r devices seconds name command || [ -n "$devices" ]; do
  devices=$(trim "$devices")
  [ -z "$devices" ] || [[ "$devices" == \#* ]] && continue
  seconds=$(trim "$seconds"); name=$(trim "$name"); command=$(trim "$command")
  if [ -z "$command" ] || ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "gpu_plan: malformed line for step '$name' (DEVICES | SECONDS | NAME | COMMAND)" >&2; exit 2
  fi
  P_DEVICES+=("$devices"); P_SECONDS+=("$seconds"); P_NAMES+=("$name"); P_COMMANDS+=("$command")
done < "$PLAN"
WANTED=${STEPS:-}
for want in ${WANTED//,/ }; do
  [[ " ${P_NAMES[*]} " == *" $want "* ]] \
    || { echo "gpu_plan: STEPS names '$want', which $PLAN has no step of" >&2; exit 2; }
done
if [ "$SMOKE" = 1 ]; then
  DEVICE=${DEVICE_KEY:-cpu}
  export RESULTS_DIR=${RESULTS_DIR:-$(mktemp -d)}
else
  DEVICE=${DEVICE_KEY:-$(nvidia-smi -L 2>/dev/null | grep -o -i -m1 'H[0-9]00' | tr '[:upper:]' '[:lower:]')}
  export RESULTS_DIR=${RESULTS_DIR:-bench/results}
fi
[ -n "$DEVICE" ] || { echo "gpu_plan: no H100 or H200 in nvidia-smi -L (set DEVICE_KEY)" >&2; exit 2; }
SMOKE_ARG=$([ "$SMOKE" = 1 ] && echo --smoke)
export SMOKE SMOKE_ARG RESULTS_DIR
T0=$(date +%s)  # the call's budget counts the setup too
STAMP_FILE=$(mktemp)  # its mtime: what is newer was written by the plan (the tree's copy is older)
if [ "${DRY_RUN:-0}" != 1 ] && [ "$SMOKE" != 1 ]; then
  # shellcheck source=bench/gpu_session.sh
  source bench/gpu_session.sh
fi
export PYTHON=${PY:-${PYTHON:-python3}}
START=$T0
stamp() { echo "=== plan [$(( $(date +%s) - START ))s] $*"; }
PACK=${OUT:-}
unset OUT
LOGS=$(mktemp -d)/logs
mkdir -p "$LOGS" "$RESULTS_DIR"

pack() {  # every result, tuned table and module written since the start, and the logs
  [ -n "$PACK" ] || return 0
  mkdir -p "$PACK"
  mapfile -t NEW < <(find "$RESULTS_DIR" llmesh/kernels -maxdepth 1 -type f \
    \( -name '*.json' -o -name '*.py' \) -newer "$STAMP_FILE" | sort)
  tar -czf "$PACK/plan.tgz.part" "${NEW[@]}" -C "$(dirname "$LOGS")" logs && mv "$PACK/plan.tgz.part" "$PACK/plan.tgz"
}

stamp "device $DEVICE, plan $PLAN, budget ${BUDGET}s, commit ${LLMESH_COMMIT:-$(git rev-parse HEAD)}"
SUMMARY=()
FAILED=0
DRY_SPENT=0  # DRY_RUN: the estimates of the steps listed so far, as if they had run
n=0
for i in "${!P_NAMES[@]}"; do
  devices=${P_DEVICES[$i]} seconds=${P_SECONDS[$i]} name=${P_NAMES[$i]} command=${P_COMMANDS[$i]}
  [[ "$devices" == "*" || ",${devices// /}," == *",$DEVICE,"* ]] || continue
  [ -z "${STEPS:-}" ] || [[ ",${STEPS// /}," == *",$name,"* ]] || continue
  n=$((n + 1))
  if [ "${DRY_RUN:-0}" = 1 ]; then
    left=$(( BUDGET - RESERVE - DRY_SPENT ))
  else
    left=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
  fi
  if [ "$seconds" -gt "$left" ] || [ "$left" -lt 1 ]; then  # (timeout 0 would mean no limit)
    stamp "skip $name: expects ${seconds}s, ${left}s left"
    SUMMARY+=("$name: skipped (${seconds}s > ${left}s left)")
    continue
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "would run $name (${seconds}s of ${left}s left): $command"
    DRY_SPENT=$((DRY_SPENT + seconds))
    continue
  fi
  log=$(printf '%s/%02d-%s.log' "$LOGS" "$n" "${name//[^A-Za-z0-9_.-]/_}")
  stamp "step $name (expects ${seconds}s, ${left}s left): $command"
  t0=$(date +%s)
  # not a process group leader (no job control here), so setsid execs in place: $! is the session id
  setsid bash -c "$command" </dev/null >"$log" 2>&1 &
  sid=$!
  cut=0
  while kill -0 "$sid" 2>/dev/null; do
    if [ $(( $(date +%s) - t0 )) -ge "$left" ]; then
      cut=1
      pkill -TERM -s "$sid" 2>/dev/null || kill -TERM -- "-$sid" 2>/dev/null
      for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$sid" 2>/dev/null || break; sleep 1; done
      pkill -KILL -s "$sid" 2>/dev/null || kill -KILL -- "-$sid" 2>/dev/null
      break
    fi
    sleep 1
  done
  wait "$sid"
  rc=$?
  pkill -KILL -s "$sid" 2>/dev/null  # whatever the step left behind in its session
  took=$(( $(date +%s) - t0 ))
  tail -n "${LOG_TAIL:-40}" "$log"
  [ "$rc" -eq 0 ] && [ "$cut" -eq 0 ] || FAILED=1
  verdict=$([ "$cut" -eq 1 ] && echo "timed out" || { [ "$rc" -eq 0 ] && echo ok || echo "failed rc=$rc"; })
  stamp "step $name: $verdict in ${took}s"
  SUMMARY+=("$name: $verdict in ${took}s (log $(basename "$log"))")
  pack
done

stamp "summary"
[ ${#SUMMARY[@]} -eq 0 ] || printf '  %s\n' "${SUMMARY[@]}"
find "$RESULTS_DIR" llmesh/kernels -maxdepth 1 -type f \( -name '*.json' -o -name '*.py' \) -newer "$STAMP_FILE" \
  | sort | sed 's/^/  wrote /'
[ -z "$PACK" ] || stamp "packed into $PACK/plan.tgz"
rm -f "$STAMP_FILE"
exit "$FAILED"

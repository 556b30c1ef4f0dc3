#!/usr/bin/env bash
# The `phantom-gpu` study on one GPU in one command, from the repository root, with $OUT set:
# every notebook step at 256 / 512 / 1024 / 2048 px (benchmarks/phantom_gpu_session.py runs the
# notebooks' own code without papermill, which a bare GPU machine lacks), then torch.compile with
# what time is left, stopping itself before --budget-seconds (default 540) with what it has packed.
#
#   OUT=/tmp/out CXR_COMMIT=<commit> bash benchmarks/phantom_gpu_session.sh                 # GPU
#   OUT=/tmp/out CXR_COMMIT=<commit> bash benchmarks/phantom_gpu_session.sh --budget-seconds 180
#                                    # again at once: completed steps are skipped, then torch.compile
#   OUT=/tmp/out bash benchmarks/phantom_gpu_session.sh --dry-run --work-dir /tmp/dry   # CPU, tiny
#
# Into $OUT: phantom_gpu_session.tar.gz (tables, figures, histories, training logs, executed
# notebooks, session.json), session.json (each step's planned and measured seconds, device, date,
# commit), summary.md (the results in short) and session.log (this output). CXR_COMMIT names the
# commit when the copy has no .git. docs/performance.md has the exact `run` call.

set -u -o pipefail
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_MININTERVAL=10 OMP_WAIT_POLICY=PASSIVE
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " == *" --dry-run "* ]]; then
    PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
else
    PY=${PYTHON:-python3}
fi
BUDGET=540
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[i]}" == --budget-seconds ]] && BUDGET=${args[i + 1]%.*}
done

{
    echo "=== $(date -u +%FT%TZ) phantom_gpu_session.sh: $PY, budget ${BUDGET} s, commit ${CXR_COMMIT:-?}"
    # The driver stops itself before the budget; this outer limit only catches a hang (then the
    # pack below still runs).
    timeout --signal=INT --kill-after=15 $((BUDGET + 30)) "$PY" benchmarks/phantom_gpu_session.py "$@"
    rc=$?
    if [[ ! -f "$OUT/phantom_gpu_session.tar.gz" ]]; then
        echo "=== no archive after exit code $rc: packing what exists"
        timeout 60 "$PY" benchmarks/phantom_gpu_session.py "$@" --pack-only
    fi
    echo "=== $(date -u +%FT%TZ) exit code $rc"
    exit $rc
} 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"

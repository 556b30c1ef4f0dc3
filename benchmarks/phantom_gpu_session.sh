#!/usr/bin/env bash
# The `phantom-gpu` study on one GPU in one command, from the repository root, with $OUT set: the
# pipeline itself, `python -m cxrlib.pipeline --preset phantom-gpu` (every notebook through papermill,
# 256 / 512 / 1024 / 2048 px), stopped at the session's time limit, then its results packed.
#
#   OUT=/tmp/out CXR_COMMIT=<commit> bash benchmarks/phantom_gpu_session.sh                # GPU
#   OUT=/tmp/out CXR_COMMIT=<commit> bash benchmarks/phantom_gpu_session.sh --budget-seconds 200
#                              # again on the same machine: complete steps are skipped, training resumes
#   OUT=/tmp/out bash benchmarks/phantom_gpu_session.sh --dry-run --work-dir /tmp/dry   # CPU, tiny sizes
#
# papermill, nbclient, ipykernel and what they need that the GPU machine lacks travel as wheels in
# .whl/ (benchmarks/session_wheels.txt; docs/performance.md says how to fetch them and has the exact
# `run` call); without .whl/ the installed packages are used. Into $OUT: phantom_gpu_session.tar.gz
# (tables, figures, histories, training logs, executed notebooks, provenance.json), summary.md and
# session.log. CXR_COMMIT names the commit when the copy has no .git.
#
# Every command has a time limit, and together they stay within the budget (default 585 s), less
# than the 600 s a device call may run (tests/test_phantom_gpu_session.py checks the arithmetic):
# setup (wheels and the import check) SETUP_S, the pipeline what is left less STOP_S (SIGINT at its
# limit, SIGKILL STOP_S later) and PACK_S, then the pack PACK_S.

set -u -o pipefail
: "${OUT:?set OUT to the folder that receives the results}"
BUDGET_S=585 SETUP_S=60 STOP_S=15 PACK_S=30
DRY=0 WORK="" PIPELINE_S=""
while (($#)); do
    case $1 in
        --budget-seconds) BUDGET_S=${2%.*}; shift ;;
        --pipeline-seconds) PIPELINE_S=${2%.*}; shift ;;  # a shorter limit for the pipeline (tests)
        --dry-run) DRY=1 ;;
        --work-dir) WORK=$2; shift ;;
        *) echo "error: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
((DRY)) && [[ -z $WORK ]] && { echo "error: --dry-run needs --work-dir" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
WORK=${WORK:+$(mkdir -p "$WORK" && cd "$WORK" && pwd)}
SITE=${WORK:-/tmp/cxr_session}/site
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_MININTERVAL=10 OMP_WAIT_POLICY=PASSIVE
export PYTHONPATH="$SITE:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
if ((DRY)); then  # a small, shared CPU: slower setup, stop and packing, and no device limit to respect
    SETUP_S=180 STOP_S=60 PACK_S=90
    PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    RUN=(--preset "$WORK/phantom-gpu-dry-run.yaml" --run-dir "$WORK/run" --figures-dir "$WORK/figures")
    SETUP=(--dry-run --work-dir "$WORK")
else
    PY=${PYTHON:-python3}
    RUN=(--preset phantom-gpu)
    SETUP=()
fi

{
    echo "=== $(date -u +%FT%TZ) phantom_gpu_session.sh: $PY, budget $BUDGET_S s, commit ${CXR_COMMIT:-?}"
    timeout "$SETUP_S" "$PY" benchmarks/phantom_gpu_session.py setup --site "$SITE" "${SETUP[@]}"
    rc=$?
    if ((rc == 0)); then
        left=$((BUDGET_S - SECONDS - STOP_S - PACK_S))
        limit=${PIPELINE_S:-$left}
        ((limit > left)) && limit=$left
        if ((limit < 1)); then
            echo "=== no time left for the pipeline" && rc=124
        else
            echo "=== $(date -u +%T) python -m cxrlib.pipeline ${RUN[*]}: stopped after $limit s if not done"
            timeout --signal=INT --kill-after="$STOP_S" "$limit" "$PY" -m cxrlib.pipeline "${RUN[@]}"
            rc=$?
        fi
        ((rc == 124 || rc == 137)) && echo "=== the pipeline was stopped at its time limit: run again to resume"
    fi
    echo "=== $(date -u +%T) packing (pipeline exit code $rc)"
    timeout "$PACK_S" "$PY" benchmarks/phantom_gpu_session.py pack --out "$OUT" "${RUN[@]}"
    echo "=== $(date -u +%FT%TZ) exit code $rc after $SECONDS s"
    exit $rc
} 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"

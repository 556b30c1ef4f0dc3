#!/usr/bin/env bash
# One prepared run on a lent GPU machine (H100 or H200), from the repository root, with $OUT set:
# the machine's description, two short phantom training runs with bf16 at 256 and 1024 px
# (python -m cxrlib.train, 2 epochs each; their history.csv files) and the throughput benchmark
# (benchmarks/bench_throughput.py at 256 / 512 / 1024 / 2048 px). Everything is logged to
# $OUT/gpu_session.log; $OUT receives six small files (log, benchmark CSV / JSON / TXT, histories).
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh                  # on the GPU machine
#   CPU_DRY_RUN=1 OUT=/tmp/out bash benchmarks/gpu_session.sh    # the same steps on the CPU, tiny
#
# Python packages the machine lacks (tqdm, pyyaml) are installed from wheels in .whl/ when their
# import fails (docs/performance.md says how to fetch them). Every step has its own time limit,
# cut to what is left of the whole run's limit (SESSION_LIMIT seconds, 450 on the GPU); a step
# that fails or runs out of time is reported and the next one runs.

set -u -o pipefail
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK=${WORK:-/tmp/cxr_gpu_session}
NPROC=$(nproc)

if [[ "${CPU_DRY_RUN:-0}" == 1 ]]; then
    PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    SESSION_LIMIT=${SESSION_LIMIT:-900}
    BENCH_ARGS=(--device cpu --quick)
    TRAIN_RESOLUTIONS=(64 128)
    TRAIN_ARGS=(--device cpu --max-train-images 16)
    PHANTOM_ARGS=(--subjects 24 --max-size 256)
    SLOWER=4  # step time limits x 4 on a small CPU
    export OMP_NUM_THREADS=1  # a small shared CPU: one thread per process is fastest
else
    PY=${PYTHON:-python3}
    SESSION_LIMIT=${SESSION_LIMIT:-450}
    BENCH_ARGS=(--device cuda --resolutions 256 512 1024 2048 --seconds 1.5 --compile-timeout 120)
    TRAIN_RESOLUTIONS=(256 1024)
    TRAIN_ARGS=()
    PHANTOM_ARGS=(--subjects 200 --max-size 1280)
    SLOWER=1
fi

FAILED=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND under min(SECONDS, time left), report rc and time
    local name=$1 limit=$(($2 * SLOWER))
    shift 2
    local left=$((SESSION_LIMIT - SECONDS))
    if ((left < 15)); then
        echo "=== $name: skipped, ${left} s left of ${SESSION_LIMIT} s"
        FAILED=$((FAILED + 1))
        return 1
    fi
    ((limit > left)) && limit=$left
    local started=$SECONDS
    echo "=== $name (limit ${limit} s, at ${started} s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: rc $rc after $((SECONDS - started)) s$( ((rc == 124)) && echo ' (time limit)')"
    ((rc != 0)) && FAILED=$((FAILED + 1))
    return $rc
}

install_missing_packages() {
    local wheels=() module pattern
    for pair in tqdm:tqdm yaml:pyyaml; do
        module=${pair%%:*} pattern=${pair##*:}
        "$PY" -c "import $module" 2>/dev/null && continue
        wheels+=(.whl/"$pattern"-*.whl)
    done
    if ((${#wheels[@]} == 0)); then
        echo "tqdm and yaml import: nothing to install"
        return 0
    fi
    echo "installing ${wheels[*]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" || return 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
}

describe_machine() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'not in the copy')"
    if [[ "${CPU_DRY_RUN:-0}" != 1 ]]; then
        timeout 30 nvidia-smi -L
        timeout 30 nvidia-smi --format=csv \
            --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,power.draw
    fi
    echo "cores: $NPROC"
    free -g | head -2
    df -h /dev/shm /tmp | sed 's/^/  /'
    timeout 60 "$PY" -c "import sys, torch, torchvision, PIL; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| torchvision', torchvision.__version__, '| pillow', PIL.__version__, '| cuda', \
torch.cuda.is_available() and torch.cuda.get_device_name(0))"
}

train_on_phantom() {  # issue 3: short bf16 runs on a phantom of a few hundred images
    local data=$WORK/train_data
    step phantom 45 "$PY" -m cxrlib.phantom --out "$data/phantom" "${PHANTOM_ARGS[@]}" --workers "$NPROC" ||
        return 1
    step index 20 "$PY" -m cxrlib.datasets --dataset mimic --data-root "$data/phantom" \
        --out "$data/index.csv" || return 1
    step folds 20 "$PY" -m cxrlib.splits --index "$data/index.csv" --folds 5 --seed 0 \
        --out "$data/folds.csv" || return 1
    step cache 40 "$PY" -m cxrlib.cache --index "$data/index.csv" --out "$data/cache" \
        --resolutions "${TRAIN_RESOLUTIONS[@]}" --workers "$NPROC" --no-progress || return 1
    local resolution run
    for resolution in "${TRAIN_RESOLUTIONS[@]}"; do
        run=$data/runs/res$resolution
        step "train $resolution px" 90 "$PY" -m cxrlib.train --index "$data/index.csv" \
            --folds "$data/folds.csv" --cache "$data/cache" --resolution "$resolution" --fold 0 \
            --out "$run" --epochs 2 --weights none --no-resume "${TRAIN_ARGS[@]}"
        if [[ -f "$run/history.csv" ]]; then
            cp "$run/history.csv" "$OUT/history_res$resolution.csv"
            echo "--- history.csv at $resolution px:"
            cat "$run/history.csv"
        fi
    done
}

benchmark() {  # issue 7: the throughput table; gets the time left, less a margin for the summary
    local left=$((SESSION_LIMIT - SECONDS - 20))
    step benchmark "$left" "$PY" benchmarks/bench_throughput.py "${BENCH_ARGS[@]}" \
        --time-limit $((left - 45)) --work-dir "$WORK" --out "$OUT/bench_throughput.csv"
}

main() {
    local mode=GPU
    [[ "${CPU_DRY_RUN:-0}" == 1 ]] && mode="CPU dry run"
    echo "=== gpu_session ($mode): limit ${SESSION_LIMIT} s, results in $OUT"
    rm -rf "$WORK" && mkdir -p "$WORK"
    install_missing_packages || { echo "=== packages: install failed"; FAILED=$((FAILED + 1)); }
    describe_machine
    train_on_phantom
    benchmark
    echo "=== summary after $SECONDS s ($FAILED step(s) failed or skipped)"
    [[ -f "$OUT/bench_throughput.txt" ]] && cat "$OUT/bench_throughput.txt"
    for file in "$OUT"/history_res*.csv; do
        [[ -f "$file" ]] && echo "--- $(basename "$file")" && cat "$file"
    done
    rm -rf "$WORK"
    return $((FAILED > 0))
}

main 2>&1 | tee "$OUT/gpu_session.log"
exit "${PIPESTATUS[0]}"

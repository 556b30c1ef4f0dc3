#!/usr/bin/env bash
# A quick look at the phantom in the paper's regime on one GPU: DenseNet121 from scratch at
# 128 / 256 / 512 / 1024 px for the same number of epochs, then test AUC per finding and of the
# stacked ensemble. Smaller than the `phantom-gpu` preset (a phantom written at 1024 px, one fold)
# so that it runs in a few minutes on an H100 / H200 (on an H200: data 56 s, then about 1 min
# per resolution up to 512 px, of which 30 s is the first epoch's start-up; give it 8 minutes).
# Results go to $OUT.
#
#   OUT=/tmp/out bash benchmarks/phantom_gpu_quick.sh
#   CPU_DRY_RUN=1 OUT=/tmp/out bash benchmarks/phantom_gpu_quick.sh   # tiny, to test the script
set -u -o pipefail
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
WORK=${WORK:-/tmp/phantom_gpu_quick}
if [[ "${CPU_DRY_RUN:-0}" == 1 ]]; then
    PY=${PYTHON:-.venv/bin/python}; SUBJECTS=30; MAX_SIZE=128; RESOLUTIONS=(32 64); EPOCHS=1; EXTRA=(--device cpu)
else
    PY=${PYTHON:-python3}; SUBJECTS=${SUBJECTS:-600}; MAX_SIZE=1024; RESOLUTIONS=(128 256 512 1024)
    EPOCHS=${EPOCHS:-6}; EXTRA=()
fi
if ! "$PY" -c "import tqdm, yaml" 2>/dev/null; then
    # A bare GPU machine may lack these two; wheels in .whl/ (see docs/performance.md).
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
rm -rf "$WORK" && mkdir -p "$WORK"
{
    echo "=== $(date -u +%FT%TZ) phantom: $SUBJECTS subjects, max size $MAX_SIZE; resolutions ${RESOLUTIONS[*]}"
    "$PY" -m cxrlib.phantom --out "$WORK/phantom" --subjects "$SUBJECTS" --seed 0 --max-size "$MAX_SIZE" \
        --workers "$(nproc)" --prevalence balanced >/dev/null &&
    "$PY" -m cxrlib.datasets --dataset mimic --data-root "$WORK/phantom" --out "$WORK/index.csv" | head -2 &&
    "$PY" -m cxrlib.splits --index "$WORK/index.csv" --folds 5 --seed 0 --out "$WORK/folds.csv" &&
    "$PY" -m cxrlib.cache --index "$WORK/index.csv" --out "$WORK/cache" --resolutions "${RESOLUTIONS[@]}" \
        --workers "$(nproc)" --no-progress || exit 1
    for R in "${RESOLUTIONS[@]}"; do
        echo "=== $(date -u +%T) train $R px"
        "$PY" -m cxrlib.train --index "$WORK/index.csv" --folds "$WORK/folds.csv" --cache "$WORK/cache" \
            --resolution "$R" --fold 0 --out "$WORK/runs/res$R/fold0" --epochs "$EPOCHS" --weights none \
            --batch-size 32 --effective-batch 32 --lr 0.001 --no-resume "${EXTRA[@]}" 2>&1 |
            grep -E "epoch [0-9]+:|effective batch|done:" | grep -v "batch/s"
        cp "$WORK/runs/res$R/fold0/history.csv" "$OUT/history_res$R.csv" 2>/dev/null
    done
    cp "$WORK/folds.csv" "$WORK/index.csv" "$WORK/runs/" 2>/dev/null
    echo "=== $(date -u +%T) evaluation"
    "$PY" - "$WORK/runs" "$OUT" "${RESOLUTIONS[@]}" <<'PYEOF'
import sys, warnings
warnings.filterwarnings("ignore")
from cxrlib import ensemble, metrics
from cxrlib.index import read_index
run, out, resolutions = sys.argv[1], sys.argv[2], [int(r) for r in sys.argv[3:]]
index = read_index(f"{run}/index.csv")
test = metrics.load_predictions(run, resolutions, [0], "test")
val = metrics.load_predictions(run, resolutions, [0], "val")
fits = ensemble.fit_fold_ensembles(val, test, index, resolutions, [0])
auc = metrics.auc_table({**test, **fits.predictions}, index)
auc.to_csv(f"{out}/auc.csv", index=False)
ensemble.ensemble_weights_table(fits.weights).to_csv(f"{out}/ensemble_weights.csv", index=False)
table = auc.pivot_table(index="finding", columns="resolution", values="auc", aggfunc="first")
table.loc["Average"] = table.mean()
print(table.round(3).to_string())
print("test images:", len(next(iter(test.values()))), "| converged:", bool(fits.convergence["converged"].all()))
PYEOF
    echo "=== $(date -u +%T) done after $SECONDS s"
} 2>&1 | tee "$OUT/phantom_gpu_quick.log"

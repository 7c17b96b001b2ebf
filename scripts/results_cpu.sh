#!/usr/bin/env bash
# The CPU experiments of docs/RESULTS.md: 5 configurations x folds 0-2 of configs/cv_cpu.yaml.
#   bash scripts/results_cpu.sh            (JOBS=2 THREADS=1: two runs at a time, one thread each)
# Runs go to runs/cv_cpu/<variant>/runs/fold<F>_seed0 (a finished run is reused), each job's output to
# runs/cv_cpu/<variant>/fold<F>.log; the summaries are copied to docs/results/cv_cpu_<variant>.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
FOLDS=${FOLDS:-"0 1 2"}
OUT=runs/cv_cpu
overrides() {  # the --set arguments of one configuration
  case $1 in
    baseline) ;;
    hard_neg) echo "supcon.apply=true supcon.loss=hard supcon.hard_neg=true" ;;
    hard_random) echo "supcon.apply=true supcon.loss=hard supcon.hard_neg=false" ;;
    supcon) echo "supcon.apply=true supcon.loss=supcon" ;;
    instance) echo "supcon.apply=true supcon.loss=instance" ;;
    *) echo "unknown configuration $1" >&2; return 1 ;;
  esac
}
ORDER=${ORDER:-"baseline hard_neg hard_random supcon instance"}

jobs_list() {
  for name in $ORDER; do for fold in $FOLDS; do echo "$name $fold"; done; done
}
run_one() {  # one (variant, fold): a one-fold cv.py call, so that JOBS of them can run side by side
  local name=$1 fold=$2
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$THREADS python scripts/cv.py --config configs/cv_cpu.yaml --folds "$fold" --out "$OUT/$name" \
    --set $(overrides "$name") > "$OUT/$name/fold$fold.log" 2>&1 && echo "done $name fold $fold" || echo "FAILED $name fold $fold"
}
export -f run_one overrides
export OUT THREADS

jobs_list | xargs -P "$JOBS" -L 1 bash -c 'run_one "$0" "$1"'

mkdir -p docs/results
for name in $ORDER; do  # every fold is finished now: cv.py only reads them and writes the summary
  # shellcheck disable=SC2086
  python scripts/cv.py --config configs/cv_cpu.yaml --folds $FOLDS --out "$OUT/$name" --set $(overrides "$name") > /dev/null
  cp "$OUT/$name/cv_summary.json" "docs/results/cv_cpu_$name.json"
  cp "$OUT/$name/cv_summary.md" "docs/results/cv_cpu_$name.md"
done
echo "summaries in docs/results/cv_cpu_*.json"

#!/usr/bin/env bash
# The GPU check, as one script for a lent GPU: `bash scripts/gpu_check.sh` (the device tool). It starts no step
# once the time budget no longer covers the step's estimate (GPU_CHECK_BUDGET_S, default 480 s = 8 minutes: the
# estimates of all steps on an H100 add up to about 7.5; the former all-in-one check took about 6) and caps each
# step's timeout at what is left, so it ends within the budget plus at most 15 s.
#
# Steps, cheapest first, each a process of its own under timeout(1). A failing step is recorded and the next runs.
#   env                      the GPU, its memory, PyTorch / CUDA versions, whether torch.nn.attention.varlen exists;
#                            checks the imports (torch, fair-esm, numpy, pandas, yaml, sklearn, tqdm, safetensors)
#                            and the data folder (../shared/data/mutarget or $DATA_ROOT): the steps that lack them
#                            are recorded as skipped; when nothing can run, exit 2
#   test_packing, test_...   python -m pytest on tests/test_packing.py and on every test file that needs CUDA
#                            (pytest comes with requirements-test.txt, the README's install command for the tests)
#                            (the files that call cuda.is_available), one step per file
#   bench_load               scripts/bench_real.py writes a random ESM-2 650M into $BENCH_DIR (once) and times
#                            loading it in both formats
#   bench_<mode>_<layout>    scripts/bench_real.py, one mode in one layout, bf16: the SupCon workload (8 anchors x
#                            (1 + 3 + 9) real proteins), 2 warm-up + 4 timed steps; lora, adapter, last_k, full,
#                            each packed then padded. full's anchors fit the GPU's memory: memory x 8 / 80 GB, at
#                            most 8 (8 on an 80 GB card; GPU_CHECK_FULL_ANCHORS overrides); which layers it
#                            checkpoints is the training planner's choice (bench_real.py --modes full_checkpointing
#                            still forces checkpointing, outside this check)
#   predict_<layout>         predict.py on 10,000 proteins of the real length distribution, packed then padded
#
# Writes into $OUT (default gpu_results; with --dry-run a new temporary folder, named in the first line printed):
#   results.jsonl            one JSON line per step, appended as each ends (a run cut off keeps its lines): step,
#                            kind, status (ok / failed / skipped), ok, skipped, rc, seconds, timeout_s, timed_out,
#                            oom, killed, log, tail (its last 40 lines, on failure), reason (why skipped, forced or
#                            interrupted), figures (env: the facts; tests: pytest's counts; bench_* / predict_*:
#                            bench_real.py's JSON)
#   logs/<step>.log          each step's whole output;  env.json, tests/<step>.xml, bench/<step>.json: the figures
# Exit status: 0 when every step that ran succeeded (skipped steps do not count), 1 when any failed, 2 when nothing
# could run, 143 / 130 when stopped by SIGTERM / SIGINT (the running step is ended and recorded).
#
# --dry-run: the very same steps on the CPU with a tiny model (2 layers x 64 dims x 4 heads) in fp32 on one thread,
# 1 anchor (1 positive, 1 negative), 1 warm-up and 1 timed step, 8 predicted proteins, short timeouts; the test
# steps run a fast selection (the GPU tests, which skip there, and two quick ones); two steps at a time
# (GPU_CHECK_JOBS), since nearly all of a step is Python starting and importing PyTorch on one core. About 45 s on
# two quiet cores (tests/test_gpu_check.py runs it).
#
# Environment: OUT, DATA_ROOT, BENCH_DIR (the random weights; default bench_weights, --dry-run: $OUT/bench_weights),
# PYTHON (default python), GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (space-separated step names or glob patterns: run
# only those; env always runs), GPU_CHECK_JOBS (--dry-run only: steps at once, default 2), GPU_CHECK_FAIL_STEP (space-separated step names, env excepted, that run `exit 1`
# instead: a test of the recording), GPU_CHECK_FULL_ANCHORS.
set -uo pipefail  # no -e: a failing step is recorded, then the next one runs

for var in OUT DATA_ROOT BENCH_DIR; do  # given relative to the caller's folder; the defaults to the repository's
    [[ -n ${!var:-} && ${!var} != /* ]] && printf -v "$var" '%s/%s' "$PWD" "${!var}"
done
cd "$(dirname "$0")/.." || exit 2
command -v timeout >/dev/null || { echo "gpu_check: needs timeout (GNU coreutils)" >&2; exit 2; }
export LC_NUMERIC=C  # a decimal point in $EPOCHREALTIME
now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
HELP=(scripts/bench_real.py gpu-check)  # JSON in and out of this script, written by Python (bench_real.py)
DATA_ROOT=${DATA_ROOT:-../shared/data/mutarget}

if ((DRY)); then
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}
    BENCH_DIR=${BENCH_DIR:-$OUT/bench_weights}
    BUDGET=${GPU_CHECK_BUDGET_S:-600}
    DEVICE=cpu
    PRECISION=fp32  # bf16 matrix products are several times slower on most CPUs
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model: one thread beats two on a shared machine
    # per step: the bench arguments, the tests' selection, timeouts (s) and estimates (s) per kind
    BENCH_ARGS=(--arch tiny --anchors 1 --n-pos 1 --n-neg 1 --warmup 1 --steps 1)
    PREDICT_N=8
    TEST_ARGS=(-k "cuda or hand_worked or refused")
    declare -A LIMIT=([env]=60 [tests]=120 [load]=90 [bench]=90 [full]=90 [predict]=90)
    JOBS=${GPU_CHECK_JOBS:-2}  # steps at once: the CPU's two cores (each step's process is one thread)
    declare -A COST=([env]=5 [tests]=10 [load]=10 [bench]=10 [full]=10 [predict]=10)
else
    OUT=${OUT:-gpu_results}
    BENCH_DIR=${BENCH_DIR:-bench_weights}
    BUDGET=${GPU_CHECK_BUDGET_S:-480}
    DEVICE=cuda
    PRECISION=bf16
    BENCH_ARGS=(--arch esm2_t33_650M_UR50D --anchors 8 --n-pos 3 --n-neg 9 --warmup 2 --steps 4)
    PREDICT_N=10000
    TEST_ARGS=()
    declare -A LIMIT=([env]=120 [tests]=300 [load]=240 [bench]=180 [full]=240 [predict]=240)
    JOBS=1  # one step at a time: the timings are the point
    declare -A COST=([env]=10 [tests]=60 [load]=60 [bench]=25 [full]=35 [predict]=50)
fi
mkdir -p "$OUT/logs" "$OUT/tests" "$OUT/bench" || exit 2
RESULTS=$OUT/results.jsonl
START=$SECONDS
FAILED=0
echo "gpu_check: $( ((DRY)) && echo 'dry run (CPU, tiny model)' || echo 'GPU') -> $OUT (budget ${BUDGET} s)"

selected() {  # whether GPU_CHECK_STEPS (unset: every step) names this step
    [[ -z ${GPU_CHECK_STEPS:-} ]] && return 0
    local pattern
    for pattern in $GPU_CHECK_STEPS; do
        # shellcheck disable=SC2053  # a glob pattern on purpose
        [[ $1 == $pattern ]] && return 0
    done
    return 1
}

record() {  # STEP KIND [--rc N ...]: one JSON line into results.jsonl
    "$PY" "${HELP[@]}" record "$RESULTS" "$@"
}

# run_step NAME KIND NEEDS FIGURES -- COMMAND...: COMMAND under timeout, its output into logs/NAME.log, then
# its JSON line. NEEDS: "tests" or "data" (what must be there); FIGURES: the file it writes its figures to.
run_step() {
    local name=$1 kind=$2 needs=$3 figures=$4
    shift 5
    selected "$name" || return 0
    local why=""
    if [[ $needs == tests && -n $MISSING_TESTS ]]; then why="missing: $MISSING_TESTS"
    elif [[ $needs == data && -n $MISSING_DATA ]]; then why=$MISSING_DATA
    fi
    local left=$((BUDGET - (SECONDS - START))) cost=${COST[$kind]} limit=${LIMIT[$kind]}
    if [[ -z $why ]] && ((cost > left)); then why="budget: about $cost s needed, $left s of $BUDGET s left"; fi
    if [[ -n $why ]]; then
        record "$name" "$kind" --reason "$why"
        return 0
    fi
    ((limit > left)) && limit=$left
    local log=$OUT/logs/$name.log reason=() t0 rc
    t0=$(now)
    if [[ " ${GPU_CHECK_FAIL_STEP:-} " == *" $name "* ]]; then  # the recording's test: this step fails
        set -- bash -c 'echo "forced to fail (GPU_CHECK_FAIL_STEP)"; exit 1'
        reason=(--reason "forced to fail (GPU_CHECK_FAIL_STEP)")
    fi
    rm -f "$figures"
    timeout -k 15 "$limit" "$@" >"$log" 2>&1 </dev/null &
    RUNNING[$!]="$name|$kind|$t0|$limit|$log|$figures|${reason[*]:+${reason[1]}}"
    while ((${#RUNNING[@]} >= JOBS)); do
        reap
    done
}

# reap: wait for one running step to end and write its JSON line; drain: for all of them
reap() {
    local pid rc name kind t0 limit log figures why
    wait -n -p pid "${!RUNNING[@]}"
    rc=$?
    IFS='|' read -r name kind t0 limit log figures why <<<"${RUNNING[$pid]}"
    unset "RUNNING[$pid]"
    ((rc != 0)) && FAILED=1
    record "$name" "$kind" --rc "$rc" --seconds "$(since "$t0")" --timeout-s "$limit" --log "$log" \
        --figures "$figures" ${why:+--reason "$why"}
}
drain() {
    while ((${#RUNNING[@]})); do
        reap
    done
}

declare -A RUNNING=()  # pid -> name|kind|start|timeout|log|figures|reason of each step running
interrupted() {  # SIG: stop the running steps (timeout passes the signal to its whole process group), record them
    trap - TERM INT
    local pid name kind t0 limit log figures why
    for pid in "${!RUNNING[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${!RUNNING[@]}"; do
        wait "$pid"
        IFS='|' read -r name kind t0 limit log figures why <<<"${RUNNING[$pid]}"
        record "$name" "$kind" --rc 143 --seconds "$(since "$t0")" --timeout-s "$limit" --log "$log" \
            --figures "$figures" --reason "interrupted (gpu_check.sh got SIG$1)"
    done
    echo "gpu_check: interrupted by SIG$1 after $((SECONDS - START)) s; results so far in $RESULTS" >&2
    [[ $1 == INT ]] && exit 130
    exit 143
}
trap 'interrupted TERM' TERM
trap 'interrupted INT' INT

# 1. the machine's facts; what is missing
t0=$(now)
timeout -k 15 "${LIMIT[env]}" "$PY" "${HELP[@]}" env "$OUT/env.json" "$DATA_ROOT" >"$OUT/logs/env.log" 2>&1
rc=$?
[[ $rc == 0 && ! -s $OUT/env.json ]] && rc=1
record env env --rc "$rc" --seconds "$(since "$t0")" --timeout-s "${LIMIT[env]}" --log "$OUT/logs/env.log" \
    --figures "$OUT/env.json"
if ((rc != 0)); then
    echo "gpu_check: $PY cannot report the environment (see $OUT/logs/env.log); nothing can run" >&2
    exit 2
fi
fact() { "$PY" "${HELP[@]}" get "$OUT/env.json" "$1"; }
missing=" $(fact missing) "
MISSING_TESTS=""
for module in torch esm numpy pandas yaml tqdm; do
    [[ $missing == *" $module "* ]] && MISSING_TESTS+="$module "
done
MISSING_DATA=""
[[ -n ${missing// /} ]] && MISSING_DATA="missing:${missing% }"
[[ $(fact data_ok) != true ]] && MISSING_DATA+="${MISSING_DATA:+; }no data: $(fact data_error)"
if ((!DRY)) && [[ $(fact cuda_available) != true ]]; then
    MISSING_DATA+="${MISSING_DATA:+; }no CUDA GPU (on a CPU: --dry-run)"
fi
[[ -n $MISSING_DATA ]] && echo "gpu_check: the bench and predict steps cannot run: $MISSING_DATA" >&2
if [[ -n $MISSING_TESTS && -n $MISSING_DATA ]]; then
    echo "gpu_check: nothing can run (missing: $MISSING_TESTS)" >&2
    exit 2
fi
if ((DRY)); then
    FULL_ANCHORS=1
else  # full fine-tuning: 8 anchors on an 80 GB card, proportionally fewer on smaller ones
    gpu_mib=$(fact gpu_memory_mib)
    FULL_ANCHORS=$(( ${gpu_mib:-0} * 8 / 80000 ))
    ((FULL_ANCHORS > 8)) && FULL_ANCHORS=8
    ((FULL_ANCHORS < 1)) && FULL_ANCHORS=1
fi
FULL_ANCHORS=${GPU_CHECK_FULL_ANCHORS:-$FULL_ANCHORS}

# 2. the tests: tests/test_packing.py and every test file that needs CUDA, one step per file
for file in tests/test_packing.py $(grep -l "cuda.is_available" tests/test_*.py | sort); do
    [[ " ${seen_tests:-} " == *" $file "* ]] && continue
    seen_tests+=" $file"
    name=$(basename "$file" .py)
    name=${name#test_}
    run_step "test_$name" tests tests "$OUT/tests/test_$name.xml" -- \
        "$PY" -m pytest -q -p no:cacheprovider "$file" "${TEST_ARGS[@]}" --junitxml "$OUT/tests/test_$name.xml"
done

# 3. bench_real.py: loading, then each mode in each layout (cheap to expensive), then prediction
bench() {  # NAME KIND ARGS...: one bench_real.py run as a step; its children end 15 s before the step's limit
    local name=$1 kind=$2
    shift 2
    local child_timeout=$((${LIMIT[$kind]} - 15))
    ((child_timeout < 10)) && child_timeout=10
    run_step "$name" "$kind" data "$OUT/bench/$name.json" -- "$PY" scripts/bench_real.py --device "$DEVICE" \
        --dir "$BENCH_DIR" --data-root "$DATA_ROOT" --precisions "$PRECISION" \
        --child-timeout "$child_timeout" --json "$OUT/bench/$name.json" "${BENCH_ARGS[@]}" "$@"
}
bench bench_load load --modes --layouts packed
drain  # the other bench steps read the weights it writes
for mode in lora adapter last_k full; do
    for layout in packed padded; do
        if [[ $mode == full ]]; then
            bench "bench_${mode}_$layout" full --no-load --modes "$mode" --layouts "$layout" --anchors "$FULL_ANCHORS"
        else
            bench "bench_${mode}_$layout" bench --no-load --modes "$mode" --layouts "$layout"
        fi
    done
done
for layout in packed padded; do
    bench "predict_$layout" predict --no-load --modes --layouts "$layout" --predict "$PREDICT_N"
    drain  # the first writes the checkpoint and the proteins the second reads
done

"$PY" "${HELP[@]}" summary "$RESULTS"
echo "gpu_check: $((SECONDS - START)) s; results in $RESULTS"
exit $FAILED

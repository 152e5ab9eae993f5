#!/usr/bin/env bash
# One command on a bare GPU machine (no network): build, environment report,
# tests with real Triton/CUDA kernels, GPU benchmarks. Everything lands in OUTDIR.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      (default benchmarks/results/gpu-<UTC date>)
#
# Finishes in under 10 minutes: the steps share a 560 s budget and each runs under
# `timeout`, so a hung step costs only its own slice. A failing step does not stop
# the later ones; the exit status is non-zero if any step failed.
# Reads the GPU's state with nvidia-smi; never changes clocks, power limits or modes.
set -u -o pipefail

# OUTDIR is resolved against the caller's directory, before moving to the repository root.
OUTDIR=${1:-"$(dirname "$0")/results/gpu-$(date -u +%Y%m%d-%H%M)"}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || { echo "cannot create $OUTDIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}  # some images have only python3
BUDGET=${GPU_CHECK_BUDGET:-560}
START=$(date +%s)
FAILED=()
SUMMARY="$OUTDIR/summary.md"

say() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME MAX_SECONDS CMD...: log to OUTDIR/NAME.log, limit min(MAX, what is left of the budget).
run_step() {
    local name=$1 max=$2
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( max < left ? max : left ))
    if (( limit < 15 )); then
        say "- $name: SKIPPED (budget spent)"
        FAILED+=("$name")
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    local secs=$(( $(date +%s) - t0 ))
    if [[ $rc == 5 && "$*" == *pytest* ]]; then
        say "- $name: no tests selected (${secs}s)"
    elif (( rc == 0 )); then
        say "- $name: ok (${secs}s)"
    else
        [[ $rc == 124 || $rc == 137 ]] && rc="$rc (timed out after ${limit}s)"
        say "- $name: FAILED rc=$rc (${secs}s), see $name.log"
        FAILED+=("$name")
    fi
    tail -n 5 "$OUTDIR/$name.log"
}

# The local GPU's architecture for the CUDA build: compute capability 9.0 -> 90a, 8.0 -> 80, 8.6 -> 86.
cuda_arch() {
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
    if [[ -z "$cap" ]]; then
        cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    fi
    [[ -z "$cap" ]] && return 1
    local arch=${cap/./}
    [[ "${cap%%.*}" == 9 ]] && arch="${arch}a"
    echo "$arch"
}

: >"$SUMMARY"
say "# lorakern GPU check"
say ""
say "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
say "- commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
say "- host: $(hostname), $(nproc) cores"
say "- gpu: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || echo 'nvidia-smi failed')"
say "- python: $("$PY" -c 'import sys; print(sys.version.split()[0])'), $("$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1 | tail -n 1)"
say "- nvcc: $( (command -v nvcc >/dev/null && nvcc --version | tail -n 1) || echo 'not on PATH')"
nvidia-smi >"$OUTDIR/nvidia-smi.txt" 2>&1 || true

ARCH=$(cuda_arch) || ARCH=""
if [[ -n "$ARCH" ]]; then
    export LORAKERN_CUDA_ARCHS="$ARCH"
    say "- LORAKERN_CUDA_ARCHS=$ARCH"
else
    say "- could not read the GPU's compute capability; building for the default archs"
fi
say ""
say "## Steps"

run_step install 150 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
run_step env 30 "$PY" -m lorakern.env
cp "$OUTDIR/env.log" "$OUTDIR/env.txt" 2>/dev/null || true

# The Triton tests compile ~100 kernel variants (dtypes x flags x shape specializations),
# 1-4 s each: four pytest processes over disjoint parts of the file compile in parallel.
TRITON_PARTS=("gpu_" "qlora and not gpu_" "lora_linear and not qlora and not gpu_"
              "not gpu_ and not qlora and not lora_linear")
run_triton_tests() {
    local max=$1 left limit pids=() failed=0 i part_rc t0
    left=$(( BUDGET - ($(date +%s) - START) ))
    limit=$(( max < left ? max : left ))
    echo "== test_triton (limit ${limit}s): ${#TRITON_PARTS[@]} parallel parts of tests/test_triton_kernels.py"
    t0=$(date +%s)
    for i in "${!TRITON_PARTS[@]}"; do
        timeout -k 10 "$limit" "$PY" -m pytest tests/test_triton_kernels.py -m "gpu or not slow" \
            -k "${TRITON_PARTS[$i]}" --junitxml="$OUTDIR/junit-triton-$i.xml" "${JUNIT[@]}" \
            >"$OUTDIR/test_triton-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        part_rc=$?
        tail -n 3 "$OUTDIR/test_triton-$i.log"
        if [[ $part_rc != 0 && $part_rc != 5 ]]; then  # 5: no test selected in this part
            [[ $part_rc == 124 || $part_rc == 137 ]] && part_rc="$part_rc (timed out after ${limit}s)"
            say "- test_triton part $i (-k '${TRITON_PARTS[$i]}'): FAILED rc=$part_rc, see test_triton-$i.log"
            failed=1
        fi
    done
    if (( failed )); then
        FAILED+=("test_triton")
    else
        say "- test_triton: ok ($(( $(date +%s) - t0 ))s, ${#TRITON_PARTS[@]} parts)"
    fi
}

# Results only a GPU can give come first: the Triton kernel tests (one config per kernel,
# so each variant compiles once), the other gpu-marked tests, the benchmarks; then the
# rest of `pytest -m "gpu or not slow"` (the CPU tests CI also runs) with what is left.
JUNIT=(-p no:cacheprovider -o junit_family=xunit2 -v -ra --durations=15)
export LORAKERN_TRITON_AUTOTUNE=0
run_triton_tests 240
run_step test_gpu 120 "$PY" -m pytest -m gpu --ignore=tests/test_triton_kernels.py \
    --junitxml="$OUTDIR/junit-gpu.xml" "${JUNIT[@]}"
unset LORAKERN_TRITON_AUTOTUNE

# The training step of a random-weight 1.1B Llama, lorakern against PEFT (+ bitsandbytes):
# five configurations, each in its own process, within its own 90 s budget.
run_step bench_train_gpu 110 "$PY" benchmarks/bench_train_gpu.py --out "$OUTDIR" --time-budget 90

# MoE expert adapters (one fused op per routed expert) against PEFT's target_parameters
# (grouped_mm over a materialized W + B A) and the model without adapters.
run_step bench_moe 60 "$PY" benchmarks/bench_moe.py --device cuda --repeats 5 --out "$OUTDIR/moe.md"

left=$(( BUDGET - ($(date +%s) - START) ))
bench_limit=$(( left > 200 ? left - 60 : left ))
run_step bench "$bench_limit" "$PY" benchmarks/bench_gpu.py --out "$OUTDIR" --time-budget $(( bench_limit > 90 ? bench_limit - 60 : 30 ))
run_step test_rest 300 "$PY" -m pytest -m "not gpu and not slow" --ignore=tests/test_triton_kernels.py \
    --junitxml="$OUTDIR/junit-rest.xml" "${JUNIT[@]}"

say ""
say "total: $(( $(date +%s) - START ))s; results in $OUTDIR"
if (( ${#FAILED[@]} )); then
    say "FAILED steps: ${FAILED[*]}"
    exit 1
fi
say "all steps passed"

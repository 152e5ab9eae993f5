#!/usr/bin/env bash
# CUDA checks that need no GPU.
#
#   bash .ci/cuda_check.sh [all|compile|host]      (default: all)
#
# compile: every csrc/cuda/*.cu compiled (-c) for sm_80 and sm_90a with warnings
#          as errors, ptxas spill warnings on and as errors; csrc/cuda/*.cpp
#          compiled by the host compiler through nvcc with -Wall -Wextra -Werror.
#          nvcc from LORAKERN_NVCC, CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda/bin/nvcc
#          (the order setup.py uses); without one: "skipped: no nvcc", exit 0.
# host:    the host tests of the kernels' __host__ __device__ code
#          (tests/host/nf4_host.cpp under ASan/UBSan, driven and checked against
#          the Python reference by tests/test_cuda_kernels.py).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"
# the interpreter with pybind11 and pytest: $PYTHON, else the project's venv, else python3
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
case "$mode" in all|compile|host) ;; *) echo "usage: $0 [all|compile|host]" >&2; exit 2 ;; esac

find_nvcc() {
  local c
  for c in "${LORAKERN_NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
    if [[ -n "$c" && -f "$c" && -x "$c" ]]; then echo "$c"; return 0; fi
  done
  return 1
}

compile_check() {
  local nvcc
  if ! nvcc="$(find_nvcc)"; then
    echo "cuda_check: skipped: no nvcc (set LORAKERN_NVCC or CUDA_HOME to check the CUDA sources)"
    return 0
  fi
  local py_inc pybind_inc
  py_inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  pybind_inc="$("$PY" -c 'import pybind11; print(pybind11.get_include())')"
  local out
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' RETURN
  local common=(-O3 -std=c++17 -Icsrc/include -I"$pybind_inc" -I"$py_inc" -Xcompiler -fPIC)
  local src arch start
  for src in csrc/cuda/*.cu; do
    for arch in 80 90a; do
      start=$SECONDS
      "$nvcc" -c "$src" -o "$out/$(basename "$src").$arch.o" "${common[@]}" --expt-relaxed-constexpr \
        -gencode "arch=compute_$arch,code=sm_$arch" \
        -Werror all-warnings -Xcompiler -Wall,-Wextra -Xptxas -warn-spills -Xptxas -Werror
      echo "cuda_check: ok $src sm_$arch ($((SECONDS - start)) s)"
    done
  done
  for src in csrc/cuda/*.cpp; do
    [[ -e "$src" ]] || continue
    start=$SECONDS
    "$nvcc" -c -x c++ "$src" -o "$out/$(basename "$src").o" "${common[@]}" -Xcompiler -Wall,-Wextra,-Werror
    echo "cuda_check: ok $src ($((SECONDS - start)) s)"
  done
}

host_tests() {
  "$PY" -m pytest tests/test_cuda_kernels.py -q -k "host" -p no:cacheprovider
}

if [[ "$mode" == all || "$mode" == compile ]]; then compile_check; fi
if [[ "$mode" == all || "$mode" == host ]]; then host_tests; fi

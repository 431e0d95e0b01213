#!/usr/bin/env bash
# Install what the benches need into the *active* Python environment (activate the venv first).
#
# llama-cpp-python is built from source without -march=native: a native build picks up AMX on the Intel
# machines and segfaults, so GGML_NATIVE is off and the x86 extensions are named explicitly. AVX-512 is
# switched on only where the CPU has it: built with -DGGML_AVX512=ON, libggml-cpu dies with "Illegal
# instruction" on import on an AVX2-only CPU (seen on an AMD EPYC without avx512f). The build takes ~20 min
# on 2 cores. matplotlib is only needed for --plot.
#
#   . .venv/bin/activate && bash bench/setup.sh            # llama-cpp-python
#   WITH_PLOT=1 bash bench/setup.sh                         # ... and matplotlib
set -euo pipefail

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    echo "bench/setup.sh: no active virtual environment (. .venv/bin/activate first)" >&2
    exit 1
fi

if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then avx512=ON; else avx512=OFF; fi
cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=${avx512}"
echo "bench/setup.sh: CMAKE_ARGS=\"${cmake_args}\"" >&2
# --force-reinstall --no-deps: rebuild even if a (possibly wrongly built) copy is installed; deps untouched.
CMAKE_ARGS="${cmake_args}" python -m pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python
python -m pip install diskcache  # llama-cpp-python's one dependency not already in the project's set

if [[ "${WITH_PLOT:-0}" == "1" ]]; then
    python -m pip install matplotlib
fi

python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

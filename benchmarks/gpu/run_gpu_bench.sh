#!/usr/bin/env bash
# GPU comparison for flashckpt, one command on a CUDA machine:
#
#   bash benchmarks/gpu/run_gpu_bench.sh [--sizes "2 4"] [--runs 3]
#
# Expects: an NVIDIA GPU, a Python with PyTorch 2.x (CUDA build), CMake >= 3.22,
# a C++20 compiler, nvcc (the CUDA toolkit), pybind11 (pip or system). It builds
# the core and the Python module into build-gpu/ with only what is installed
# (no apt), then runs gpu_bench.py, which writes
# benchmarks/results/python_gpu.json:
#   * device-to-host snapshot bandwidth of flashckpt.save (blocking and
#     non-blocking) against a pinned cudaMemcpy (torch copy_ into pinned memory)
#     of the same bytes, one big buffer and tensor by tensor;
#   * blocking time against torch.distributed.checkpoint.async_save (when the
#     installed PyTorch has it) and torch.save + fsync.
# The core needs liburing, protobuf (+ protoc), abseil and Boost headers; the
# script checks for each first and says exactly what is missing.
set -u
cd "$(dirname "$0")/../.."
REPO=$(pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUILD=${BUILD_DIR:-$REPO/build-gpu}
JOBS=${JOBS:-$(nproc)}
ARGS=("$@")

ok=1
say() { printf '%-28s %s\n' "$1" "$2"; }
need() {  # need NAME OK? DETAIL HINT
  if [ "$2" = 1 ]; then say "$1" "ok ($3)"; else say "$1" "MISSING: $4"; ok=0; fi
}

echo "== flashckpt GPU benchmark: checking the machine"
if command -v nvidia-smi >/dev/null; then
  say "GPU" "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
else
  say "GPU" "MISSING: nvidia-smi not found"; ok=0
fi
tv=$("$PY" -c 'import torch;print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>/dev/null)
need "python + torch" "$([ -n "$tv" ] && echo 1 || echo 0)" "$PY: torch $tv" "no torch importable by $PY (set PYTHON=...)"
case "$tv" in *True) ;; *) say "" "WARNING: torch.cuda.is_available() is not True";; esac
cm=$(cmake --version 2>/dev/null | head -1)
need "cmake" "$([ -n "$cm" ] && echo 1 || echo 0)" "$cm" "install CMake >= 3.22 (pip install cmake)"
need "c++ compiler" "$(command -v c++ >/dev/null && echo 1 || echo 0)" "$(c++ --version 2>/dev/null | head -1)" "a C++20 compiler (g++ >= 10)"
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
need "nvcc (CUDA toolkit)" "$([ -n "$NVCC" ] && echo 1 || echo 0)" "$NVCC" "the CUDA toolkit (nvcc): without it the core cannot copy CUDA tensors"
pb=$("$PY" -c 'import pybind11;print(pybind11.get_cmake_dir())' 2>/dev/null)
[ -z "$pb" ] && [ -f /usr/lib/cmake/pybind11/pybind11Config.cmake ] && pb=/usr/lib/cmake/pybind11
need "pybind11" "$([ -n "$pb" ] && echo 1 || echo 0)" "$pb" "pip install pybind11"
uring=0; pkg-config --exists liburing 2>/dev/null && uring=1
need "liburing" "$uring" "$(pkg-config --modversion liburing 2>/dev/null)" "liburing-dev (or build liburing from source and set PKG_CONFIG_PATH)"
proto=0; command -v protoc >/dev/null && proto=1
need "protobuf (protoc + lib)" "$proto" "$(protoc --version 2>/dev/null)" "protobuf-compiler + libprotobuf-dev (or conda install protobuf)"
absl=0
for d in /usr/lib/x86_64-linux-gnu/cmake/absl /usr/lib/cmake/absl /usr/local/lib/cmake/absl ${CONDA_PREFIX:-/nonexistent}/lib/cmake/absl; do
  [ -f "$d/abslConfig.cmake" ] && absl=1 && absl_dir=$d
done
need "abseil (absl)" "$absl" "${absl_dir:-}" "libabsl-dev (or conda install abseil-cpp; set CMAKE_PREFIX_PATH)"
boost=0; for d in /usr/include /usr/local/include ${CONDA_PREFIX:-/nonexistent}/include; do [ -f "$d/boost/version.hpp" ] && boost=1; done
need "Boost headers" "$boost" "" "libboost-dev (headers only) or conda install boost-cpp"
if [ "$ok" != 1 ]; then
  echo
  echo "== cannot build the flashckpt core here: install what is MISSING above and rerun."
  echo "   (With conda: conda install -c conda-forge liburing protobuf abseil-cpp boost-cpp pybind11 cmake,"
  echo "    then CMAKE_PREFIX_PATH=\$CONDA_PREFIX PKG_CONFIG_PATH=\$CONDA_PREFIX/lib/pkgconfig bash $0)"
  exit 2
fi

echo "== building the core and the Python module in $BUILD"
set -e
cmake -S "$REPO" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DFLASHCKPT_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DFLASHCKPT_WITH_TORCH=OFF -DFLASHCKPT_WITH_TESTS=OFF -DFLASHCKPT_WITH_BENCHMARKS=OFF \
  -DFLASHCKPT_WITH_PYTHON=ON -DPYTHON_EXECUTABLE="$PY" -DPython_EXECUTABLE="$PY" \
  ${pb:+-Dpybind11_DIR="$pb"} ${CMAKE_EXTRA_ARGS:-}
cmake --build "$BUILD" --target flashckpt_python -j "$JOBS"
ls "$BUILD"/python/flashckpt/
set +e

echo "== running benchmarks/gpu/gpu_bench.py"
FLASHCKPT_BUILD_DIR="$BUILD" FLASHCKPT_CUDA_LIB="$(ls "$BUILD"/python/flashckpt/libflashckpt_cuda.so "$BUILD"/lib/libflashckpt_cuda.so 2>/dev/null | head -1)" \
  PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$REPO/benchmarks/gpu/gpu_bench.py" "${ARGS[@]}"

#!/usr/bin/env bash
# Configures and builds everything into build/ (CUDA parts when a toolkit is found).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-$(nproc)}"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE=/usr/bin/python3 "$@"
cmake --build build -j "$JOBS"

#!/usr/bin/env bash
# Runs every test: GoogleTest (ctest) and pytest (Python front door, flashrun e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
ctest --test-dir build --output-on-failure --timeout 600 || status=1
if compgen -G "tests/python/test_*.py" > /dev/null || compgen -G "tests/e2e/test_*.py" > /dev/null; then
  export FLASHRUN_BIN="$PWD/build/bin/flashrun"
  [ -f scripts/python_env.sh ] && source scripts/python_env.sh
  "${PYTHON:-/usr/bin/python3}" -m pytest -q tests/python tests/e2e -p no:cacheprovider || status=1
fi
leftover=$(ls /dev/shm | grep -E '^flashckpt' || true)
if [ -n "$leftover" ]; then
  echo "tests left shared-memory segments behind: $leftover" >&2
  status=1
fi
exit $status

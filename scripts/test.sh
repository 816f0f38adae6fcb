#!/usr/bin/env bash
# Runs every test: GoogleTest (ctest) and pytest (Python front door, flashrun e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
ctest --test-dir build --output-on-failure --timeout 600 || status=1
if compgen -G "tests/python/test_*.py" > /dev/null || compgen -G "tests/e2e/test_*.py" > /dev/null; then
  export FLASHRUN_BIN="$PWD/build/bin/flashrun" FLASHCKPT_BUILD_DIR="$PWD/build" PYTHON_EXEC=/usr/bin/python3
  /usr/bin/python3 -m pytest -q tests/python tests/e2e -p no:cacheprovider || status=1
fi
# The package as a Python user installs it: pip, no download, into a venv.
if [ "${SKIP_PIP_INSTALL:-0}" != 1 ]; then
  rm -rf build-pip-venv
  /usr/bin/python3 -m venv --system-site-packages build-pip-venv
  if FLASHCKPT_CMAKE_BUILD_DIR="$PWD/build-pip" build-pip-venv/bin/pip install -q --no-build-isolation . > build-pip.log 2>&1 \
     && (cd /tmp && "$OLDPWD/build-pip-venv/bin/python" - <<'PY'
import os, tempfile, torch, flashckpt
d = tempfile.mkdtemp()
with flashckpt.Checkpointer(d) as c:
    c.save(1, {"w": torch.arange(10.)}).wait()
    assert torch.equal(c.load()["w"], torch.arange(10.))
print("pip-installed flashckpt", flashckpt.__file__, "saves and loads")
PY
); then :; else
    echo "pip install of the package failed (see build-pip.log)" >&2; tail -n 20 build-pip.log >&2; status=1
  fi
fi
leftover=$(ls /dev/shm | grep -E '^flashckpt' || true)
if [ -n "$leftover" ]; then
  echo "tests left shared-memory segments behind: $leftover" >&2
  status=1
fi
exit $status

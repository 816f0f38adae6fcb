"""pytest setup for the Python front end.

The package is imported from the source tree (``python/``); its compiled
extension is found next to it (``pip install -e .``) or in ``build-py/`` /
``build/`` / ``$FLASHCKPT_BUILD_DIR`` (a plain CMake build). See docs/python.md.
"""

import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYDIR = os.path.join(REPO, "python")
if PYDIR not in sys.path:
    sys.path.insert(0, PYDIR)

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _segments():
    return set(glob.glob("/dev/shm/flashckpt-*"))


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test must leave /dev/shm as it found it."""
    before = _segments()
    yield
    leaked = _segments() - before
    for path in leaked:  # clean up so that one leak does not fail every later test
        try:
            os.unlink(path)
        except OSError:
            pass
    assert not leaked, f"shared-memory segments leaked: {sorted(leaked)}"


@pytest.fixture
def procs():
    """Subprocesses started by a test; killed in the finalizer whatever happens."""
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def pytest_report_header(config):
    try:
        from flashckpt import _native

        ext = _native.load()
        return f"flashckpt extension: {ext.__file__}"
    except ImportError as e:
        return f"flashckpt extension: NOT FOUND ({e})"

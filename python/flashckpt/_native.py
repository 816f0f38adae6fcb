"""Finds the compiled extension ``flashckpt._C``.

Looked up, in order: the package itself (``pip install .`` / ``pip install -e .``
put it there), then ``$FLASHCKPT_BUILD_DIR/python/flashckpt``, then the
``build-py`` and ``build`` folders of the source tree this file sits in (a plain
CMake build, used with ``PYTHONPATH=python``), the most recently built first, so a
stale build in one folder never shadows a fresh one in the other.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import sys

_ext = None


def _built_files(build_dir):
    found = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        found += glob.glob(os.path.join(build_dir, "python", "flashckpt", "_C" + suffix))
    return found


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _candidates(root=None):
    """Extension files to try, in order; root: the source tree (the one this file sits in)."""
    env = os.environ.get("FLASHCKPT_BUILD_DIR")
    if env:
        yield from _built_files(env)
    if root is None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    in_tree = _built_files(os.path.join(root, "build-py")) + _built_files(os.path.join(root, "build"))
    yield from sorted(in_tree, key=_mtime, reverse=True)


def _route_logs(ext):
    if hasattr(ext, "route_log"):
        from . import _logging

        _logging.install(ext)


def load():
    """The extension module; ImportError with build instructions when missing."""
    global _ext
    if _ext is not None:
        return _ext
    try:
        from . import _C  # type: ignore

        _ext = _C
        _route_logs(_ext)
        return _ext
    except ImportError as e:
        first = e
    for path in _candidates():
        spec = importlib.util.spec_from_file_location("flashckpt._C", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["flashckpt._C"] = mod
        try:
            spec.loader.exec_module(mod)
        except ImportError:
            del sys.modules["flashckpt._C"]
            continue
        _ext = mod
        _route_logs(_ext)
        return _ext
    raise ImportError(
        "flashckpt's compiled extension (flashckpt._C) is not built or not importable "
        f"({first}). Install with `pip install --no-build-isolation -e .` in a venv made by "
        "`/usr/bin/python3 -m venv --system-site-packages .venv`, or build it with CMake "
        "into build-py/ (see docs/python.md).") from first

"""Finds the compiled extension ``flashckpt._C``.

Looked up, in order: the package itself (``pip install .`` / ``pip install -e .``
put it there), then ``$FLASHCKPT_BUILD_DIR/python/flashckpt``, then the
``build-py`` and ``build`` folders of the source tree this file sits in (a plain
CMake build, used with ``PYTHONPATH=python``).
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import sys

_ext = None


def _candidates():
    env = os.environ.get("FLASHCKPT_BUILD_DIR")
    if env:
        yield env
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("build-py", "build"):
        yield os.path.join(root, name)


def load():
    """The extension module; ImportError with build instructions when missing."""
    global _ext
    if _ext is not None:
        return _ext
    try:
        from . import _C  # type: ignore

        _ext = _C
        return _ext
    except ImportError as e:
        first = e
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for d in _candidates():
        for suffix in suffixes:
            for path in glob.glob(os.path.join(d, "python", "flashckpt", "_C" + suffix)):
                spec = importlib.util.spec_from_file_location("flashckpt._C", path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules["flashckpt._C"] = mod
                try:
                    spec.loader.exec_module(mod)
                except ImportError:
                    del sys.modules["flashckpt._C"]
                    continue
                _ext = mod
                return _ext
    raise ImportError(
        "flashckpt's compiled extension (flashckpt._C) is not built or not importable "
        f"({first}). Install with `pip install --no-build-isolation -e .` in a venv made by "
        "`/usr/bin/python3 -m venv --system-site-packages .venv`, or build it with CMake "
        "into build-py/ (see docs/python.md).") from first

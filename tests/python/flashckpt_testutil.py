"""Helpers shared by the Python tests (a unique name: tests/ has other conftest files)."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYDIR = os.path.join(REPO, "python")
PYTHON = sys.executable


def child_env(**extra):
    """Environment for a child Python process that imports flashckpt from this tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PYDIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("FLASHCKPT_RUN_ID", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env

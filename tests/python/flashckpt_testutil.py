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


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(procs, script, world, *args, timeout=180, **env):
    """Runs `script` as `world` gloo ranks on 127.0.0.1 (RANK, WORLD_SIZE, MASTER_*),
    each printing one "RESULT <json>" line; returns {rank: result}. The processes go
    into `procs` (the fixture kills what is left)."""
    import json
    import subprocess

    port = free_port()
    mine = []
    for rank in range(world):
        e = child_env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, **env)
        p = subprocess.Popen([PYTHON, script, *map(str, args)], env=e, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        mine.append(p)
    results = {}
    for p in mine:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        line = [l for l in out.splitlines() if l.startswith("RESULT ")][0]
        r = json.loads(line[len("RESULT "):])
        results[r["rank"]] = r
    return results

"""flashrun workers other than rank 0 wait for rank 0's env:// store to listen."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

from flashckpt_testutil import PYTHON, child_env

from flashckpt import _worker_rdzv

CHILD = r"""
import json, os, sys, time
import torch, torch.distributed as dist
from flashckpt import _worker_rdzv
assert _worker_rdzv.install() and _worker_rdzv.install()  # a second call changes nothing
handler = sys.modules["torch.distributed.rendezvous"]._rendezvous_handlers["env"]
dist.init_process_group("gloo", init_method="env://")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
print("RESULT " + json.dumps({"rank": dist.get_rank(), "sum": t.item(),
                              "wrapped": getattr(handler, "_flashckpt_waits_for_master", False),
                              "inner": handler.__wrapped__.__name__}), flush=True)
dist.destroy_process_group()
"""


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_for_listener_returns_once_the_port_listens():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))  # bound, not yet listening: connects are refused
    port = srv.getsockname()[1]
    timer = threading.Timer(0.3, srv.listen)
    timer.start()
    try:
        assert _worker_rdzv.wait_for_listener("127.0.0.1", port, 30.0)
    finally:
        timer.cancel()
        srv.close()


def test_wait_for_listener_gives_up_after_its_limit():
    port = _port()  # nobody listens there
    t0 = time.monotonic()
    assert not _worker_rdzv.wait_for_listener("127.0.0.1", port, 0.2)
    assert time.monotonic() - t0 < 30  # it returned (the limit, not a hang)


def test_rank_one_started_first_joins_rank_zero(procs):
    """Rank 1 waits (probing rank 0's port); the probes do not disturb torch's store."""
    port = _port()
    order = (1, 0)
    for rank in order:
        env = child_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([PYTHON, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        if rank == 1:
            time.sleep(1.0)  # rank 1 reaches init_process_group long before rank 0 exists
    results = {}
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        r = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][0][len("RESULT "):])
        results[r["rank"]] = r
    assert sorted(results) == [0, 1]
    for r in results.values():
        assert r["sum"] == 3.0
        assert r["wrapped"] and r["inner"] == "_env_rendezvous_handler"


def test_not_installed_without_flashrun():
    code = ("import sys, torch, flashckpt; r = sys.modules['torch.distributed.rendezvous'];"
            "print(getattr(r._rendezvous_handlers['env'], '_flashckpt_waits_for_master', False))")
    env = child_env()
    env.pop("FLASHCKPT_AGENT_SOCKET", None)
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

"""Two ranks with gloo on 127.0.0.1: save, one COMMIT, load agrees on the step."""

import json
import os
import socket
import subprocess

from flashckpt_testutil import PYTHON, child_env

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_gloo(tmp_path, procs):
    d = tmp_path / "ckpt"
    port = free_port()
    for rank in range(2):
        env = child_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        procs.append(subprocess.Popen([PYTHON, os.path.join(HERE, "dist_script.py"), str(d)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = {}
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        line = [l for l in out.splitlines() if l.startswith("RESULT ")][0]
        r = json.loads(line[len("RESULT "):])
        results[r["rank"]] = r
    for rank in (0, 1):
        r = results[rank]
        assert r["loaded_step"] == 2, r
        assert r["value"] == rank * 100 + 2
        assert r["extra"] == {"rank": rank, "step": 2}
        assert r["step1"] == 1
    assert results[1]["latest"] == 3  # its own newest (memory), which rank 0 lacks
    assert results[0]["committed"] == results[1]["committed"] == 1
    # One COMMIT for step 1, covering both ranks' files; 2 and 3 are in memory only.
    sd = d / "step-1"
    assert (sd / "COMMIT").exists()
    assert (sd / "rank-0.data").exists() and (sd / "rank-1.data").exists()
    assert not (d / "step-2").exists() and not (d / "step-3").exists()

"""`flashckpt ls`, `verify` and `export` only read: on a directory with
leftovers a writer would clean up (an uncommitted step, a stale temp file),
they change nothing in it, create nothing in /dev/shm, and they work on a
read-only mount of it."""

import hashlib
import os
import shutil
import subprocess
import threading

import pytest
import torch

import flashckpt
from flashckpt_testutil import PYTHON, child_env

HERE = os.path.dirname(os.path.abspath(__file__))


def tree(d):
    """Every entry under d: type, size, mtime, contents' hash."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else ""
            out[os.path.relpath(p, d)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def shm_entries():
    return set(os.listdir("/dev/shm"))


def cli(*args):
    return subprocess.run([PYTHON, "-m", "flashckpt", *map(str, args)], env=child_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def two_rank_dir(tmp_path):
    """Step 4 of two ranks, replicated model and per-rank extra, plus leftovers."""
    d = tmp_path / "ckpt"
    cks = [flashckpt.Checkpointer(d, rank=r, world_size=2, run_id=f"ro{os.getpid()}", replicated=("model",))
           for r in range(2)]
    try:
        model = {"w": torch.arange(300000, dtype=torch.float32), "b": torch.ones(7)}
        hs = [cks[r].save(4, {"model": model, "extra": torch.full((5,), float(r))}) for r in range(2)]
        for h in hs:
            h.wait(timeout=60)
    finally:
        for c in cks:
            c.unlink_memory()
            c.close()
    (d / "step-9").mkdir()  # a crashed save a writer would remove
    (d / "step-9" / "rank-0.data").write_bytes(b"\1" * 4096)
    (d / "latest.tmp-999999").write_text("9\n")  # a stale temp file of a dead writer
    return d


def test_ls_verify_export_change_nothing(two_rank_dir, tmp_path):
    before, shm_before = tree(two_rank_dir), shm_entries()
    r = cli("ls", two_rank_dir)
    assert r.returncode == 0 and "<- latest" in r.stdout, r.stderr
    r = cli("ls", two_rank_dir, 4, "--rank", 1)
    assert r.returncode == 0, r.stderr
    assert "world size 2" in r.stdout, r.stdout
    rows = {l.split()[0]: l for l in r.stdout.splitlines()[2:]}
    assert rows["model/w"].split()[1:3] == ["torch.float32", "[300000]"] and "once (replicated)" in rows["model/w"]
    assert rows["extra"].endswith("rank 1"), rows
    r = cli("verify", two_rank_dir)
    assert r.returncode == 0 and "OK: 1 step(s)" in r.stdout, r.stderr
    out = tmp_path / "rank1.pt"
    r = cli("export", two_rank_dir, 4, out, "--rank", 1)
    assert r.returncode == 0, r.stderr
    state = torch.load(out)
    assert torch.equal(state["model"]["w"], torch.arange(300000, dtype=torch.float32))
    assert torch.equal(state["extra"], torch.full((5,), 1.0))
    assert tree(two_rank_dir) == before
    assert shm_entries() == shm_before


def test_verify_and_export_work_on_a_read_only_mount(two_rank_dir, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private read-only bind mount")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    before = tree(two_rank_dir)
    out = tmp_path / "out" / "rank0.pt"
    out.parent.mkdir()
    d = str(two_rank_dir)
    script = (f"mount --bind {d} {d} && mount -o remount,bind,ro {d} && "
              f"touch {d}/probe 2>/dev/null && echo WRITABLE; "
              f"{PYTHON} -m flashckpt verify {d} && {PYTHON} -m flashckpt export {d} 4 {out}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert "WRITABLE" not in r.stdout, "the bind mount is not read-only: the test would prove nothing"
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: 1 step(s)" in r.stdout
    assert torch.equal(torch.load(out)["extra"], torch.zeros(5))
    assert tree(two_rank_dir) == before


def test_a_previous_format_directory_still_loads(tmp_path):
    """tests/data/format1: two ranks' step 7 as flashckpt wrote it before
    replicated state (format 1): the CLI reads it, and a Checkpointer loads it."""
    d = tmp_path / "format1"
    shutil.copytree(os.path.join(HERE, "..", "data", "format1"), d)
    r = cli("verify", d)
    assert r.returncode == 0 and "OK: 1 step(s)" in r.stdout, r.stderr
    for rank in range(2):
        with flashckpt.Checkpointer(d, rank=rank, world_size=2, run_id=f"f1{os.getpid()}") as c:
            state = c.load()
            c.unlink_memory()
        assert c.last_load.step == 7 and c.last_load.source == "storage"
        assert torch.equal(state["model"]["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
        assert torch.equal(state["model"]["b"], torch.ones(5, dtype=torch.int64))
        assert state["step"] == 7 and state["rank"] == rank and state["note"] == "format 1"

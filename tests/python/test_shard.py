"""Tensor-parallel state saved as flashckpt.Shard by real gloo ranks: each rank
stores only its block, the commit checks the blocks against each other, and
the step loads into other world sizes and layouts (rows -> rows, columns, one
rank), training on bit-exact with a run that never stopped; `flashckpt export`
writes the whole tensors."""

import os
import subprocess

import pytest
import torch

import flashckpt
from flashckpt import _native
from flashckpt_testutil import PYTHON, child_env, run_world

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "tp_shard_script.py")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Step 3 saved by 2 ranks in rows, and the run that never stopped (to step 6)."""
    tmp = tmp_path_factory.mktemp("tp")
    procs = []
    try:
        run_world(procs, SCRIPT, 2, "train", tmp / "ckpt", 6, 3, tmp / "straight.pt", "rows", OMP_NUM_THREADS=1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return tmp


def test_each_rank_stores_its_block_once(saved):
    step = saved / "ckpt" / "step-3"
    block = 24 * 24 * 4  # rows 24 x 24 columns of float32
    for r in range(2):
        # W and its two moments: three blocks; the bias is in the .replica files.
        assert 3 * block <= os.path.getsize(step / f"rank-{r}.data") < 3 * block + 3 * 4096
    desc = _native.load().describe_global_step(str(saved / "ckpt"), 3)
    w = sorted((t["held_by"], t["global_offset"], t["shape"]) for t in desc["tensors"] if t["key"] == "tp/w")
    assert w == [(0, [0, 0], [24, 24]), (1, [24, 0], [24, 24])]
    assert all(t["global_shape"] == [48, 24] for t in desc["tensors"] if t["key"].startswith("tp/"))


@pytest.mark.parametrize("world,layout", [(4, "rows"), (3, "cols"), (1, "rows"), (2, "rows")])
def test_resume_in_another_world_and_layout_is_bit_exact(saved, tmp_path, procs, world, layout):
    out = tmp_path / "resumed.pt"
    results = run_world(procs, SCRIPT, world, "resume", saved / "ckpt", 6, 3, out, layout, OMP_NUM_THREADS=1)
    assert results[0]["keys"] == ["shared/bias", "tp/exp_avg", "tp/exp_avg_sq", "tp/w"]
    a = torch.load(saved / "straight.pt")["final"]
    b = torch.load(out)["final"]
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    # Not trivially equal: the three steps after the resume moved W.
    assert not torch.equal(torch.load(saved / "straight.pt")["at_save"]["w"], b["w"])


def test_the_saving_world_gets_its_shards_back_from_load(saved, procs):
    results = run_world(procs, SCRIPT, 2, "same", saved / "ckpt", 3, "rows", saved / "straight.pt",
                        OMP_NUM_THREADS=1)
    assert results[0] == {"rank": 0, "world": 2, "is_shard": True, "box": [[0, 0], [24, 24], [48, 24]],
                          "equal": True}
    assert results[1]["box"] == [[24, 0], [24, 24], [48, 24]] and results[1]["equal"]


def test_export_writes_the_whole_tensors(saved, tmp_path):
    out = tmp_path / "step3.pt"
    r = subprocess.run([PYTHON, "-m", "flashckpt", "export", str(saved / "ckpt"), "3", str(out), "--rank", "1"],
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # Loadable by torch alone: no flashckpt class in the file.
    check = subprocess.run([PYTHON, "-c", "import sys, torch; s = torch.load(sys.argv[1]); "
                            "assert 'flashckpt' not in sys.modules; print(type(s['tp']['w']).__name__, "
                            "list(s['tp']['w'].shape))", str(out)],
                           env=child_env(PYTHONPATH=""), capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["Tensor", "[48,", "24]"]
    state = torch.load(out)
    at_save = torch.load(saved / "straight.pt")["at_save"]
    for k in ("w", "exp_avg", "exp_avg_sq"):
        assert torch.equal(state["tp"][k], at_save[k]), k
    assert torch.equal(state["shared"]["bias"], at_save["bias"])


def test_ls_shows_each_shard_box(saved):
    r = subprocess.run([PYTHON, "-m", "flashckpt", "ls", str(saved / "ckpt"), "3", "--rank", "1"],
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if l.startswith("tp/w ")][0]
    assert "rank 1: shard [24:48, 0:24] of [48,24]" in line, r.stdout


def test_overlapping_shards_fail_the_save_and_keep_the_previous_step(tmp_path, procs):
    results = run_world(procs, SCRIPT, 2, "overlap", tmp_path / "ckpt", OMP_NUM_THREADS=1)
    for r in results.values():
        assert r["error"] and "shards of 'tp/w' overlap" in r["error"], r
        assert "rank 0 holds [0:25, 0:24]" in r["error"] and "rank 1 holds [24:48, 0:24]" in r["error"], r
        assert r["step1_loads"], r
    assert not (tmp_path / "ckpt" / "step-2" / "COMMIT").exists()


def test_a_box_no_shard_covers_is_an_error_naming_key_box_and_step(saved):
    w = torch.full((8, 24), -1.0)
    with pytest.raises(flashckpt.InvalidArgumentError) as e:
        flashckpt.load_resharded(saved / "ckpt", 3, state={"tp": {"w": flashckpt.Shard(w, (56, 24), (40, 0))}})
    assert "tp/w" in str(e.value) and "step 3" in str(e.value) and "[56,24]" in str(e.value)
    assert torch.equal(w, torch.full((8, 24), -1.0))  # nothing written


def test_shard_declarations_are_checked_where_they_are_made(tmp_path):
    with pytest.raises(ValueError, match="runs past the global shape"):
        flashckpt.Shard(torch.zeros(4, 4), (6, 4), (3, 0))
    with pytest.raises(ValueError, match="2 dimensions"):
        flashckpt.Shard(torch.zeros(4, 4), (8,), (0,))
    with flashckpt.Checkpointer(tmp_path / "c", replicated=("tp",)) as ckpt:
        with pytest.raises(ValueError, match="cannot be replicated"):
            ckpt.save(1, {"tp": {"w": flashckpt.Shard(torch.zeros(4, 4), (8, 4), (0, 0))}})
        ckpt.unlink_memory()

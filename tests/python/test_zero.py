"""ZeroRedundancyOptimizer state saved sharded as it is held (each rank its own
parameters' state, the model replicated), loaded into 4 and into 2 ranks with
real gloo processes; training goes on as in a run that never stopped."""

import os

import torch

from flashckpt_testutil import run_world

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "zero_script.py")


def test_zero_saved_by_4_resumes_on_4_bit_exact_and_on_2(tmp_path, procs):
    d = tmp_path / "ckpt"
    run_world(procs, SCRIPT, 4, "train", d, 6, 3, tmp_path / "straight4.pt", OMP_NUM_THREADS=1)
    # Each rank stored only its own parameters' optimizer state: no rank file holds all of it.
    step = d / "step-3"
    sizes = [os.path.getsize(step / f"rank-{r}.data") for r in range(4)]
    assert all(n > 0 for n in sizes) and max(sizes) < sum(sizes), sizes

    resumed4 = run_world(procs, SCRIPT, 4, "resume", d, 6, 3, tmp_path / "resumed4.pt", OMP_NUM_THREADS=1)
    a, b = torch.load(tmp_path / "straight4.pt"), torch.load(tmp_path / "resumed4.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same world size: bit-exact

    resumed2 = run_world(procs, SCRIPT, 2, "resume", d, 6, 3, tmp_path / "resumed2.pt", OMP_NUM_THREADS=1)
    owned = sorted(i for r in resumed2.values() for i in r["owned"])
    assert owned == sorted(i for r in resumed4.values() for i in r["owned"])  # every parameter, once
    assert len(resumed2[0]["owned"]) > 0 and len(resumed2[1]["owned"]) > 0
    c = torch.load(tmp_path / "resumed2.pt")
    for k in a:
        # Gradients and Adam's update do not depend on the world size here, nor on
        # which rank owns a parameter: resumed on 2 ranks, still bit-exact.
        assert torch.equal(a[k], c[k]), (k, (a[k] - c[k]).abs().max())
    # And the run is not trivially equal: training moved the parameters after the resume.
    run_world(procs, SCRIPT, 2, "train", tmp_path / "other", 3, 3, tmp_path / "at3.pt", OMP_NUM_THREADS=1)
    at3 = torch.load(tmp_path / "at3.pt")
    assert any(not torch.equal(at3[k], a[k]) for k in a)


def test_overlapping_shards_are_refused_naming_parameter_and_ranks(tmp_path, procs):
    results = run_world(procs, SCRIPT, 2, "overlap", tmp_path / "ckpt", OMP_NUM_THREADS=1)
    for r in results.values():
        assert r["error"] and "held by ranks 0 and 1" in r["error"] and "parameter 0" in r["error"], r

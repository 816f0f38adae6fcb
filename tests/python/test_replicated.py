"""Replicated state (data parallelism) with real gloo processes: stored once per
step over the ranks, loaded bit-exact into the same and into another world size,
and a rank whose "replicated" bytes drift fails the commit, naming the key."""

import os

import pytest

from flashckpt_testutil import run_world

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ddp_replicated_script.py")


def test_ddp_state_is_stored_once_and_loads_into_two_and_four_ranks(tmp_path, procs):
    d, expected = tmp_path / "ckpt", tmp_path / "expected.pt"
    saved = run_world(procs, SCRIPT, 4, "save", d, expected)
    for r in saved.values():
        assert r["same"] and r["source"] == "storage", r
        assert r["rank_back"] == r["rank"]  # non-tensor state stays per rank
    step = d / "step-10"
    replica = [os.path.getsize(step / f"rank-{r}.replica") for r in range(4)]
    data = [os.path.getsize(step / f"rank-{r}.data") for r in range(4)]
    # One copy of the model and Adam's state: params + exp_avg + exp_avg_sq (+ step scalars).
    n_params = 256 * 512 + 512 + 512 * 256 + 256 + 2 * 256
    one_copy = 3 * n_params * 4
    assert one_copy <= sum(replica) <= one_copy + 64 * 4096, (replica, one_copy)
    assert max(replica) - min(replica) <= 0.10 * (sum(replica) / 4), replica
    assert data == [0, 0, 0, 0], data  # every tensor is replicated; the rest is in the manifest
    for world in (2, 4):
        loaded = run_world(procs, SCRIPT, world, "load", d, expected)
        assert sorted(loaded) == list(range(world))
        for r in loaded.values():
            assert r["same"] and r["source"] == "storage", r
            assert r["into_same"] and r["into_in_place"] and r["into_source"] == "storage", r
        assert (d / f"step-{10 + world}" / "COMMIT").exists()


def test_replicated_bytes_that_differ_across_ranks_fail_the_commit(tmp_path, procs):
    d = tmp_path / "ckpt"
    results = run_world(procs, SCRIPT, 2, "diverge", d)
    for rank, r in results.items():
        assert r["error"], r
        assert r["committed"] == 1, r  # the step before stays committed
    msg = results[0]["error"]
    assert "model/module.2.bias" in msg and "ranks 0 and 1" in msg and "step 2" in msg, msg
    assert not (d / "step-2" / "COMMIT").exists()


def test_a_grown_world_where_only_some_ranks_hold_snapshots_agrees_to_start_fresh(tmp_path, procs):
    """A world of 2 leaves step 10 in shared memory only (replicated state, so rank 0 and 1 of any
    world may load it). The world of 2 again resumes it on both ranks from memory; a world of 4
    finds it on ranks 0 and 1 only: restorable_step() says None on every rank (no step every rank
    has), where a per-rank latest_step() would have sent ranks 0 and 1 alone into a collective load."""
    d, expected = tmp_path / "ckpt", tmp_path / "expected.pt"
    segments = set()
    try:
        saved = run_world(procs, SCRIPT, 2, "memsave", d, expected)
        segments |= {r["segment"] for r in saved.values()}
        assert [saved[r]["memory"] for r in (0, 1)] == [10, 10], saved
        again = run_world(procs, SCRIPT, 2, "resume", d, expected)
        for r in again.values():
            assert r["restorable"] == 10 and r["loaded"] == 10, r
            assert r["into_source"] == "memory" and r["into_same"], r
        grown = run_world(procs, SCRIPT, 4, "resume", d, expected, "unlink")
        segments |= {r["segment"] for r in grown.values()}
        assert [grown[r]["latest"] for r in range(4)] == [10, 10, None, None], grown
        assert [grown[r]["restorable"] for r in range(4)] == [None] * 4, grown
        assert not os.path.exists(d / "step-10"), "memory only: nothing was persisted"
    finally:
        for s in segments:
            if os.path.exists(s):
                os.unlink(s)

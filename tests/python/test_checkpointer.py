"""Lifecycle, queries, load_into and the bad inputs of the issue."""

import os
import shutil
import subprocess

import pytest
import torch

import flashckpt
from flashckpt import errors


def small_state(v=0.0):
    return {"model": {"w": torch.full((4, 4), v)}, "extra": {"v": v}}


def test_context_manager_steps_and_retention(tmp_path):
    d = tmp_path / "ckpt"
    with flashckpt.Checkpointer(d, keep_last=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.steps() == []
        for step in (10, 20, 30):
            ckpt.save(step, small_state(step)).wait(timeout=60)
        ckpt.wait(timeout=60)  # retention runs after the newest step is reported durable
        assert ckpt.latest_step() == 30
        assert ckpt.latest_committed_step() == 30
        detail = ckpt.steps(detail=True)
        committed = [s["step"] for s in detail if s["committed"]]
        assert committed == [20, 30]
        assert ckpt.load(20)["extra"]["v"] == 20
    assert sorted(p.name for p in d.glob("step-*")) == ["step-20", "step-30"]
    with pytest.raises(errors.FailedPreconditionError, match="closed"):
        ckpt.save(40, small_state())


def test_persist_every(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "c", persist_every=2, keep_last=0) as ckpt:
        handles = [ckpt.save(s, small_state(s)) for s in (1, 2, 3, 4)]
        for h in handles:
            h.wait(timeout=60)
        persisted = [h.step for h in handles if h.done()]
        assert len(persisted) == 2, persisted
        assert ckpt.latest_memory_step() == 4
        # The newest snapshot is in memory only, so close() would keep the segment.
        ckpt.unlink_memory()


def test_handle_wait_and_fence(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        h = ckpt.save(1, small_state(1.0), blocking=False)
        h.fence()
        h.wait(timeout=60)
        assert h.done() and h.step == 1
        ckpt.wait(timeout=60)


def test_install_fence_runs_before_each_step(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        calls = []
        real = ckpt.fence
        ckpt.fence = lambda: (calls.append(1), real())[1]
        handle = flashckpt.install_fence(opt, ckpt, model=model)
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        assert len(calls) == 2  # forward pre-hook + optimizer pre-step
        handle.remove()
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        assert len(calls) == 2


def test_heartbeat_file(tmp_path, monkeypatch):
    hb = tmp_path / "hb"
    monkeypatch.setenv("FLASHCKPT_HEARTBEAT_FILE", str(hb))
    flashckpt.heartbeat()
    assert hb.exists()
    os.utime(hb, (1, 1))
    import flashckpt._heartbeat as m
    m._last = 0.0
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(1, small_state())
    assert hb.stat().st_mtime > 1
    monkeypatch.delenv("FLASHCKPT_HEARTBEAT_FILE")
    flashckpt.heartbeat()  # no-op


def test_load_nothing_saved(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        with pytest.raises(errors.NotFoundError):
            ckpt.load()
        ckpt.save(1, small_state())
        with pytest.raises(errors.NotFoundError, match="5"):
            ckpt.load(5)


# -- load_into ---------------------------------------------------------------

class Net(torch.nn.Module):
    def __init__(self, hidden=8, extra=False):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, hidden)
        self.fc2 = torch.nn.Linear(hidden, 2)
        if extra:
            self.fc3 = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _train(model, opt, x, steps=1):
    """`steps` Adam steps of a squared-output loss on `x`."""
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_load_into_strict_lists_every_difference(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        src = Net(extra=True)
        ckpt.save(1, {"model": src.state_dict()})
        target = Net(hidden=16)
        target.fc1.register_buffer("counter", torch.zeros(1))
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(errors.StateDictMismatchError) as ei:
            ckpt.load_into(target)
        msg = str(ei.value)
        assert "missing keys (1): fc1.counter" in msg
        assert "unexpected keys (2): fc3.weight, fc3.bias" in msg
        assert "fc1.weight: checkpoint (8, 4) vs model (16, 4)" in msg
        assert isinstance(ei.value, ValueError)
        # Nothing changed.
        for k, v in target.state_dict().items():
            assert torch.equal(v, before[k])


def test_load_into_copies_from_memory_into_the_models_own_tensors_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    src = Net()
    opt = torch.optim.Adam(src.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    _train(src, opt, x, 3)
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(3, {"model": src.state_dict(), "optim": opt.state_dict()}).wait(timeout=60)
        target = Net()  # the slot's bytes are copied straight into its own parameters
        params = list(target.parameters())
        ptrs = [p.data_ptr() for p in params]
        opt2 = torch.optim.Adam(target.parameters(), lr=0.1)
        ckpt.load_into(target, opt2)
        assert ckpt.last_load.source == "memory"
    assert [p is q for p, q in zip(params, target.parameters())] == [True] * len(params)  # same Parameter objects
    assert [p.data_ptr() for p in params] == ptrs  # their own memory, filled in place
    for p, q in zip(src.parameters(), target.parameters()):
        assert torch.equal(p, q) and q.requires_grad
    for o, m in ((opt, src), (opt2, target)):  # two more steps: the same parameters, bit for bit
        _train(m, o, x, 2)
    for p, q in zip(src.parameters(), target.parameters()):
        assert torch.equal(p, q)


def test_load_into_copies_into_a_module_with_its_own_loading(tmp_path):
    class Custom(Net):
        def _load_from_state_dict(self, *args, **kwargs):
            self.loaded_by_hook = True
            return super()._load_from_state_dict(*args, **kwargs)

    src = Net()
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(1, {"model": src.state_dict()})
        target = Custom()
        ptr = target.fc1.weight.data_ptr()
        ckpt.load_into(target)
    assert target.loaded_by_hook and target.fc1.weight.data_ptr() == ptr
    assert torch.equal(target.fc1.weight, src.fc1.weight)


def test_load_into_non_strict_loads_what_matches(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        src = Net(extra=True)
        ckpt.save(1, {"model": src.state_dict()})
        target = Net(hidden=8)
        res = ckpt.load_into(target, strict=False)
        assert res.unexpected == ["fc3.weight", "fc3.bias"]
        assert res.missing == [] and res.mismatched == []
        assert torch.equal(target.fc1.weight, src.fc1.weight)
        bigger = Net(hidden=16)
        res = ckpt.load_into(bigger, strict=False)
        assert [m.split(":")[0] for m in res.mismatched] == ["fc1.weight", "fc1.bias", "fc2.weight"]
        assert torch.equal(bigger.fc2.bias, src.fc2.bias)  # the matching key was loaded


# -- bad directories -----------------------------------------------------------

def test_two_checkpointers_on_one_directory(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(1, small_state(1.0))
        with pytest.raises(errors.FailedPreconditionError, match="already open"):
            flashckpt.Checkpointer(tmp_path / "c")
        ckpt.save(2, small_state(2.0)).wait(timeout=60)  # the first one still works
        assert ckpt.load()["extra"]["v"] == 2.0
    # After close() the directory can be opened again.
    with flashckpt.Checkpointer(tmp_path / "c") as again:
        assert again.latest_step() == 2


def test_directory_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a directory")
    with pytest.raises(errors.InvalidArgumentError, match="not a directory"):
        flashckpt.Checkpointer(f)
    assert f.read_text() == "not a directory"


def test_directory_without_permission(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(d)]).returncode:
            pytest.skip("running as root without chattr: cannot make a directory unwritable")
        undo = ["chattr", "-i", str(d)]
    else:
        d.chmod(0o500)
        undo = ["chmod", "700", str(d)]
    try:
        with pytest.raises(errors.PermissionDeniedError, match="not writable"):
            flashckpt.Checkpointer(d)
        assert isinstance(errors.PermissionDeniedError("x"), PermissionError)
        assert os.listdir(d) == []
    finally:
        subprocess.run(undo, check=True)


def test_directory_of_newer_format(tmp_path):
    d = tmp_path / "c"
    with flashckpt.Checkpointer(d) as ckpt:
        ckpt.save(1, small_state(1.0)).wait(timeout=60)
    (d / "FORMAT").write_text("flashckpt format 99\n")
    listing = sorted(os.listdir(d / "step-1"))
    with pytest.raises(errors.FailedPreconditionError, match="newer flashckpt"):
        flashckpt.Checkpointer(d)
    assert sorted(os.listdir(d / "step-1")) == listing
    (d / "FORMAT").write_text("flashckpt format 1\n")
    with flashckpt.Checkpointer(d) as ckpt:
        assert ckpt.load()["extra"]["v"] == 1.0


def test_corruption_is_detected(tmp_path):
    d = tmp_path / "c"
    with flashckpt.Checkpointer(d) as ckpt:
        ckpt.save(1, {"w": torch.ones(1024)}).wait(timeout=60)
    data = d / "step-1" / "rank-0.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with flashckpt.Checkpointer(d) as ckpt:
        with pytest.raises(errors.CorruptionError):
            ckpt.load(prefer_memory=False)


def test_invalid_options(tmp_path):
    with pytest.raises(errors.InvalidArgumentError):
        flashckpt.Checkpointer(tmp_path / "c", rank=2, world_size=2)
    with pytest.raises(errors.InvalidArgumentError):
        flashckpt.Checkpointer(tmp_path / "c", persist_every=0)
    with pytest.raises(errors.InvalidArgumentError):
        flashckpt.Checkpointer(tmp_path / "c", num_slots=1)


def test_load_into_restores_optimizer_hyperparameters_and_state_without_touching_torch(tmp_path):
    import copy

    import torch.optim.optimizer as optmod

    torch.manual_seed(1)
    src = Net()
    opt = torch.optim.Adam(src.parameters(), lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)
    x = torch.randn(8, 4)
    _train(src, opt, x)
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(1, {"model": src.state_dict(), "optim": opt.state_dict()}).wait(timeout=60)
        target = Net()
        opt2 = torch.optim.Adam(target.parameters(), lr=0.5)
        deepcopy_before = getattr(optmod, "deepcopy", None)
        ckpt.load_into(target, opt2)
        assert getattr(optmod, "deepcopy", None) is deepcopy_before  # no torch global swapped
    assert getattr(optmod, "deepcopy", copy.deepcopy) is copy.deepcopy
    g = opt2.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (0.01, (0.8, 0.9), 0.1)
    for p, q in zip(src.parameters(), target.parameters()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(opt.state[p][name]), torch.as_tensor(opt2.state[q][name])), name


def test_load_into_fills_existing_optimizer_state_in_place(tmp_path):
    torch.manual_seed(2)
    src = Net()
    opt = torch.optim.Adam(src.parameters(), lr=0.05)
    x = torch.randn(8, 4)
    _train(src, opt, x, 2)
    target = Net()
    opt2 = torch.optim.Adam(target.parameters(), lr=0.05)
    _train(target, opt2, x)  # its state exists now: it is filled, not replaced
    state_ptrs = {id(p): opt2.state[p]["exp_avg"].data_ptr() for p in target.parameters()}
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(2, {"model": src.state_dict(), "optim": opt.state_dict()}).wait(timeout=60)
        ckpt.load_into(target, opt2)
        assert ckpt.last_load.source == "memory"
    for p, q in zip(src.parameters(), target.parameters()):
        assert torch.equal(p, q)
        assert opt2.state[q]["exp_avg"].data_ptr() == state_ptrs[id(q)]
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_load_into_from_storage_fills_the_models_own_tensors(tmp_path):
    """With the snapshot gone from memory, load_into reads storage straight into the
    existing parameters and optimizer state (their memory kept), crc-checked; a
    corrupted data file is an error naming the file and the tensor."""
    torch.manual_seed(3)
    src = Net(hidden=64)
    opt = torch.optim.Adam(src.parameters(), lr=0.05)
    x = torch.randn(8, 4)
    _train(src, opt, x, 2)
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(7, {"model": src.state_dict(), "optim": opt.state_dict()}).wait(timeout=60)
        ckpt.unlink_memory()
    target = Net(hidden=64)
    opt2 = torch.optim.Adam(target.parameters(), lr=0.05)
    _train(target, opt2, x)
    ptrs = {id(q): (q.data_ptr(), opt2.state[q]["exp_avg"].data_ptr()) for q in target.parameters()}
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.load_into(target, opt2)
        assert (ckpt.last_load.step, ckpt.last_load.source) == (7, "storage")
    for p, q in zip(src.parameters(), target.parameters()):
        assert (q.data_ptr(), opt2.state[q]["exp_avg"].data_ptr()) == ptrs[id(q)]
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
    data = next((tmp_path / "c" / "step-7").glob("rank-0*.data"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        with pytest.raises(errors.CorruptionError, match="crc32c") as e:
            ckpt.load_into(target, opt2, step=7)
        assert str(data) in str(e.value)


def test_a_mismatched_optimizer_fails_load_into_before_the_model_changes(tmp_path):
    src = Net()
    opt = torch.optim.Adam(src.parameters())
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(1, {"model": src.state_dict(), "optim": opt.state_dict()}).wait(timeout=60)
        target = Net()
        before = {k: v.clone() for k, v in target.state_dict().items()}
        wrong = torch.optim.Adam(list(target.parameters())[:1])  # fewer parameters
        with pytest.raises(errors.StateDictMismatchError, match="param group") as e:
            ckpt.load_into(target, wrong)
        assert "nothing was changed" in str(e.value)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_restorable_step_is_the_next_load_and_a_save_or_another_step_forgets_it(tmp_path):
    d = tmp_path / "ckpt"
    with flashckpt.Checkpointer(d, keep_last=5) as ckpt:
        assert ckpt.restorable_step() is None  # nothing saved: start fresh
        for step in (1, 2):
            ckpt.save(step, small_state(step)).wait(timeout=60)
    with flashckpt.Checkpointer(d, keep_last=5) as ckpt:
        assert ckpt.restorable_step() == 2
        assert ckpt.load()["extra"]["v"] == 2 and ckpt.last_load.step == 2
        assert ckpt.restorable_step() == 2  # asked, not loaded: then training goes on
        ckpt.save(3, small_state(3)).wait(timeout=60)
        assert ckpt.load()["extra"]["v"] == 3, "a save did not forget restorable_step()'s answer"
        assert ckpt.restorable_step() == 3
        assert ckpt.load(1)["extra"]["v"] == 1  # a step the caller chose
        assert ckpt.load()["extra"]["v"] == 3
        ckpt.unlink_memory()

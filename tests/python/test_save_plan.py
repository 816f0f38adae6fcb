"""The save plan: a save whose state has the layout of the previous one reuses its
records and pickled structure (only the data pointers are new); any change the plan
cannot follow takes the full path. Every case saves, then loads each step back from
memory and from storage and compares it with what was saved, bit for bit."""

import collections
import copy

import pytest
import torch

import flashckpt
from test_state import assert_same


def model_state(n=6, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict((f"layer{i}.weight", torch.randn(width, width, generator=g)) for i in range(n))
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    opt = {"state": {i: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(width, width, generator=g)}
                     for i in range(n)},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(n))}]}
    return {"model": sd, "optim": opt, "epoch": seed, "name": "run-a"}


def snapshot(state):
    """A deep copy of what ``state`` holds now (its tensors keep changing in place)."""
    return copy.deepcopy(state)


class Saver:
    def __init__(self, tmp_path, **kw):
        self.ckpt = flashckpt.Checkpointer(tmp_path / "ckpt", keep_last=100, **kw)
        self.saved = {}
        self.step = 0

    def save(self, state):
        self.step += 1
        self.ckpt.save(self.step, state).wait(timeout=60)
        self.saved[self.step] = snapshot(state)
        return self.ckpt._plan

    def check_all(self):
        for step, want in self.saved.items():
            for prefer_memory in (True, False):
                got = self.ckpt.load(step, prefer_memory=prefer_memory)
                assert_same(want, got, f"step {step} ({'memory' if prefer_memory else 'storage'})")
                if isinstance(want, dict) and isinstance(want.get("model"), collections.OrderedDict):
                    assert got["model"]._metadata == want["model"]._metadata

    def close(self):
        self.ckpt.close()


@pytest.fixture
def saver(tmp_path):
    s = Saver(tmp_path, num_slots=8)
    yield s
    s.close()


def test_same_layout_reuses_the_plan_and_every_step_loads_bit_exact(saver):
    state = model_state()
    first = saver.save(state)
    assert first is not None, "a state of plain containers, tensors and values qualifies for a plan"
    for i in range(4):
        for t in state["model"].values():
            t.add_(1.0)  # new bytes, same layout
        for p in state["optim"]["state"].values():
            p["step"] += 1
        assert saver.save(state) is first
    saver.check_all()


def test_new_tensor_objects_and_new_addresses_of_the_same_layout_reuse_the_plan(saver):
    state = model_state()
    plan = saver.save(state)
    # What model.state_dict() does every call: new tensor objects (here: new storage too).
    for k in list(state["model"]):
        state["model"][k] = state["model"][k].clone() * 2
    assert saver.save(state) is plan
    saver.check_all()


def test_a_changed_scalar_is_patched_into_the_structure(saver):
    state = model_state()
    plan = saver.save(state)
    state["optim"]["param_groups"][0]["lr"] = 5e-4  # a scheduler's step
    state["epoch"] = 3
    assert saver.save(state) is plan
    state["epoch"] = 3.0  # equal, but another type: kept as a float
    assert saver.save(state) is plan
    state["name"] = None
    assert saver.save(state) is plan
    saver.check_all()
    assert type(saver.ckpt.load(3)["epoch"]) is float


def test_a_changed_value_inside_a_tuple_takes_the_full_path(saver):
    state = model_state()
    plan = saver.save(state)
    state["optim"]["param_groups"][0]["betas"] = (0.8, 0.999)
    assert saver.save(state) is not plan
    saver.check_all()


@pytest.mark.parametrize("change", [
    "shape", "dtype", "new key", "removed key", "renamed key", "requires_grad", "parameter", "order", "metadata",
    "list length"])
def test_a_layout_change_makes_a_new_plan(saver, change):
    state = model_state()
    plan = saver.save(state)
    sd = state["model"]
    if change == "shape":
        sd["layer0.weight"] = torch.randn(4, 8)
    elif change == "dtype":
        sd["layer0.weight"] = sd["layer0.weight"].double()
    elif change == "new key":
        sd["extra"] = torch.ones(3)
    elif change == "removed key":
        del sd["layer5.weight"]
    elif change == "renamed key":
        sd["layer9.weight"] = sd.pop("layer5.weight")
    elif change == "requires_grad":
        sd["layer1.weight"].requires_grad_(True)
    elif change == "parameter":
        sd["layer2.weight"] = torch.nn.Parameter(sd["layer2.weight"].clone())
    elif change == "order":
        sd.move_to_end("layer0.weight")
    elif change == "metadata":
        sd._metadata[""]["version"] = 2
    elif change == "list length":
        state["optim"]["param_groups"][0]["params"].append(6)
    new = saver.save(state)
    assert new is not None and new is not plan
    assert saver.save(state) is new  # and the new layout is planned in turn
    saver.check_all()
    got = saver.ckpt.load(saver.step)
    if change == "requires_grad":
        assert got["model"]["layer1.weight"].requires_grad
    if change == "parameter":
        assert isinstance(got["model"]["layer2.weight"], torch.nn.Parameter)


@pytest.mark.parametrize("change", ["tied", "view", "offset view", "non-contiguous", "empty", "shard", "object"])
def test_state_the_plan_cannot_follow_takes_the_full_path(saver, change):
    state = model_state()
    plan = saver.save(state)
    sd = state["model"]
    if change == "tied":  # two keys, one tensor: one entry, restored as one tensor object
        sd["layer1.weight"] = sd["layer0.weight"]
    elif change == "view":  # a view at offset 0 of another tensor's storage: same address
        sd["layer1.weight"] = sd["layer0.weight"][:4]
    elif change == "offset view":
        sd["layer1.weight"] = sd["layer0.weight"][4:]
    elif change == "non-contiguous":
        sd["layer1.weight"] = sd["layer1.weight"].t()
        sd["layer2.weight"] = torch.randn(8, 16)[:, ::2]
    elif change == "empty":
        sd["layer1.weight"] = torch.empty(0, 8)
    elif change == "shard":
        sd["layer1.weight"] = flashckpt.Shard(sd["layer1.weight"], (16, 8), (0, 0))
    elif change == "object":
        state["extra"] = collections.Counter(a=1)
    assert saver.save(state) is None, "this state does not qualify for a plan"
    got = saver.ckpt.load(saver.step)
    if change == "tied":
        assert got["model"]["layer1.weight"] is got["model"]["layer0.weight"]
    if change in ("view", "offset view"):
        base = got["model"]["layer0.weight"]
        assert got["model"]["layer1.weight"].data_ptr() >= base.data_ptr()  # restored as a view of it
        base.add_(1)
        assert torch.equal(got["model"]["layer1.weight"],
                           base[:4] if change == "view" else base[4:])
    if change == "shard":
        assert isinstance(got["model"]["layer1.weight"], flashckpt.Shard)
    del saver.saved[saver.step]  # compared above (deepcopy would not keep its sharing)
    saver.check_all()
    # back to a plain state: planned again
    state = model_state(seed=5)
    again = saver.save(state)
    assert again is not None and saver.save(state) is again
    saver.check_all()


def test_a_planned_save_of_replicated_state_keeps_the_replicated_flags(tmp_path):
    s = Saver(tmp_path, replicated=["model"])
    try:
        state = model_state()
        plan = s.save(state)
        assert plan is not None
        for t in state["model"].values():
            t.mul_(3)
        assert s.save(state) is plan
        entries = {e["key"]: e for e in s.ckpt._core.describe(s.step, prefer_memory=False)["tensors"]}
        assert entries["model/layer0.weight"]["replicated"] and not entries["optim/state/0/exp_avg"]["replicated"]
        s.check_all()
    finally:
        s.close()


def test_a_nan_scalar_saves_correctly_every_time(saver):
    state = model_state()
    state["loss"] = float("nan")
    saver.save(state)
    saver.save(state)
    got = saver.ckpt.load(saver.step)
    assert got["loss"] != got["loss"]


def test_a_cycle_added_after_a_plan_is_still_the_clear_error(saver):
    state = model_state()
    assert saver.save(state) is not None
    state["optim"]["param_groups"].append(state["optim"])
    with pytest.raises(ValueError, match="cycle"):
        saver.ckpt.save(99, state)
    state["optim"]["param_groups"].pop()
    saver.check_all()


def test_a_sparse_tensor_swapped_in_after_a_plan_gets_the_full_paths_clear_error(saver):
    state = model_state()
    assert saver.save(state) is not None
    state["model"]["layer0.weight"] = state["model"]["layer0.weight"].to_sparse()  # same dtype and shape
    with pytest.raises(TypeError, match="layout"):
        saver.ckpt.save(99, state)
    saver.check_all()

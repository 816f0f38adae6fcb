"""Round trips of nested training state through save/load (memory and storage)."""

import collections
import pickle

import pytest
import torch

import flashckpt

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool,
              torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
              torch.complex64, torch.complex128]

Point = collections.namedtuple("Point", "x y")


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.cpu(), b.cpu()), path
        return
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def roundtrip(tmp_path, state, source):
    with flashckpt.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(7, state).wait(timeout=60)
        out = ckpt.load(prefer_memory=(source == "memory"))
        assert ckpt.last_load.step == 7
        assert ckpt.last_load.source == source
    return out


def make_tensor(dtype, shape=(3, 5)):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, dtype=dtype)


@pytest.mark.parametrize("source", ["memory", "storage"])
def test_every_dtype_and_shape(tmp_path, source):
    state = {str(dt): make_tensor(dt) for dt in ALL_DTYPES}
    state["scalar0d"] = torch.tensor(3.5)
    state["int0d"] = torch.tensor(7, dtype=torch.int64)
    state["empty"] = torch.empty(0, 4)
    state["empty_bf16"] = torch.empty(2, 0, dtype=torch.bfloat16)
    out = roundtrip(tmp_path, state, source)
    assert_same(state, out)
    assert out["scalar0d"].dim() == 0


def test_nested_containers_and_python_values(tmp_path):
    state = {
        "list": [torch.ones(2), 3, "s", [torch.zeros(1), {"deep": torch.arange(4)}]],
        "tuple": (1.5, torch.full((2,), 2.0), None),
        "named": Point(torch.tensor([1, 2]), "y"),
        "od": collections.OrderedDict(b=torch.ones(1), a=2),
        "py": {"int": 1, "float": 0.25, "str": "hello", "bytes": b"\x00\x01", "none": None,
               "bool": True, "set": {1, 2}, "complex": 1 + 2j},
    }
    out = roundtrip(tmp_path, state, "memory")
    assert_same(state, out)
    assert isinstance(out["named"], Point)


def test_state_dict_metadata_kept(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = model.state_dict()
    out = roundtrip(tmp_path, {"model": sd}, "storage")
    assert type(out["model"]) is collections.OrderedDict
    assert out["model"]._metadata == sd._metadata
    model.load_state_dict(out["model"])


@pytest.mark.parametrize("source", ["memory", "storage"])
def test_non_contiguous_views_and_shared_storage(tmp_path, source):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "base": base,
        "again": base,  # the same object twice
        "row": base[1],  # a view of base
        "t": base.t(),  # a transposed view
        "lone_t": torch.randn(5, 3).t(),  # dense, non-contiguous, not shared
        "strided": torch.randn(6, 8)[::2, 1::3],  # not dense: copied
        "expanded": torch.randn(3, 1).expand(3, 4),
    }
    out = roundtrip(tmp_path, state, source)
    for k in state:
        assert torch.equal(state[k], out[k]), k
    assert out["base"] is out["again"]
    # Views come back as views of one storage.
    out["base"][1, 0] = -1.0
    assert out["row"][0].item() == -1.0
    assert out["t"][0, 1].item() == -1.0
    assert out["t"].stride() == base.t().stride()
    assert out["lone_t"].stride() == state["lone_t"].stride()


def test_tied_weights_saved_once_and_restored_tied(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(100, 16)
            self.head = torch.nn.Linear(16, 100, bias=False)
            self.head.weight = self.emb.weight

    m = Tied()
    with flashckpt.Checkpointer(tmp_path / "ckpt") as ckpt:
        h = ckpt.save(1, {"model": m.state_dict()})
        assert h.nbytes == 100 * 16 * 4  # one copy of the tied matrix
        h.wait(timeout=60)
        out = ckpt.load(prefer_memory=False)
    sd = out["model"]
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    m2 = Tied()
    m2.load_state_dict(sd)
    assert torch.equal(m2.head.weight, m.emb.weight)


def test_parameters_keep_their_type(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    out = roundtrip(tmp_path, {"p": p, "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False)},
                    "memory")
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].requires_grad
    assert isinstance(out["frozen"], torch.nn.Parameter) and not out["frozen"].requires_grad


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
], ids=["adam", "sgd_momentum"])
def test_optimizer_state(tmp_path, make_opt):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = make_opt(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
    with flashckpt.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, {"model": model.state_dict(), "optim": opt.state_dict()}).wait(timeout=60)
        model2 = torch.nn.Linear(8, 4)
        opt2 = make_opt(model2.parameters())
        res = ckpt.load_into(model2, opt2)
    assert res.step == 3
    assert_same(opt.state_dict(), opt2.state_dict())
    x = torch.randn(16, 8)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight)


def test_rng_helper(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1)
    with flashckpt.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"rng": flashckpt.rng_state()})
        expected = (torch.rand(3), np.random.rand(3), random.random())
        torch.rand(10), np.random.rand(10), random.random()
        flashckpt.set_rng_state(ckpt.load()["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert (expected[1] == got[1]).all()
    assert expected[2] == got[2]


def test_unsaveable_object_names_its_key_path(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(TypeError, match=r"state\['extra'\]\['hooks'\]\[1\]"):
            ckpt.save(1, {"model": {"w": torch.ones(1)}, "extra": {"hooks": [1, lambda x: x]}})
        with pytest.raises(TypeError, match=r"state\['sparse'\].*layout"):
            ckpt.save(1, {"sparse": torch.eye(3).to_sparse()})
        assert ckpt.steps() == []  # nothing was saved


def test_loaded_cpu_tensors_are_zero_copy(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"a": torch.ones(1000), "b": torch.zeros(10)})
        out = ckpt.load()
    # Both live in the snapshot's one buffer, which outlives the Checkpointer.
    assert abs(out["a"].data_ptr() - out["b"].data_ptr()) < 1 << 20
    del ckpt
    assert out["a"].sum().item() == 1000.0


def test_map_location(tmp_path):
    with flashckpt.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"a": torch.ones(2)})
        out = ckpt.load(map_location="cpu")
        assert out["a"].device.type == "cpu"
        out = ckpt.load(map_location={"cpu": "cpu"})
        assert out["a"].device.type == "cpu"


def test_structure_is_plain_pickle(tmp_path):
    # The non-tensor part is an ordinary pickle: readable without the extension.
    from flashckpt import _state

    flat = _state.flatten({"x": torch.ones(1), "y": 3})
    meta = pickle.loads(dict(flat.blobs)[_state.STRUCTURE_BLOB])
    assert meta["state"]["y"] == 3

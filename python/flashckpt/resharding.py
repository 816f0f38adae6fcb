"""State partitioned over the ranks, saved as it is held and loaded into any world size.

A ``ZeroRedundancyOptimizer`` keeps each parameter's optimizer state on one rank.
``zero_state_dict(zero)`` is this rank's part of it in the *global* indexing (what
``zero.state_dict()`` would hold for this rank's parameters, with no gather to one
rank); save it under a key of the state, with the model replicated::

    ckpt = flashckpt.Checkpointer(d, replicated=("model",))
    ckpt.save(step, {"model": ddp.state_dict(), "optimizer": flashckpt.zero_state_dict(zero)})

``load_resharded(directory, step, model=..., optimizer=zero)`` then loads the step
into a world of any size: the model's tensors straight into its parameters, and
for each parameter this rank owns now, its state from whichever rank's files hold
it (``_C.read_global_into``: io_uring, crc32c of every tensor).
"""

from __future__ import annotations

import pickle
from typing import Any, Dict, Optional

import torch

from . import _native, _state
from .errors import InvalidArgumentError, StateDictMismatchError


def _is_zero(optimizer) -> bool:
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(optimizer, ZeroRedundancyOptimizer)


def zero_state_dict(zero) -> Dict[str, Any]:
    """This rank's shard of a ``ZeroRedundancyOptimizer``'s state, keyed by global
    parameter index, plus the global ``param_groups`` (hyperparameters and global
    indices). No collective: every rank calls it on its own state."""
    if not _is_zero(zero):
        raise InvalidArgumentError(f"zero_state_dict() takes a ZeroRedundancyOptimizer, got {type(zero).__name__}")
    groups = torch.optim.Optimizer.state_dict(zero)["param_groups"]
    index = zero._param_to_index
    state = {index[p]: dict(s) for p, s in zero.optim.state.items() if s}
    return {"state": dict(sorted(state.items())), "param_groups": groups, "zero_shard": True}


def _target(t: torch.Tensor, shard: Optional["_state.Shard"] = None):
    return _native.load().LoadTarget(data=t.data_ptr(), nbytes=t.numel() * t.element_size(), dtype=str(t.dtype),
                                     shape=list(t.shape), device_type=t.device.type,
                                     device=_state._device_index(t), stream=0,
                                     global_shape=list(shard.global_shape) if shard is not None else [],
                                     global_offset=list(shard.offsets) if shard is not None else [])


def _state_targets(state):
    """The tensors and Shards of ``state`` by the keys a save of it gives them:
    key -> (tensor to fill in place, the buffer read into, the Shard or None)."""
    out: Dict[str, tuple] = {}

    def walk(obj, path):
        if isinstance(obj, _state.Shard) or isinstance(obj, torch.Tensor):
            t = obj.tensor if isinstance(obj, _state.Shard) else obj
            if not isinstance(t, torch.Tensor):
                raise InvalidArgumentError(f"load_resharded: {_state._path_repr(path)} is a Shard of a "
                                           f"{type(t).__name__}, not a tensor")
            t = t.detach()
            buf = t if t.is_contiguous() and t.device.type == "cpu" else torch.empty(t.shape, dtype=t.dtype)
            out[_state._key_of(path)] = (t, buf, obj if isinstance(obj, _state.Shard) else None)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, path + (k,))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, path + (i,))

    walk(state, ())
    return out


def _fits(t: torch.Tensor, e: dict) -> bool:
    return (str(t.dtype) == e["dtype"] and list(t.shape) == list(e["shape"]) and t.is_contiguous()
            and t.device.type == "cpu")


def load_resharded(directory, step: int, *, model: Optional[torch.nn.Module] = None, optimizer=None,
                   state: Any = None, model_key: str = "model",
                   optimizer_key: str = "optimizer") -> Dict[str, Any]:
    """Loads committed ``step`` of ``directory`` into ``model``, ``optimizer`` and
    ``state``, whatever world size and layout saved it:

    * the model's tensors (replicated, or held by one rank each) in place into its
      state_dict() tensors;
    * a ZeroRedundancyOptimizer gets the state of the parameters it owns in this
      world, gathered from the ranks that held them; any other optimizer its
      (replicated) state;
    * ``state``: a structure like the saved one (dicts, lists, tuples) whose tensors
      and ``flashckpt.Shard``s are filled in place, each under the key a save of
      this structure gives it: a tensor with the saved tensor of its key (or, if
      that was saved in shards, the whole tensor assembled from them), a Shard with
      its box of the global tensor, read from the saved chunks that cover it (every
      chunk read is checked by its crc32c; a box no saved shard covers, or another
      global shape, is an error before anything is written).

    Returns what was loaded, by key. Reads only committed storage."""
    native = _native.load()
    directory = str(directory)
    targets = _state_targets(state) if state is not None else {}
    entries, metas = {}, []
    if model is not None or optimizer is not None:
        # Their saved structure is needed; `state` alone is filled by key (a
        # step saved by the C++ API too).
        desc = native.describe_global_step(directory, step)
        entries = {e["key"]: e for e in desc["tensors"]}
        metas = [pickle.loads(b[_state.STRUCTURE_BLOB]) for b in desc["rank_blobs"] if _state.STRUCTURE_BLOB in b]
        if not metas:
            raise StateDictMismatchError(f"step {step} of {directory} has no structure saved by flashckpt's "
                                         "Python API")
    dest: Dict[str, torch.Tensor] = {}

    def claim(leaf, t: torch.Tensor) -> torch.Tensor:
        e = entries.get(leaf.key)
        if e is None:
            raise StateDictMismatchError(f"step {step} of {directory}: no tensor '{leaf.key}' on any rank")
        if not _fits(t, e):
            t = torch.empty(e["shape"], dtype=_state.dtype_from_name(e["dtype"]))
        dest[leaf.key] = t
        return t

    if model is not None:
        saved = metas[0]["state"].get(model_key)
        own = model.state_dict()
        if not isinstance(saved, dict) or set(saved) != set(own):
            missing = sorted(set(own) - set(saved or {}))[:5]
            extra = sorted(set(saved or {}) - set(own))[:5]
            raise StateDictMismatchError(f"step {step} of {directory}: '{model_key}' does not match the model "
                                         f"(missing {missing}, unexpected {extra})")
        replaced = {}
        for name, t in own.items():
            got = claim(saved[name], t.detach())
            if got is not t.detach() and got.data_ptr() != t.data_ptr():
                replaced[name] = got
    opt_state = None
    if optimizer is not None:
        parts = [m["state"].get(optimizer_key) for m in metas]
        if not all(isinstance(p, dict) and {"state", "param_groups"} <= set(p) for p in parts):
            raise StateDictMismatchError(f"step {step} of {directory}: '{optimizer_key}' is not an optimizer's "
                                         "state_dict on every rank")
        merged, holder = {}, {}
        for rank, part in enumerate(parts):
            for idx, st in part["state"].items():
                if idx in holder and part.get("zero_shard"):
                    raise InvalidArgumentError(
                        f"step {step} of {directory}: the optimizer state of parameter {idx} ('{optimizer_key}') "
                        f"is held by ranks {holder[idx]} and {rank}: the shards overlap")
                holder.setdefault(idx, rank)
                merged.setdefault(idx, st)
        if _is_zero(optimizer):
            index = optimizer._param_to_index
            wanted = sorted(index[p] for g in optimizer.optim.param_groups for p in g["params"])
        else:
            wanted = sorted(merged)
        per_param = {}
        for idx in wanted:
            if idx not in merged:
                continue  # no state yet (the parameter never had a step)
            per_param[idx] = {}
            for name, v in merged[idx].items():
                if isinstance(v, _state._TensorLeaf):
                    e = entries.get(v.key)
                    if e is None:
                        raise StateDictMismatchError(f"step {step} of {directory}: no tensor '{v.key}' on any rank")
                    v = claim(v, torch.empty(e["shape"], dtype=_state.dtype_from_name(e["dtype"])))
                per_param[idx][name] = v
        opt_state = {"state": per_param, "param_groups": parts[0]["param_groups"]}
    both = sorted(set(targets) & set(dest))
    if both:
        raise InvalidArgumentError(f"load_resharded: keys {both[:5]} are both in state= and in the model or "
                                   "optimizer; give each key once")
    native.read_global_into(directory, step, {**{k: _target(t) for k, t in dest.items()},
                                              **{k: _target(buf, sh) for k, (t, buf, sh) in targets.items()}})
    with torch.no_grad():
        for k, (t, buf, sh) in targets.items():
            if buf is not t:
                t.copy_(buf)
            dest[k] = t
    if model is not None and replaced:
        with torch.no_grad():
            own = model.state_dict()
            for name, t in replaced.items():
                own[name].copy_(t)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    return dest

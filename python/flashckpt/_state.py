"""Turning a nested training state into tensor records plus one pickled blob, and back.

A state is any nesting of dicts (including OrderedDict with ``_metadata``),
lists, tuples (including namedtuples), tensors and picklable values. Saving
replaces every tensor by a ``_TensorLeaf`` placeholder naming a tensor entry,
pickles the rest (the *structure*), and hands the tensors to the core as raw
records: pointer, byte count, dtype name, shape, device.

Storage sharing is kept:
  * the same tensor reached twice (tied weights) is one entry, restored as one
    tensor object;
  * distinct views of one storage (a slice and its base, a transpose) become one
    ``<key>@storage`` entry holding the bytes they span, plus views recorded with
    ``storage_key``/``strides``/``storage_offset`` and restored as views of one
    restored storage.
A non-contiguous tensor whose elements are dense in memory (a transpose, a
permute) is saved as its bytes with its strides, without a copy; other
non-contiguous tensors are copied with ``.contiguous()`` first.
"""

from __future__ import annotations

import collections
import copy
import math
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _native

STRUCTURE_BLOB = "__flashckpt__/structure"
STRUCTURE_VERSION = 1


class _TensorLeaf:
    """Stands for a tensor inside the pickled structure."""

    __slots__ = ("key", "parameter", "requires_grad")

    def __init__(self, key: str, parameter: bool = False, requires_grad: bool = False):
        self.key = key
        self.parameter = parameter
        self.requires_grad = requires_grad

    def __getstate__(self):
        return (self.key, self.parameter, self.requires_grad)

    def __setstate__(self, s):
        self.key, self.parameter, self.requires_grad = s

    def __repr__(self):
        return f"_TensorLeaf({self.key!r})"


class Shard:
    """This rank's box of a larger tensor: ``tensor`` holds the elements
    ``[offsets[d], offsets[d] + tensor.shape[d])`` of every dimension d of a
    tensor of ``global_shape`` (tensor parallelism, hand-partitioned state).

    Put it in a saved state where the tensor would go, under the same key on
    every rank that holds a part of it::

        rows = out_features // world
        state = {"fc1.weight": flashckpt.Shard(local_w, (out_features, in_features), (rank * rows, 0))}
        ckpt.save(step, state)

    The commit checks the shards of each key against each other (one global
    shape and dtype, no two boxes overlapping; equal boxes with equal bytes are
    copies, such as the data-parallel replicas of one tensor-parallel shard).
    ``ckpt.load()`` in the same layout gives the Shards back; in any other
    layout or world size, ``flashckpt.load_resharded(directory, step,
    state=...)`` fills each Shard given from the saved chunks that cover its
    box. ``flashckpt export`` writes the whole tensors."""

    __slots__ = ("tensor", "global_shape", "offsets", "_key")

    def __init__(self, tensor, global_shape, offsets):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
        global_shape = tuple(int(d) for d in global_shape)
        offsets = tuple(int(o) for o in offsets)
        if shape is not None:
            if len(global_shape) != len(shape) or len(offsets) != len(shape):
                raise ValueError(f"Shard: a tensor of shape {list(shape)} needs a global shape and offsets of "
                                 f"{len(shape)} dimensions, got {list(global_shape)} and {list(offsets)}")
            for d, (o, n, g) in enumerate(zip(offsets, shape, global_shape)):
                if o < 0 or o + n > g:
                    raise ValueError(f"Shard: dimension {d} of the box ({o} + {n}) runs past the global "
                                     f"shape {list(global_shape)}")
        self.tensor = tensor
        self.global_shape = global_shape
        self.offsets = offsets
        self._key = None

    def __getstate__(self):
        return (self.tensor, self.global_shape, self.offsets)

    def __setstate__(self, s):
        self.tensor, self.global_shape, self.offsets = s
        self._key = None

    def __repr__(self):
        box = ", ".join(f"{o}:{o + n}" for o, n in zip(self.offsets, getattr(self.tensor, "shape", ())))
        return f"Shard([{box}] of {list(self.global_shape)})"


def _path_repr(path: Tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def _key_of(path: Tuple[Any, ...]) -> str:
    key = "/".join(str(p) for p in path) if path else "<root>"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"cannot save {_path_repr(path)}: its key cannot be encoded as UTF-8 ({e.reason} at "
                         f"{e.start}, e.g. a lone surrogate from a file name); use keys that can") from None
    return key


def storage_of(t: torch.Tensor) -> Tuple[int, int]:
    """(data pointer, byte size) of a tensor's storage, on PyTorch 1.13 and 2.x."""
    if hasattr(t, "untyped_storage"):
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    s = t.storage()
    return s.data_ptr(), s.nbytes()


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """[lo, hi) element offsets of a non-empty tensor within its storage."""
    lo = t.storage_offset()
    hi = lo + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return lo, hi


def _is_dense(t: torch.Tensor) -> bool:
    """True when the tensor's elements fill [lo, hi) exactly once (any dim order)."""
    dims = sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def dtype_from_name(name: str) -> torch.dtype:
    attr = name[len("torch."):] if name.startswith("torch.") else name
    dt = getattr(torch, attr, None)
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"unknown tensor dtype {name!r} in checkpoint")
    return dt


def _device_index(t: torch.Tensor) -> int:
    """-1 for host memory, else the ordinal on its device type (whose backend the core picks)."""
    if t.device.type == "cpu":
        return -1
    if t.device.index is not None:
        return t.device.index
    return torch.cuda.current_device() if t.device.type == "cuda" else 0


@dataclass
class FlatState:
    """What save() hands to the core."""

    records: List[Any] = field(default_factory=list)  # _C.TensorRecord, one per tensor entry
    blobs: List[Tuple[str, bytes]] = field(default_factory=list)
    keepalive: List[torch.Tensor] = field(default_factory=list)  # temporaries and sources
    nbytes: int = 0
    has_cuda: bool = False
    structure: Any = None  # the state with _TensorLeaf placeholders (what the blob pickles)
    blob_meta: Optional[dict] = None  # the pickled blob's dict
    aliases: Dict[str, str] = field(default_factory=dict)
    data: Optional[List[int]] = None  # a planned save: the new data pointers (records are the plan's)


def _check_tensor(t: torch.Tensor, path) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"cannot save {_path_repr(path)}: tensors with layout {t.layout} "
                        "are not supported (convert with .to_dense())")
    if getattr(t, "is_quantized", False):
        raise TypeError(f"cannot save {_path_repr(path)}: quantized tensors are not supported")
    # Any device type goes to the core, which routes it to that type's device
    # backend, or fails naming the type and how to load a backend for it.


def _copy_mapping(d: dict) -> dict:
    if type(d) is dict:
        return {}
    try:
        new = copy.copy(d)  # keeps the type and attributes such as state_dict()._metadata
        new.clear()
        return new
    except Exception:
        return {}


def _find_unpicklable(obj, path) -> Optional[Tuple[Tuple[Any, ...], Exception]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            r = _find_unpicklable(v, path + (k,))
            if r:
                return r
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            r = _find_unpicklable(v, path + (i,))
            if r:
                return r
        return None
    try:
        pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # PicklingError, AttributeError, TypeError...
        return path, e
    return None


def flatten(state: Any, cuda_stream_of=None, replicated=None) -> FlatState:
    """Splits ``state`` into tensor records and the pickled structure.

    ``replicated``: True (every tensor), or a collection of top-level keys of
    ``state`` whose tensors are the same on every rank; None: none."""
    leaves: List[Tuple[str, torch.Tensor]] = []
    shards: List[Tuple[str, torch.Tensor, tuple, tuple]] = []  # key, tensor, global shape, offsets
    replicated_keys = set()  # tensor keys saved as replicated
    by_id: Dict[int, _TensorLeaf] = {}
    used_keys = set()

    def unique(key: str) -> str:
        if key not in used_keys and not key.endswith("@storage"):
            used_keys.add(key)
            return key
        i = 1
        while f"{key}#{i}" in used_keys:
            i += 1
        used_keys.add(f"{key}#{i}")
        return f"{key}#{i}"

    # Containers on the path being walked: one seen again is a cycle, which
    # would recurse forever (and pickle cannot keep it with tensors split out).
    open_containers: Dict[int, tuple] = {}

    def walk(obj, path):
        if isinstance(obj, Shard):
            t = obj.tensor
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"cannot save {_path_repr(path)}: a Shard of a {type(t).__name__}, not a tensor")
            _check_tensor(t, path)
            key = unique(_key_of(path))
            if replicated is True or (replicated and path and path[0] in replicated):
                raise ValueError(f"cannot save {_path_repr(path)}: a Shard is partitioned state, it cannot be "
                                 "replicated (leave its top-level key out of Checkpointer(replicated=...))")
            shards.append((key, t, obj.global_shape, obj.offsets))
            return Shard(_TensorLeaf(key, isinstance(t, torch.nn.Parameter), bool(t.requires_grad)),
                         obj.global_shape, obj.offsets)
        if isinstance(obj, (dict, list, tuple)):
            first = open_containers.get(id(obj))
            if first is not None:
                raise ValueError(f"cannot save {_path_repr(path)}: the state contains a cycle (this container "
                                 f"is {_path_repr(first)}, which contains it); save a structure without "
                                 "references back to its own containers")
            open_containers[id(obj)] = path
            try:
                return walk_container(obj, path)
            finally:
                del open_containers[id(obj)]
        if isinstance(obj, torch.Tensor):
            leaf = by_id.get(id(obj))
            if leaf is None:
                _check_tensor(obj, path)
                leaf = _TensorLeaf(unique(_key_of(path)), isinstance(obj, torch.nn.Parameter),
                                   bool(obj.requires_grad))
                by_id[id(obj)] = leaf
                leaves.append((leaf.key, obj))
                if replicated is True or (replicated and path and path[0] in replicated):
                    replicated_keys.add(leaf.key)
            return leaf
        return obj

    def walk_container(obj, path):
        if isinstance(obj, dict):
            new = _copy_mapping(obj)
            for k, v in obj.items():
                new[k] = walk(v, path + (k,))
            return new
        if isinstance(obj, list):
            return [walk(v, path + (i,)) for i, v in enumerate(obj)]
        items = [walk(v, path + (i,)) for i, v in enumerate(obj)]
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        return tuple(items) if type(obj) is tuple else type(obj)(items)

    structure = walk(state, ())
    flat = FlatState()
    devices: Dict[str, str] = {}
    # Distinct tensor objects over identical bytes (same storage, dtype, shape,
    # strides, offset): the later key points at the first one's entry.
    aliases: Dict[str, str] = {}

    # Group tensors by storage so that views of one storage are saved once.
    groups: Dict[Tuple[str, int], List[Tuple[str, torch.Tensor]]] = {}
    singles: List[Tuple[str, torch.Tensor]] = []
    for key, t in leaves:
        if t.numel() == 0:
            singles.append((key, t))
            continue
        # The storage's base address (what storage().data_ptr() says, without
        # building a storage object per tensor: the costliest step here).
        base = t.data_ptr() - t.storage_offset() * t.element_size()
        groups.setdefault((t.device, base), []).append((key, t))

    def stream_of(t: torch.Tensor) -> int:
        if t.device.type != "cuda":
            return 0
        flat.has_cuda = True
        if cuda_stream_of is not None:
            return cuda_stream_of(t.device)
        return torch.cuda.current_stream(t.device).cuda_stream

    tensor_record = _native.load().TensorRecord
    dtype_names: Dict[torch.dtype, str] = {}
    device_names: Dict[torch.device, Tuple[str, str, int]] = {}  # name, type, index

    def add_record(key, t, ptr, nbytes, shape, strides, storage_offset, storage_key="", is_replicated=None,
                   global_shape=(), global_offset=()):
        dt, d = t.dtype, t.device
        dtype = dtype_names.get(dt) or dtype_names.setdefault(dt, str(dt))
        dev = device_names.get(d) or device_names.setdefault(d, (str(d), d.type, _device_index(t)))
        flat.records.append(tensor_record(
            key=key, data=ptr, nbytes=nbytes, dtype=dtype, shape=list(shape),
            element_size=t.element_size(), device=dev[2], cuda_stream=stream_of(t) if dev[1] == "cuda" else 0,
            strides=list(strides), storage_offset=storage_offset, storage_key=storage_key, device_type=dev[1],
            replicated=(key in replicated_keys) if is_replicated is None else is_replicated,
            global_shape=list(global_shape), global_offset=list(global_offset)))
        devices[key] = dev[0]
        if not storage_key:
            flat.nbytes += nbytes

    host_record = tensor_record.host

    def add_single(key, t):
        t = t.detach()
        d = t.device
        if d.type == "cpu" and t.is_contiguous() and t.numel() > 0:  # the common case, fast
            dt = t.dtype
            dtype = dtype_names.get(dt) or dtype_names.setdefault(dt, str(dt))
            dev = device_names.get(d) or device_names.setdefault(d, (str(d), d.type, -1))
            nbytes = t.numel() * t.element_size()
            flat.records.append(host_record(key, t.data_ptr(), nbytes, dtype, list(t.shape), t.element_size(),
                                            key in replicated_keys))
            devices[key] = dev[0]
            flat.nbytes += nbytes
            return
        if t.numel() == 0:
            add_record(key, t, 0, 0, t.shape, [], 0)
        elif t.is_contiguous():
            add_record(key, t, t.data_ptr(), t.numel() * t.element_size(), t.shape, [], 0)
        elif _is_dense(t):
            lo, _ = _span(t)
            es = t.element_size()
            base = t.data_ptr() - (t.storage_offset() - lo) * es
            add_record(key, t, base, t.numel() * es, t.shape, t.stride(),
                       t.storage_offset() - lo)
        else:
            c = t.contiguous()
            flat.keepalive.append(c)
            add_record(key, c, c.data_ptr(), c.numel() * c.element_size(), c.shape, [], 0)

    for key, t in singles:
        add_single(key, t)
    # A shard is saved contiguous and on its own (a slice of a larger local
    # tensor is not folded into that tensor's storage entry).
    for key, t, global_shape, offsets in shards:
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
            flat.keepalive.append(t)
        add_record(key, t, t.data_ptr() if t.numel() else 0, t.numel() * t.element_size(), t.shape, [], 0,
                   is_replicated=False, global_shape=global_shape, global_offset=offsets)
    for members in groups.values():
        if len(members) == 1:  # the common case: a tensor alone on its storage
            add_single(*members[0])
            continue
        views = {}
        for key, t in members:
            sig = (t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
            views.setdefault(sig, (key, t))
        distinct = list(views.values())
        if len(distinct) == 1 or len({t.dtype for _, t in distinct}) > 1:
            # Sharing across dtypes is not expressible with one base; copy each.
            seen_sig = {}
            for key, t in members:
                sig = (t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
                if sig in seen_sig:
                    # Another tensor object over the very same bytes: one entry.
                    aliases[key] = seen_sig[sig]
                    continue
                seen_sig[sig] = key
                add_single(key, t)
            continue
        es = distinct[0][1].element_size()
        spans = [_span(t) for _, t in distinct]
        lo = min(s[0] for s in spans)
        hi = max(s[1] for s in spans)
        first_key, first = distinct[0]
        base_key = unique(first_key + "@storage")
        base_ptr = first.data_ptr() - (first.storage_offset() - lo) * es
        add_record(base_key, first.detach(), base_ptr, (hi - lo) * es, [hi - lo], [], 0,
                   is_replicated=all(key in replicated_keys for key, _ in members))
        for key, t in members:
            add_record(key, t.detach(), t.data_ptr(), t.numel() * es, t.shape, t.stride(),
                       t.storage_offset() - lo, base_key)

    blob = {
        "version": STRUCTURE_VERSION,
        "state": structure,
        "devices": devices,
        "aliases": aliases,
        "torch_version": torch.__version__,
    }
    try:
        data = pickle.dumps(blob, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        found = _find_unpicklable(structure, ())
        if found is None:
            raise TypeError(f"cannot save state: {e}") from e
        path, err = found
        raise TypeError(f"cannot save {_path_repr(path)}: a {type(_get(state, path)).__name__} "
                        f"cannot be pickled ({err})") from err
    flat.blobs.append((STRUCTURE_BLOB, data))
    flat.structure, flat.blob_meta, flat.aliases = structure, blob, aliases
    return flat


# -- the save plan: what one save learnt, reused by the next ones ------------------------
#
# Training saves the same state over and over: the same keys, the same tensor
# shapes and dtypes, only new bytes (and a few new scalars: a learning rate, a
# step count). flatten() spends ~10 us a tensor finding that out again (keys
# built from paths, records made, the structure pickled). A SavePlan keeps what
# a full flatten() produced for a state whose tensors are each alone on their
# storage, contiguous, non-empty and in host memory; the next save walks the
# state once, compares, and hands the core only new data pointers.
#
# How a change is detected, cheaply: the walk yields the *skeleton* (each
# container's type and keys or length, in walk order, and an OrderedDict's
# attributes such as state_dict()'s _metadata), the tensors, and the other
# leaves, which must be plain values (numbers, strings, bytes, None). The plan
# is reused when the skeleton is equal, every tensor has the dtype, shape, type
# (Tensor or Parameter) and requires_grad it had, is contiguous at storage
# offset 0 in host memory, and no two tensors start at the same address (so
# none shares storage with another: each would otherwise be one entry with
# views). The pickled structure is reused as it is when the plain values are
# equal too (and of the same types); when some changed (a scheduler's new
# learning rate) they are patched into the kept structure and it is pickled
# again. Anything else (Shards, views, CUDA tensors, other objects) takes the
# full flatten(), which makes a new plan when the state qualifies.

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_STRIDED = torch.strided
_PLAIN_VALUES = frozenset((int, float, complex, str, bytes, bool, type(None)))
_PLAIN_DICTS = frozenset((dict, collections.OrderedDict))


def _walk_plain(obj, skel: list, tensors: list, values: list) -> bool:
    """flatten()'s walk order over a state of plain containers, tensors and plain
    values; False at anything else."""
    tp = type(obj)
    if tp in _PLAIN_DICTS:
        skel.append((tp, tuple(obj)))
        if tp is not dict:
            skel.append(obj.__dict__)
        items = obj.values()
    elif tp is list or tp is tuple:
        skel.append((tp, len(obj)))
        items = obj
    elif tp is _Tensor or tp is _Parameter:
        tensors.append(obj)
        return True
    elif tp in _PLAIN_VALUES:
        values.append(obj)
        return True
    else:
        return False
    for v in items:
        tv = type(v)
        if tv is _Tensor or tv is _Parameter:
            tensors.append(v)
        elif tv in _PLAIN_VALUES:
            values.append(v)
        elif not _walk_plain(v, skel, tensors, values):
            return False
    return True


def _walk_state(state):
    """(skeleton, tensors, plain values) of ``state``, or None when it is not all plain."""
    skel: list = []
    tensors: list = []
    values: list = []
    try:
        if not _walk_plain(state, skel, tensors, values):
            return None
    except RecursionError:  # a cycle: the full path names it
        return None
    return skel, tensors, values


def _value_slots(structure, slots: list) -> None:
    """Where each plain value sits in a flattened structure, in walk order:
    (container, key), or None inside a tuple (which cannot be patched)."""
    tp = type(structure)
    if tp in _PLAIN_DICTS or tp is list:
        pairs = structure.items() if tp is not list else enumerate(structure)
        for k, v in pairs:
            tv = type(v)
            if tv in _PLAIN_VALUES:
                slots.append((structure, k))
            elif tv is not _TensorLeaf:
                _value_slots(v, slots)
    elif tp is tuple:
        for v in structure:
            tv = type(v)
            if tv in _PLAIN_VALUES:
                slots.append(None)
            elif tv is not _TensorLeaf:
                _value_slots(v, slots)


class SavePlan:
    """A full flatten() of a state that qualifies (see above), kept for the next saves."""

    __slots__ = ("skel", "metas", "values", "value_types", "slots", "blob_meta", "blob", "native", "nbytes",
                 "replicated")


def plan_of(state: Any, flat: FlatState, replicated=None) -> Optional[SavePlan]:
    """The plan of ``state``, just flattened into ``flat``, or None when it does not qualify."""
    if flat.keepalive or flat.has_cuda or not flat.records or flat.structure is None:
        return None
    walked = _walk_state(state)
    if walked is None:
        return None
    skel, tensors, values = walked
    if len(tensors) != len(flat.records) or flat.aliases:
        return None
    ptrs = set()
    for t, r in zip(tensors, flat.records):
        if (not t.is_cpu or not t.is_contiguous() or t.storage_offset() != 0 or t.numel() == 0
                or r.storage_key or r.strides or r.global_shape or r.data != t.data_ptr()):
            return None
        ptrs.add(r.data)
    if len(ptrs) != len(tensors):
        return None
    slots: list = []
    _value_slots(flat.structure, slots)
    if len(slots) != len(values):
        return None
    plan = SavePlan()
    plan.skel = copy.deepcopy(skel)
    plan.metas = [(type(t), t.dtype, t.shape, t.requires_grad) for t in tensors]
    plan.values = list(values)
    plan.value_types = [type(v) for v in values]
    plan.slots = slots
    plan.blob_meta = flat.blob_meta
    plan.blob = flat.blobs
    plan.native = _native.load().SavePlan(flat.records)
    plan.nbytes = flat.nbytes
    plan.replicated = replicated
    return plan


def flatten_planned(state: Any, plan: SavePlan) -> Optional[FlatState]:
    """``state`` through ``plan`` (``flat.data``: the new data pointers, in the plan's
    record order), or None when it changed in a way the plan cannot follow."""
    walked = _walk_state(state)
    if walked is None:
        return None
    skel, tensors, values = walked
    metas = plan.metas
    if len(tensors) != len(metas) or skel != plan.skel:
        return None
    ptrs = []
    append = ptrs.append
    for t, (tp, dt, shape, rg) in zip(tensors, metas):
        if (type(t) is not tp or t.dtype is not dt or t.requires_grad is not rg or t.shape != shape
                or t.layout is not _STRIDED or not t.is_cpu or not t.is_contiguous() or t.storage_offset()):
            return None
        append(t.data_ptr())
    if len(set(ptrs)) != len(ptrs):
        return None
    if len(values) != len(plan.values):
        return None
    if values != plan.values or [type(v) for v in values] != plan.value_types:
        changed = [i for i, (a, b) in enumerate(zip(values, plan.values)) if a != b or type(a) is not type(b)]
        if any(plan.slots[i] is None for i in changed):
            return None  # a value inside a tuple: the full path rebuilds the structure
        for i in changed:
            container, key = plan.slots[i]
            container[key] = values[i]
        plan.values = list(values)
        plan.value_types = [type(v) for v in values]
        plan.blob = [(STRUCTURE_BLOB, pickle.dumps(plan.blob_meta, protocol=pickle.HIGHEST_PROTOCOL))]
    flat = FlatState()
    flat.blobs = plan.blob
    flat.nbytes = plan.nbytes
    flat.data = ptrs
    return flat


def _get(state, path):
    for p in path:
        state = state[p]
    return state


def _contiguous_strides(shape) -> List[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return list(reversed(strides))


def _resolve_device(saved: str, map_location) -> torch.device:
    if map_location is None:
        return torch.device(saved)
    if isinstance(map_location, dict):
        return torch.device(map_location.get(saved, saved))
    if callable(map_location):
        return torch.device(map_location(saved))
    return torch.device(map_location)


def tensors_from_snapshot(snapshot, devices: Dict[str, str], map_location=None) -> Dict[str, torch.Tensor]:
    """Wraps every entry of a core snapshot as a tensor without a copy (CPU targets)."""
    infos = snapshot.tensors
    flats: Dict[str, torch.Tensor] = {}
    out: Dict[str, torch.Tensor] = {}

    def flat_of(info) -> torch.Tensor:
        key = info["key"]
        t = flats.get(key)
        if t is not None:
            return t
        dtype = dtype_from_name(info["dtype"])
        es = info["element_size"] or torch.empty((), dtype=dtype).element_size()
        count = info["nbytes"] // es
        if count == 0 or info["offset"] is None:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(snapshot, dtype=dtype, count=count, offset=info["offset"])
        target = _resolve_device(devices.get(key, "cpu"), map_location)
        if target.type != "cpu":
            t = t.to(target)
        flats[key] = t
        return t

    by_key = {i["key"]: i for i in infos}
    for info in infos:
        if info["storage_key"]:
            base_info = by_key.get(info["storage_key"])
            if base_info is None:
                raise KeyError(f"tensor {info['key']!r} is a view of missing entry "
                               f"{info['storage_key']!r}")
            base = flat_of(base_info)
            dtype = dtype_from_name(info["dtype"])
            if base.dtype != dtype:
                base = base.view(dtype)
        else:
            base = flat_of(info)
        shape = list(info["shape"])
        if info["storage_key"] or info["strides"]:
            strides = list(info["strides"]) or _contiguous_strides(shape)
            if math.prod(shape) == 0:
                out[info["key"]] = torch.empty(shape, dtype=base.dtype, device=base.device)
            else:
                out[info["key"]] = base.as_strided(shape, strides, info["storage_offset"])
        else:
            out[info["key"]] = base.view(shape)
    return out


def unflatten(snapshot, map_location=None) -> Any:
    """The state saved in a core snapshot, with tensors in place of placeholders."""
    blobs = snapshot.blobs
    raw = blobs.get(STRUCTURE_BLOB)
    if raw is None:
        # Saved by another front end (C++): a flat dict of tensors and raw blobs.
        tensors = tensors_from_snapshot(snapshot, {}, map_location)
        out: Dict[str, Any] = dict(tensors)
        out.update({k: v for k, v in blobs.items()})
        return out
    meta = pickle.loads(raw)
    if meta.get("version", 0) > STRUCTURE_VERSION:
        from .errors import FailedPreconditionError

        raise FailedPreconditionError(
            f"step {snapshot.step} was written by a newer flashckpt (structure version "
            f"{meta.get('version')}, this one reads {STRUCTURE_VERSION})")
    tensors = tensors_from_snapshot(snapshot, meta.get("devices", {}), map_location)
    return restore_structure(meta, tensors)


def restore_structure(meta: dict, tensors: Dict[str, torch.Tensor]) -> Any:
    """The saved structure of ``meta`` (the unpickled structure blob) with the
    tensor of each entry key from ``tensors`` in place of its placeholder."""
    aliases = meta.get("aliases", {})

    def tensor_for(leaf: _TensorLeaf) -> torch.Tensor:
        key = aliases.get(leaf.key, leaf.key)
        t = tensors[key]
        if leaf.parameter:
            t = torch.nn.Parameter(t, requires_grad=leaf.requires_grad)
            tensors[key] = t
        elif leaf.requires_grad and t.is_floating_point():
            t.requires_grad_(True)
        return t

    def leaf(obj):
        if isinstance(obj, _TensorLeaf):
            return tensor_for(obj)
        if isinstance(obj, Shard):
            placeholder = obj.tensor
            obj.tensor = tensor_for(placeholder)
            obj._key = placeholder.key
        return obj

    return map_state(meta["state"], leaf)


def map_state(obj, fn):
    """``obj`` with ``fn`` applied to every value that is not a dict, list or
    tuple (a Shard is a value); dicts and lists are changed in place, tuples
    (namedtuples too) rebuilt."""
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = map_state(obj[k], fn)
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = map_state(v, fn)
        return obj
    if isinstance(obj, tuple):
        items = [map_state(v, fn) for v in obj]
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return tuple(items) if type(obj) is tuple else type(obj)(items)
    return fn(obj)


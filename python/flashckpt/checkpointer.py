"""The Python Checkpointer: nested training state in, snapshot in shared memory,
persisted in the background by the C++ core."""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from . import _logging, _native, _state
from ._heartbeat import heartbeat
from .errors import (DeadlineExceededError, FailedPreconditionError, InvalidArgumentError,
                     NotFoundError, PermissionDeniedError, StateDictMismatchError)

# (real directory, rank) of every open Checkpointer of this process: a second
# writer on the same files would corrupt the first one's steps.
_open_lock = threading.Lock()
_open: Dict[tuple, "weakref.ref[Checkpointer]"] = {}
_all: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


@atexit.register
def _close_all_at_exit():
    # A persist that failed and was never reported must not vanish with the
    # interpreter: said at error level, with what is left on storage.
    for c in list(_all):
        try:
            c.close()
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            _logging.logger.error(
                "flashckpt: at exit, the Checkpointer on %r (rank %d) could not make every "
                "snapshot durable: %s: %s", c.directory, c.rank, type(e).__name__, e)


_MAX_STEP = 2**63 - 1


def _check_step(step, what: str, optional: bool = False):
    """A step is a plain non-negative integer (int or an integer tensor/NumPy
    scalar); bool, float and out-of-range values are refused, naming them."""
    if step is None and optional:
        return None
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise InvalidArgumentError(
            f"{what}: step must be a non-negative integer, got {step!r} ({type(step).__name__})"
            + ("; use int(step) if you mean it" if isinstance(step, float) and float(step).is_integer() else ""))
    try:
        value = step.__index__()
    except TypeError as e:  # e.g. a float tensor
        raise InvalidArgumentError(f"{what}: step must be a non-negative integer, got {step!r} ({e})") from None
    if value < 0 or value > _MAX_STEP:
        raise InvalidArgumentError(f"{what}: step must be within 0..2**63-1, got {value}")
    return value


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized():
        return dist
    return None


class SaveHandle:
    """The result of ``Checkpointer.save``.

    ``wait()`` blocks until the step is durable (data and COMMIT on storage);
    ``fence()`` until the bytes are in memory (needed only after
    ``blocking=False``, before the saved tensors change).
    """

    def __init__(self, core_handle, keepalive: List[torch.Tensor], nbytes: int, step: int,
                 blocking: bool):
        self._h = core_handle
        self._keepalive = keepalive
        self._snapshotted = blocking
        self.nbytes = nbytes
        self.step = step

    def fence(self) -> None:
        if not self._snapshotted:
            self._h.wait_snapshot()
            self._snapshotted = True
            self._keepalive = []

    wait_snapshot = fence

    def wait(self, timeout: Optional[float] = None) -> None:
        """Blocks until durable; raises DeadlineExceededError after ``timeout`` seconds."""
        self.fence()
        if not self._h.wait_durable(timeout):
            raise DeadlineExceededError(
                f"step {self.step} not durable after {timeout:.1f} s")

    def done(self) -> bool:
        """True once the step is durable (False while pending or when skipped)."""
        return self._h.persisted()

    def __repr__(self):
        return f"<flashckpt.SaveHandle step={self.step} bytes={self.nbytes}>"


@dataclass
class LoadInfo:
    step: int
    source: str  # "memory" or "storage"
    nbytes: int
    seconds: float


@dataclass
class LoadResult:
    """What ``load_into`` did."""

    step: int
    state: Any  # the whole loaded structure (for the entries load_into did not consume)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)

    def __getitem__(self, key):
        return self.state[key]


class Checkpointer:
    """Saves nested training state to shared memory and persists it in the background.

    Args:
      directory: the checkpoint directory (created if missing). All ranks of
        one job use the same directory.
      keep_last: committed steps kept on storage (0: all).
      persist_every: persist every N-th save; the others stay in memory only.
      rank, world_size: default to ``torch.distributed`` when it is initialized,
        else to ``$RANK``/``$WORLD_SIZE``, else 0 and 1.
      run_id: names the shared-memory segment (with the directory and rank);
        default ``$FLASHCKPT_RUN_ID`` or "local". A restarted process with the
        same directory and run_id finds the snapshots its predecessor left.
      num_slots: snapshots kept in memory per rank (>= 2; default 3 under flashrun, else 2).
      reserve_bytes: allocate and touch the slots up front (first save as fast
        as later ones).
      persist: False keeps snapshots in memory only.
      commit_timeout: seconds rank 0 waits for other ranks before failing a commit.
      process_group: the group ``load()`` agrees on a step in (default: WORLD).
      replicated: state that is the same on every rank (data parallelism):
        the top-level keys of the saved state whose tensors are replicated,
        e.g. ``("model", "optimizer")`` for DDP, or True for every tensor.
        Storage keeps one copy of them per step, each rank writing about
        1/world_size of it; each rank's memory snapshot still holds all of
        its state, and every rank reads all of it back (also into another
        world size). Ranks whose replicated tensors differ fail that step's
        commit, naming the key and the ranks. Default: nothing replicated
        (each rank stores its whole state).
      Any other keyword is passed to the core (``copy_threads``, ``use_io_uring``,
      ``use_direct_io``, ``io_chunk_bytes``, ``io_queue_depth``, ``shm_dir``,
      ``reserve_in_background``, ``unlink_memory_on_close``, ``reuse_memory``).
    """

    def __init__(self, directory, *, keep_last: int = 3, persist_every: int = 1,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 run_id: Optional[str] = None, num_slots: Optional[int] = None, reserve_bytes: int = 0,
                 persist: bool = True, commit_timeout: float = 600.0, process_group=None,
                 replicated=None, **core_options):
        directory = os.fspath(directory)
        dist = _dist()
        if rank is None:
            rank = dist.get_rank() if dist else int(os.environ.get("RANK", 0))
        if world_size is None:
            world_size = dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank {rank} is not in [0, world_size={world_size})")
        if keep_last < 0 or persist_every < 1:
            raise InvalidArgumentError(
                f"keep_last must be >= 0 and persist_every >= 1 (got {keep_last}, {persist_every})")
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise InvalidArgumentError(
                f"checkpoint directory {directory!r} exists and is not a directory")
        if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionDeniedError(
                f"checkpoint directory {directory!r} is not writable by this user "
                f"(uid {os.geteuid()})")
        if replicated is not None and replicated is not True and replicated is not False:
            if isinstance(replicated, (str, bytes)):
                replicated = (replicated,)
            try:
                replicated = frozenset(replicated)
            except TypeError:
                raise InvalidArgumentError(
                    f"replicated must be True, False or a collection of top-level state keys "
                    f"(got {replicated!r})") from None
        self._replicated = replicated or None
        self._plan: Optional[_state.SavePlan] = None  # the last save's layout, reused while it holds
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        self._group = process_group
        self._lock = threading.RLock()
        self._pending: Optional[SaveHandle] = None
        self._resume: Optional[int] = None  # restorable_step()'s answer, for the next load without a step
        self._closed = False
        self.last_load: Optional[LoadInfo] = None

        key = (os.path.realpath(directory), rank)
        with _open_lock:
            other = _open.get(key)
            if other is not None and other() is not None and not other()._closed:
                raise FailedPreconditionError(
                    f"checkpoint directory {directory!r} (rank {rank}) is already open by another "
                    "flashckpt.Checkpointer in this process; close() it first")
            _open[key] = weakref.ref(self)
        self._open_key = key
        try:
            self._core = _native.load().Checkpointer(
                directory, rank=rank, world_size=world_size,
                run_id=run_id or "", num_slots=num_slots or 0,
                reserve_bytes=reserve_bytes, persist=persist, persist_every=persist_every,
                keep_last=keep_last, commit_timeout_s=float(commit_timeout), **core_options)
        except BaseException:
            with _open_lock:
                _open.pop(key, None)
            raise
        _all.add(self)

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending persists, then releases the directory. The shared-memory
        segment is unlinked when the newest snapshot is durable."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._pending is not None:
                    self._pending.fence()
                    self._pending = None
                self._core.close()
            finally:
                self._closed = True
                with _open_lock:
                    ref = _open.get(self._open_key)
                    if ref is not None and ref() is self:
                        del _open[self._open_key]
                _all.discard(self)

    def unlink_memory(self) -> None:
        """Drops the shared-memory segment now (its snapshots are lost)."""
        with self._lock:
            self._core.unlink_memory()

    @property
    def persist_failures(self) -> int:
        """Persists that failed since this Checkpointer was opened."""
        return self._core.persist_failures

    @property
    def memory_segment_path(self) -> str:
        return self._core.memory_segment_path()

    def _check_open(self):
        if self._closed:
            raise FailedPreconditionError(f"Checkpointer on {self.directory!r} is closed")

    # -- save --------------------------------------------------------------
    def save(self, step: int, state: Any, *, blocking: bool = True) -> SaveHandle:
        """Snapshots ``state`` (any nesting of dicts, lists, tuples, tensors and
        picklable values) as ``step``.

        Returns once the bytes are in shared memory; persisting goes on in the
        background (``handle.wait()`` blocks until durable). With
        ``blocking=False`` CUDA tensors are copied asynchronously: call
        ``handle.fence()`` (or ``ckpt.fence()``, or ``install_fence``) before the
        tensors change.
        """
        heartbeat()
        step = _check_step(step, "save()")
        with self._lock:
            self._check_open()
            self._resume = None  # training went on: a later load() takes the newest step, not the resumed one
            if self._pending is not None:
                self._pending.fence()
                self._pending = None
            if isinstance(self._replicated, frozenset):
                unknown = sorted(map(str, self._replicated - set(state))) if isinstance(state, dict) else None
                if unknown is None or unknown:
                    raise InvalidArgumentError(
                        f"save({step}): replicated={sorted(map(str, self._replicated))} names top-level keys of "
                        f"the state, but " + (f"the state is a {type(state).__name__}, not a dict" if unknown is None
                                              else f"{unknown} are not among its keys {sorted(map(str, state))}"))
            flat = _state.flatten_planned(state, self._plan) if self._plan is not None else None
            if flat is None:
                flat = _state.flatten(state, replicated=self._replicated)
                self._plan = _state.plan_of(state, flat, self._replicated)
            keepalive = flat.keepalive
            if not blocking:
                keepalive = keepalive + _collect_tensors(state)
            if flat.data is not None:  # the layout of the last save: only new data pointers
                h = self._core.save_planned(step, self._plan.native, flat.data, flat.blobs, blocking=blocking)
            else:
                h = self._core.save(step, flat.records, flat.blobs, blocking=blocking)
            handle = SaveHandle(h, keepalive if not blocking else [], flat.nbytes, step,
                                blocking)
            if not blocking:
                self._pending = handle
            return handle

    def fence(self) -> None:
        """Waits until the last ``save(blocking=False)`` has its bytes in memory."""
        with self._lock:
            if self._pending is not None:
                self._pending.fence()
                self._pending = None

    def wait(self, timeout: Optional[float] = None) -> None:
        """Waits until every started persist finished; raises DeadlineExceededError after
        ``timeout`` seconds (default: the core's wait_timeout), naming what is still pending."""
        with self._lock:
            self.fence()
        self._core.wait_all(timeout)

    wait_all = wait

    # -- queries -----------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        """Newest step loadable by this rank: committed on storage, or newer in memory."""
        with self._lock:
            self._check_open()
            disk = self._core.latest_step()
            mem = self._core.latest_memory_step()
        cands = [s for s in (disk, mem) if s is not None]
        return max(cands) if cands else None

    def latest_committed_step(self) -> Optional[int]:
        with self._lock:
            return self._core.latest_step()

    def latest_memory_step(self) -> Optional[int]:
        with self._lock:
            return self._core.latest_memory_step()

    def steps(self, detail: bool = False):
        """Steps loadable by this rank, ascending (``detail=True``: dicts with
        committed, in_memory, bytes, world_size)."""
        with self._lock:
            self._check_open()
            infos = self._core.steps()
        infos.sort(key=lambda s: s["step"])
        if detail:
            return infos
        return [s["step"] for s in infos if s["committed"] or s["in_memory"]]

    def restorable_step(self) -> Optional[int]:
        """The step this job resumes from, or None to start fresh; the next
        ``load()`` or ``load_into()`` without a step loads it.

        Collective under torch.distributed (every rank calls it, as it calls
        ``load()``), and the same on every rank: under flashrun the step the node
        agents agreed on, else the newest step every rank can load (a ``save()``
        or a load of another step forgets it). Decide
        whether to resume with this, not with ``latest_step()``, which is this
        rank's own view: after a change of world size some ranks may still hold
        the old world's snapshots in memory, and a load that only those ranks
        start waits forever on the others."""
        with self._lock:
            self._check_open()
            agreed = self._take_agreed()
            if agreed is None:
                common, _ = self._common_steps(None)
                agreed = max(common) if common else None
            self._resume = agreed
            return agreed

    # -- load --------------------------------------------------------------
    def _take_agreed(self) -> Optional[int]:
        """$FLASHCKPT_RESTORE_STEP, the first time only (checked against this rank's steps)."""
        agreed = self._core.take_restore_step()
        if agreed is not None and agreed not in self.steps():
            under = "flashrun" if os.environ.get("FLASHCKPT_AGENT_SOCKET") else "no flashrun"
            raise NotFoundError(
                f"FLASHCKPT_RESTORE_STEP={agreed} names a step that {self.directory!r} does not "
                f"hold for rank {self.rank} (loadable: {self.steps()[-5:] or 'none'}; {under}). "
                "flashrun sets this variable for its workers: outside flashrun, unset it "
                "(a value left in the environment by an earlier run?)")
        return agreed

    def _common_steps(self, step: Optional[int]):
        """(the steps every rank of the process group can load, each rank's list): with ``step``,
        ``{step}`` when every rank has it, else empty. Collective; without torch.distributed (or in
        a world of one), this rank's own steps."""
        local = sorted(self.steps()) if step is None else [step]
        dist = _dist()
        if dist is None or dist.get_world_size(self._group) == 1:
            return set(local), [local]
        gathered: List[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(gathered, local, group=self._group)
        common = set(gathered[0])
        for g in gathered[1:]:
            common &= set(g)
        return common, gathered

    def _agree_step(self, step: Optional[int]) -> Optional[int]:
        """With torch.distributed up, the newest step every rank can load.

        Under flashrun the node agents already agreed on it during the
        rendezvous and pass it as ``$FLASHCKPT_RESTORE_STEP``, which the first load
        without a step takes (later loads take the newest step again); after
        ``restorable_step()``, the first load without a step takes its answer."""
        step = _check_step(step, "load()", optional=True)
        if step is not None:
            self._resume = None  # a load of a step the caller chose: restorable_step()'s answer is spent
        else:
            if self._resume is not None:
                agreed, self._resume = self._resume, None
                return agreed
            agreed = self._take_agreed()
            if agreed is not None:
                return agreed
        dist = _dist()
        if dist is None or dist.get_world_size(self._group) == 1:
            return step
        common, gathered = self._common_steps(step)
        if not common:
            if step is not None:
                raise NotFoundError(f"step {step} is not available on every rank")
            raise NotFoundError(
                f"no step of {self.directory!r} is available on every rank "
                f"(per rank: {[g[-3:] if g else [] for g in gathered]})")
        return max(common)

    def load(self, step: Optional[int] = None, *, map_location=None, prefer_memory: bool = True,
             verify: bool = True, allow_fallback: bool = False) -> Any:
        """The state saved at ``step`` (default: the newest step every rank has).

        CPU tensors share one buffer with the loaded snapshot (no copy); tensors
        saved on CUDA come back on their device unless ``map_location`` says
        otherwise (a device, a string, a ``{saved: target}`` dict or a callable
        of the saved device name). ``self.last_load`` says which step and source.
        """
        with self._lock:
            self._check_open()
            self.fence()
            return self._load_agreed(self._agree_step(step), map_location, prefer_memory, verify,
                                     allow_fallback)

    def _load_agreed(self, step, map_location=None, prefer_memory=True, verify=True, allow_fallback=False):
        """load() of a step the ranks already agreed on (no collective here: every rank
        must call the process group the same number of times, whichever path it takes)."""
        t0 = time.perf_counter()
        snap = self._core.load(step, prefer_memory=prefer_memory, allow_fallback=allow_fallback, verify=verify)
        state = _state.unflatten(snap, map_location)
        self.last_load = LoadInfo(snap.step, snap.source, snap.data_bytes, time.perf_counter() - t0)
        return state

    def load_into(self, model: Optional[torch.nn.Module] = None, optimizer=None,
                  scheduler=None, *, step: Optional[int] = None, strict: bool = True,
                  model_key: str = "model", optimizer_key: str = "optim",
                  scheduler_key: str = "sched", map_location=None,
                  rng_key: Optional[str] = None) -> LoadResult:
        """Loads a step and restores ``model``, ``optimizer`` and ``scheduler`` from
        the entries ``model_key``, ``optimizer_key``, ``scheduler_key``.

        ``strict=True`` raises StateDictMismatchError listing missing, unexpected
        and shape-mismatched keys before changing anything; ``strict=False`` loads
        what matches and reports the rest in the result. ``rng_key``: also
        restore the RNG states saved under that key (see ``rng_state()``).
        """
        if map_location is None and model is not None:
            p = next(iter(model.parameters()), None)
            map_location = p.device if p is not None else None
        with self._lock:
            self._check_open()
            self.fence()
            step = self._agree_step(step)  # the one collective of this call, on every rank
            in_place = self._load_in_place(step, model, optimizer, model_key, optimizer_key, map_location)
            state = in_place if in_place is not None else self._load_agreed(step, map_location)
        result = LoadResult(step=self.last_load.step, state=state)
        if not isinstance(state, dict):
            raise InvalidArgumentError(
                f"step {result.step} holds a {type(state).__name__}, not a dict of entries")
        if optimizer is not None and isinstance(state.get(optimizer_key), dict):
            # Checked before the model changes: a failed load leaves both as they were.
            _check_optimizer_groups(optimizer, state[optimizer_key], result.step, optimizer_key)
        if model is not None:
            if model_key not in state:
                raise StateDictMismatchError(
                    f"step {result.step} has no {model_key!r} entry (entries: {sorted(state)})",
                    missing=[model_key])
            saved = state[model_key]
            own = model.state_dict()
            missing = [k for k in own if k not in saved]
            unexpected = [k for k in saved if k not in own]
            mismatched = [
                f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
                for k in own
                if k in saved and isinstance(saved[k], torch.Tensor)
                and tuple(saved[k].shape) != tuple(own[k].shape)]
            result.missing, result.unexpected, result.mismatched = missing, unexpected, mismatched
            if strict and (missing or unexpected or mismatched):
                lines = [f"cannot load step {result.step} into {type(model).__name__}:"]
                if missing:
                    lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
                if unexpected:
                    lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
                if mismatched:
                    lines.append(f"  mismatched shapes ({len(mismatched)}): {'; '.join(mismatched)}")
                lines.append("  (strict=False loads the matching keys)")
                raise StateDictMismatchError("\n".join(lines), missing, unexpected, mismatched)
            bad = {m.split(":")[0] for m in mismatched}
            saved_ok = {k: v for k, v in saved.items() if k not in bad}
            if in_place is not None:
                pass  # the bytes were copied straight into the model's own tensors
            elif not _adopt_model_state(model, saved_ok):
                model.load_state_dict(saved_ok, strict=False)
        if optimizer is not None:
            if optimizer_key not in state:
                if strict:
                    raise StateDictMismatchError(
                        f"step {result.step} has no {optimizer_key!r} entry", missing=[optimizer_key])
                result.missing.append(optimizer_key)
            else:
                _load_optimizer_state(optimizer, state[optimizer_key])
        if scheduler is not None:
            if scheduler_key not in state:
                if strict:
                    raise StateDictMismatchError(
                        f"step {result.step} has no {scheduler_key!r} entry", missing=[scheduler_key])
                result.missing.append(scheduler_key)
            else:
                scheduler.load_state_dict(state[scheduler_key])
        if rng_key is not None and rng_key in state:
            from .rng import set_rng_state

            set_rng_state(state[rng_key])
        return result

    def _load_in_place(self, step, model, optimizer, model_key, optimizer_key, map_location=None):
        """Copies ``step`` from the memory slot, or from storage, straight into the
        model's own tensors and the optimizer's state (created once where it does not
        exist yet), checksumming as it copies: no fresh buffer of the state's size.

        Tensors on an accelerator are filled host-to-device by that device type's
        backend, from the pinned slot or pinned read buffers, ordered after the
        current stream. Returns the restored structure (the model and optimizer entries
        holding those very tensors), or None when the step's layout asks for the
        general path (views, mismatched targets, a device type without a backend, keys
        that differ: the general path then reports them). Every check runs before a
        byte is copied.
        """
        if model is None and optimizer is None:
            return None
        t0 = time.perf_counter()
        desc = self._core.describe(step, prefer_memory=True)
        raw = desc["blobs"].get(_state.STRUCTURE_BLOB)
        if raw is None:
            return None
        meta = pickle.loads(raw)
        state = meta.get("state")
        if meta.get("version", 0) > _state.STRUCTURE_VERSION or not isinstance(state, dict):
            return None
        aliases = meta.get("aliases", {})  # tensors over the same bytes (tied weights): one entry
        entries = {e["key"]: e for e in desc["tensors"]}
        if any(e["storage_key"] or e["strides"] for e in entries.values()):
            return None
        native = _native.load()
        backed = {"cpu": True}

        def has_backend(device: torch.device) -> bool:
            if device.type not in backed:
                backed[device.type] = bool(native.has_device_backend(device.type))
            return backed[device.type]

        def fits(t, e) -> bool:
            return (isinstance(t, torch.Tensor) and has_backend(t.device) and t.is_contiguous()
                    and str(t.dtype) == e["dtype"] and list(t.shape) == list(e["shape"]))

        dest: Dict[str, torch.Tensor] = {}

        def target(leaf, t) -> bool:
            key = aliases.get(leaf.key, leaf.key)
            if key not in entries or not fits(t, entries[key]):
                return False
            if key in dest:  # tied: the same memory, or the general path
                return dest[key].data_ptr() == t.data_ptr()
            dest[key] = t
            return True

        if model is not None:
            if not _loads_plainly(model):
                return None
            saved = state.get(model_key)
            own = model.state_dict()
            if not isinstance(saved, dict) or set(saved) != set(own):
                return None
            for name, t in own.items():
                leaf = saved[name]
                if not isinstance(leaf, _state._TensorLeaf) or not target(leaf, t):
                    return None
        if optimizer is not None:
            saved_opt = state.get(optimizer_key)
            if not isinstance(saved_opt, dict) or not {"state", "param_groups"} <= set(saved_opt):
                return None
            groups, saved_groups = optimizer.param_groups, saved_opt["param_groups"]
            if len(groups) != len(saved_groups) or any(
                    len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
                return None  # the general path raises torch's own error, before any change
            id_map = dict(zip(itertools.chain.from_iterable(s["params"] for s in saved_groups),
                              itertools.chain.from_iterable(g["params"] for g in groups)))
            for pid, pstate in saved_opt["state"].items():
                param = id_map.get(pid)
                if param is None or not isinstance(pstate, dict):
                    return None
                current = optimizer.state.get(param, {})
                for name, leaf in pstate.items():
                    if isinstance(leaf, _state._TensorLeaf):
                        e = entries.get(aliases.get(leaf.key, leaf.key))
                        if e is None:
                            return None
                        t = current.get(name)
                        # State a fresh process does not have yet is created once, then
                        # filled: on the parameter's device ("step" on the CPU, as torch
                        # keeps it unless the group is capturable or fused).
                        if not fits(t, e):
                            on = torch.device("cpu") if name == "step" else param.device
                            t = torch.empty(e["shape"], dtype=_state.dtype_from_name(e["dtype"]), device=on)
                        if not target(leaf, t):
                            return None
        claimed = set(dest)
        for key, e in entries.items():  # the other entries: small, into new tensors
            if key not in dest:
                dest[key] = torch.empty(e["shape"], dtype=_state.dtype_from_name(e["dtype"]))
        target = native.LoadTarget
        records = {k: target(data=t.data_ptr(), nbytes=t.numel() * t.element_size(), dtype=str(t.dtype),
                             shape=list(t.shape), device_type=t.device.type, device=_state._device_index(t),
                             stream=_current_stream(t.device))
                   for k, t in dest.items()}
        loaded, _, source = self._core.load_into(records, step=desc["step"], prefer_memory=True)
        self.last_load = LoadInfo(loaded, source, sum(r.nbytes for r in records.values()),
                                  time.perf_counter() - t0)
        if map_location is not None and torch.device(map_location).type != "cpu":
            # The entries outside the model and optimizer land on the CPU; place them
            # where the general path would have.
            for key, e in entries.items():
                if dest[key].device.type == "cpu" and key not in claimed:
                    dest[key] = dest[key].to(map_location)
        return _state.restore_structure(meta, dest)

    def __repr__(self):
        return (f"<flashckpt.Checkpointer {self.directory!r} rank={self.rank}/"
                f"{self.world_size}{' closed' if self._closed else ''}>")


def _current_stream(device: torch.device) -> int:
    """The handle of the current stream on ``device`` (0: none, or the CPU)."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def _loads_plainly(model: torch.nn.Module) -> bool:
    """True when ``load_state_dict`` would only copy tensors into the module's
    parameters and buffers: no module has its own ``_load_from_state_dict`` or
    load hooks (those must run, so such models load through load_state_dict)."""
    base = torch.nn.Module._load_from_state_dict
    for _, m in model.named_modules():
        if type(m)._load_from_state_dict is not base or getattr(m, "_load_state_dict_pre_hooks", None) \
                or getattr(m, "_load_state_dict_post_hooks", None):
            return False
    return True


def _adopt_model_state(model: torch.nn.Module, saved) -> bool:
    """Makes the model's parameters and buffers use the loaded tensors' memory
    instead of copying into their own (``load_state_dict`` would copy).

    The tensors ``load()`` returns are private to that call, so handing them
    over is safe, and it saves a copy of the model's size into the model's
    memory (page faults included, for a model built with ``skip_init`` or on
    the meta-free path). The Parameter objects stay the same (optimizers keep
    referring to them). Only for plain modules: any module with its own
    ``_load_from_state_dict`` or load hooks, a tensor of another dtype,
    device or shape, or a non-contiguous one makes this return False, and
    ``load_state_dict`` is used as usual.
    """
    if not _loads_plainly(model):
        return False
    targets = {}
    for prefix, m in model.named_modules():
        pre = prefix + "." if prefix else ""
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and (name not in getattr(m, "_non_persistent_buffers_set", ())):
                targets[pre + name] = t
    for k, t in targets.items():
        v = saved.get(k)
        if v is None:
            continue
        if (not isinstance(v, torch.Tensor) or v.dtype != t.dtype or v.device != t.device
                or tuple(v.shape) != tuple(t.shape) or not v.is_contiguous()):
            return False
    with torch.no_grad():
        for k, t in targets.items():
            if k in saved:
                t.data = saved[k]
    return True


def _check_optimizer_groups(optimizer, optim_state, step, key) -> None:
    """Raises StateDictMismatchError when the saved optimizer state cannot belong to
    ``optimizer`` (other number of param groups, or of parameters in a group)."""
    saved = optim_state.get("param_groups")
    if not isinstance(saved, list):
        raise StateDictMismatchError(f"step {step}: {key!r} is not an optimizer state dict (no param_groups)",
                                     mismatched=[key])
    mine = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", ())) for g in saved]
    if mine != theirs:
        raise StateDictMismatchError(
            f"cannot load step {step} into {type(optimizer).__name__}: the checkpoint's {key!r} has "
            f"{len(theirs)} param group(s) of {theirs} parameters, the optimizer {len(mine)} of {mine} "
            "(nothing was changed)", mismatched=[key])


def _load_optimizer_state(optimizer, optim_state) -> None:
    """``optimizer.load_state_dict`` without copying the state's tensors.

    The tensors ``load()`` returns are private to this call (they live in the
    loaded snapshot's buffer), so copying them buys nothing; PyTorch 1.13's
    ``load_state_dict`` deep-copies the whole state dict (twice the model's
    size for Adam). So the optimizer loads the param groups alone (its own
    checks and hooks run, hyperparameters are set), and the per-parameter
    state is handed over the way ``load_state_dict`` maps it: saved ids to
    parameters in group order, tensors cast to the parameter's dtype and
    device ("step" left as saved unless the group is capturable or fused).
    No torch global is touched.
    """
    import itertools

    saved_groups = optim_state["param_groups"]
    optimizer.load_state_dict({"state": {}, "param_groups": saved_groups})
    id_map = dict(zip(itertools.chain.from_iterable(g["params"] for g in saved_groups),
                      itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def cast(param, value, key=None):
        if isinstance(value, torch.Tensor):
            if key == "step":
                g = group_of.get(id(param), {})
                if g.get("capturable") or g.get("fused"):
                    return value.to(dtype=torch.float32, device=param.device)
                return value
            if param.is_floating_point() and value.is_floating_point():
                value = value.to(param.dtype)
            return value.to(param.device)
        if isinstance(value, dict):
            return {k: cast(param, v, key=k) for k, v in value.items()}
        return value

    for k, v in optim_state["state"].items():
        param = id_map.get(k)
        if param is None:
            optimizer.state[k] = v
        else:
            optimizer.state[param] = cast(param, v)


def _collect_tensors(state) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(state)
    return out


class _FenceHandle:
    def __init__(self, removers):
        self._removers = removers

    def remove(self):
        for r in self._removers:
            r()
        self._removers = []


def install_fence(optimizer, ckpt: Checkpointer, model: Optional[torch.nn.Module] = None):
    """Calls ``ckpt.fence()`` before every ``optimizer.step()`` (and, with ``model``,
    before every forward, which may update buffers such as BatchNorm statistics),
    so that ``save(..., blocking=False)`` never snapshots half-updated tensors.

    Uses ``Optimizer.register_step_pre_hook`` where PyTorch has it (2.0+), else
    wraps this optimizer's ``step``. Returns a handle with ``remove()``.
    """
    removers = []
    if hasattr(optimizer, "register_step_pre_hook"):
        h = optimizer.register_step_pre_hook(lambda opt, args, kwargs: ckpt.fence())
        removers.append(h.remove)
    else:
        original = optimizer.step

        def step(*args, **kwargs):
            ckpt.fence()
            return original(*args, **kwargs)

        optimizer.step = step

        def restore():
            if optimizer.__dict__.get("step") is step:
                del optimizer.__dict__["step"]

        removers.append(restore)
    if model is not None:
        h = model.register_forward_pre_hook(lambda mod, inp: ckpt.fence())
        removers.append(h.remove)
    return _FenceHandle(removers)

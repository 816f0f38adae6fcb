"""The flashckpt command: inspect, verify and export checkpoint directories.

    flashckpt ls DIR                 steps, sizes, ranks, committed or not
    flashckpt ls DIR STEP            a step's world size and tensors, stored once or per rank
    flashckpt verify DIR [STEP]      crc32c check of every tensor of every rank
    flashckpt export DIR STEP OUT.pt a file any PyTorch user can torch.load

All three only read: they take no lock, write no file, remove nothing (not even
the leftovers of a crashed save) and use no shared memory, so they work on a
read-only directory and beside a job that is writing to it. ``verify`` and
``export`` read committed steps through the core (io_uring, crc32c of every
tensor); ``ls`` reads the files alone.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import time
from typing import List, Optional

_STEP_RE = re.compile(r"^step-(\d+)$")
_RANK_RE = re.compile(r"^rank-(\d+)\.data$")
_REPLICA_RE = re.compile(r"^rank-(\d+)\.replica$")
_RECORD_MAGIC = b"FCKREC01"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _commit_ok(path: str) -> bool:
    """COMMIT present and framed whole (the core also checks its crc32c)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    if len(data) < 28 or not data.startswith(_RECORD_MAGIC):
        return False
    (length,) = struct.unpack_from("<Q", data, 16)
    return len(data) == 28 + length


def scan(directory: str) -> List[dict]:
    """Every step directory of ``directory``, ascending, from the files alone."""
    out = []
    for name in os.listdir(directory):
        m = _STEP_RE.match(name)
        path = os.path.join(directory, name)
        if not m or not os.path.isdir(path):
            continue
        ranks, size, data, replica = [], 0, {}, 0
        for f in os.listdir(path):
            try:
                n = os.path.getsize(os.path.join(path, f))
            except OSError:
                continue
            size += n
            rm = _RANK_RE.match(f)
            if rm:
                ranks.append(int(rm.group(1)))
                data[int(rm.group(1))] = n
            elif _REPLICA_RE.match(f):
                replica += n
        durable = sorted(int(f.split("-")[1].split(".")[0]) for f in os.listdir(path)
                         if f.startswith("rank-") and f.endswith(".durable"))
        out.append({"step": int(m.group(1)), "path": path, "ranks": sorted(ranks),
                    "durable_ranks": durable, "bytes": size, "data_bytes": sum(data.values()),
                    "rank_data_bytes": data, "replicated_bytes": replica,
                    "committed": _commit_ok(os.path.join(path, "COMMIT"))})
    out.sort(key=lambda s: s["step"])
    return out


def _ranks_repr(ranks: List[int]) -> str:
    if not ranks:
        return "-"
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def cmd_ls_step(d: str, step: int, rank: int) -> int:
    """One committed step: its world and the tensors of one rank, how each is stored."""
    from . import _native
    from .errors import FlashCkptError

    listing = {s["step"]: s for s in scan(d)}
    if step not in listing:
        print(f"flashckpt ls: {d}: no step {step} (steps: {sorted(listing) or 'none'})", file=sys.stderr)
        return 1
    s = listing[step]
    world = (max(s["ranks"]) + 1) if s["ranks"] else 1
    try:
        desc = _native.load().describe_committed_step(d, step, rank, world)
    except FlashCkptError as e:
        print(f"flashckpt ls: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    tensors = [t for t in desc["tensors"] if not t["storage_key"]]
    total = sum(t["nbytes"] for t in tensors)
    rep = sum(t["nbytes"] for t in tensors if t["replicated"])
    print(f"step {step}: world size {world}, {len(desc['tensors'])} tensors of rank {rank} "
          f"({_human(total)}; {_human(rep)} replicated, stored once over the ranks), "
          f"{_human(s['bytes'])} on storage")
    print(f"{'KEY':<40}  {'DTYPE':<16}  {'SHAPE':<18}  {'SIZE':>10}  STORED")
    for t in desc["tensors"]:
        shape = "[" + ",".join(map(str, t["shape"])) + "]"
        stored = f"view of {t['storage_key']}" if t["storage_key"] else (
            "once (replicated)" if t["replicated"] else f"rank {rank}")
        if t.get("global_shape"):
            box = ", ".join(f"{o}:{o + n}" for o, n in zip(t["global_offset"], t["shape"]))
            stored = f"rank {rank}: shard [{box}] of [{','.join(map(str, t['global_shape']))}]"
        print(f"{t['key']:<40}  {t['dtype']:<16}  {shape:<18}  {_human(t['nbytes']):>10}  {stored}")
    return 0


def cmd_ls(args) -> int:
    d = args.directory
    if not os.path.isdir(d):
        print(f"flashckpt ls: {d}: not a directory", file=sys.stderr)
        return 2
    if args.step is not None:
        return cmd_ls_step(d, args.step, args.rank)
    steps = scan(d)
    # The newest step is the highest committed step number, as load() and
    # retention count (the `latest` file names the same step).
    committed = [s["step"] for s in steps if s["committed"]]
    latest = max(committed) if committed else None
    if not steps:
        print(f"{d}: no steps")
        return 0
    print(f"{'STEP':>10}  {'SIZE':>10}  {'RANKS':<10}  STATE")
    for s in steps:
        state = "committed" if s["committed"] else (
            f"incomplete ({len(s['durable_ranks'])} rank(s) durable)")
        if s["step"] == latest:
            state += "  <- latest"
        print(f"{s['step']:>10}  {_human(s['bytes']):>10}  {_ranks_repr(s['ranks']):<10}  {state}")
    return 0


class _Progress:
    def __init__(self, total_bytes: int, stream=None):
        self.total = max(total_bytes, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = self.stream.isatty()

    def update(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        frac = min(self.done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        line = f"[{bar}] {frac * 100:5.1f}%  {_human(self.done)}/{_human(self.total)}  " \
               f"{_human(rate)}/s  {label}"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _read(directory: str, step: int, rank: int, world_size: int):
    """Committed ``step`` of ``rank``, checked, without opening the directory for writing."""
    from . import _native

    return _native.load().read_committed_step(directory, step, rank, world_size, verify=True)


def _rank_read_bytes(s: dict, rank: int) -> int:
    """What verifying one rank of a step reads: its own data and every replica share."""
    return s["rank_data_bytes"].get(rank, 0) + s["replicated_bytes"]


def cmd_verify(args) -> int:
    from .errors import FlashCkptError

    d = args.directory
    if not os.path.isdir(d):
        print(f"flashckpt verify: {d}: not a directory", file=sys.stderr)
        return 2
    steps = scan(d)
    if args.step is not None:
        steps = [s for s in steps if s["step"] == args.step]
        if not steps:
            print(f"flashckpt verify: {d}: no step {args.step}", file=sys.stderr)
            return 1
    else:
        steps = [s for s in steps if s["committed"]]
        if not steps:
            print(f"flashckpt verify: {d}: no committed step", file=sys.stderr)
            return 1
    def world_of(s):
        return (max(s["ranks"]) + 1) if s["ranks"] else 1

    bar = _Progress(sum(_rank_read_bytes(s, r) for s in steps for r in range(world_of(s))))
    failures = []
    for s in steps:
        if not s["committed"]:
            failures.append(f"step {s['step']}: not committed")
        world = world_of(s)
        for r in range(world):
            try:
                del_snap = _read(d, s["step"], r, world)
                del del_snap
            except FlashCkptError as e:
                failures.append(f"step {s['step']} rank {r}: {type(e).__name__}: {e}")
            bar.update(_rank_read_bytes(s, r), f"step {s['step']} rank {r}")
    bar.finish()
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    if failures:
        return 1
    print(f"OK: {len(steps)} step(s) verified in {d}")
    return 0


def _consolidated(d: str, step: int, state):
    """``state`` with every ``flashckpt.Shard`` replaced by its whole global
    tensor, assembled from the saved shards of all ranks (each chunk crc-checked)."""
    import torch

    from . import _native, _state, resharding

    shards = {}

    def find(obj):
        if isinstance(obj, _state.Shard):
            shards[obj._key] = obj
        return obj

    _state.map_state(state, find)
    if not shards:
        return state
    whole = {k: torch.empty(sh.global_shape, dtype=sh.tensor.dtype) for k, sh in shards.items()}
    _native.load().read_global_into(d, step, {k: resharding._target(t) for k, t in whole.items()})
    return _state.map_state(state, lambda obj: whole[obj._key] if isinstance(obj, _state.Shard) else obj)


def cmd_export(args) -> int:
    import torch

    from . import _state
    from .errors import FlashCkptError

    d = args.directory
    if not os.path.isdir(d):
        print(f"flashckpt export: {d}: not a directory", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        print(f"flashckpt export: cannot write {args.out}: directory {out_dir} does not exist",
              file=sys.stderr)
        return 2
    if os.path.isdir(args.out):
        print(f"flashckpt export: cannot write {args.out}: it is a directory (give a file name)",
              file=sys.stderr)
        return 2
    listing = {s["step"]: s for s in scan(d)}
    world = (max(listing[args.step]["ranks"]) + 1) if args.step in listing and \
        listing[args.step]["ranks"] else max(args.rank + 1, 1)
    try:
        snap = _read(d, args.step, args.rank, world)
        state = _consolidated(d, args.step, _state.unflatten(snap, map_location="cpu"))
        tmp = f"{args.out}.tmp-{os.getpid()}"
        try:
            torch.save(state, tmp)
            os.replace(tmp, args.out)  # never a half-written OUT.pt
        except (OSError, RuntimeError) as e:
            print(f"flashckpt export: cannot write {args.out}: {e}", file=sys.stderr)
            return 1
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except FlashCkptError as e:
        print(f"flashckpt export: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote step {args.step} rank {args.rank} of {d} to {args.out} "
          f"({_human(os.path.getsize(args.out))})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashckpt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    ls = sub.add_parser("ls", help="list steps: size, ranks, committed or not; or one step's tensors",
                        description="List the steps of a checkpoint directory; with STEP, that "
                                    "step's world size and tensors (key, dtype, shape, size, stored "
                                    "once or per rank). Reads only.")
    ls.add_argument("directory", metavar="DIR")
    ls.add_argument("step", metavar="STEP", type=int, nargs="?")
    ls.add_argument("--rank", type=int, default=0, help="whose tensors STEP lists (default 0)")
    ls.set_defaults(func=cmd_ls)
    v = sub.add_parser("verify", help="check the crc32c of every tensor",
                       description="Read every rank's data of STEP (default: every committed "
                                   "step) from storage and check each tensor's crc32c. "
                                   "Reads only: a read-only directory is fine.")
    v.add_argument("directory", metavar="DIR")
    v.add_argument("step", metavar="STEP", type=int, nargs="?")
    v.set_defaults(func=cmd_verify)
    e = sub.add_parser("export", help="write a step as a torch.load-able file",
                       description="Write one rank's state of STEP as a file that torch.load "
                                   "reads without flashckpt (tensors on CPU); each sharded tensor "
                                   "(flashckpt.Shard) is written whole, assembled from every "
                                   "rank's shards.")
    e.add_argument("directory", metavar="DIR")
    e.add_argument("step", metavar="STEP", type=int)
    e.add_argument("out", metavar="OUT.pt")
    e.add_argument("--rank", type=int, default=0, help="which rank's state (default 0)")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # `flashckpt ls DIR | head`: the reader is gone; no traceback, and no
        # second error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

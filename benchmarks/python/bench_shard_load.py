"""Sharded state loaded into another world size and layout: a 1 GiB float32
matrix saved as 4 row blocks (flashckpt.Shard, one per rank, 256 MiB each), then
loaded by each rank of worlds of 2 and 3 (rows) and of 2 (columns) with
``flashckpt.load_resharded``, one rank at a time, beside ``dd iflag=direct``
reading the same chunk files (each chunk a rank's box meets is read whole, for
its crc32c) — the sequential O_DIRECT read of the bytes the rank needs. The
destination tensors exist and are touched before the timed load, as a resumed
job's are; filling fresh ones is timed apart.

    /usr/bin/python3 benchmarks/python/bench_shard_load.py            # 1 GiB, 3 repeats
    /usr/bin/python3 benchmarks/python/bench_shard_load.py --gib 0.25 --repeats 2

The save runs the four ranks' Checkpointers in this one process (explicit
rank and world size, standalone persistence). Writes
benchmarks/results/shard_load.json (every run, medians, ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "python"))
RESULTS = os.path.join(REPO, "benchmarks", "results")

import torch  # noqa: E402

import flashckpt  # noqa: E402

COLS = 4096
SAVED_WORLD = 4


def boxes(layout, world, rows):
    if layout == "rows":
        n = rows // world
        return [((r * n, 0), (n if r < world - 1 else rows - r * n, COLS)) for r in range(world)]
    n = COLS // world
    return [((0, r * n), (rows, n)) for r in range(world)]


def dd_seconds(paths):
    t = time.perf_counter()
    for p in paths:
        subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=8M", "iflag=direct", "status=none"], check=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir in /var/tmp)")
    args = ap.parse_args()
    rows = int(args.gib * (1 << 30)) // (COLS * 4) // 12 * 12
    root = tempfile.mkdtemp(prefix="flashckpt-bench-shard-", dir=args.dir or "/var/tmp")
    d = os.path.join(root, "ckpt")
    try:
        g = torch.Generator().manual_seed(3)
        full = torch.empty(rows, COLS)
        for i in range(0, rows, 4096):
            full[i:i + 4096] = torch.randn(min(4096, rows - i), COLS, generator=g)
        ckpts = [flashckpt.Checkpointer(d, rank=r, world_size=SAVED_WORLD, run_id="bench-shard", commit_timeout=300)
                 for r in range(SAVED_WORLD)]
        saved = boxes("rows", SAVED_WORLD, rows)
        handles = []
        for r, ((o, s), c) in enumerate(zip(saved, ckpts)):
            local = full[o[0]:o[0] + s[0]].contiguous()
            handles.append(c.save(1, {"w": flashckpt.Shard(local, (rows, COLS), o)}))
        for h in handles:
            h.wait(timeout=300)
        for c in ckpts:
            c.unlink_memory()
            c.close()
        step = os.path.join(d, "step-1")
        files = [os.path.join(step, f"rank-{r}.data") for r in range(SAVED_WORLD)]
        runs = []
        for layout, world in (("rows", 2), ("rows", 3), ("cols", 2)):
            for r, (o, s) in enumerate(boxes(layout, world, rows)):
                # The saved chunks this box meets: read whole (crc32c).
                meets = [q for q, (so, ss) in enumerate(saved)
                         if all(so[k] < o[k] + s[k] and o[k] < so[k] + ss[k] for k in range(2))]
                need = [files[q] for q in meets]
                for rep in range(args.repeats):
                    # The destination exists and is touched, as a resumed job's
                    # tensors are: a first touch of fresh pages costs more than the
                    # read on this VM (timed apart as fresh_fill_seconds).
                    t = time.perf_counter()
                    dst = torch.empty(s).fill_(0.0)
                    fresh = time.perf_counter() - t
                    t = time.perf_counter()
                    flashckpt.load_resharded(d, 1, state={"w": flashckpt.Shard(dst, (rows, COLS), o)})
                    secs = time.perf_counter() - t
                    ok = torch.equal(dst, full[o[0]:o[0] + s[0], o[1]:o[1] + s[1]])
                    dd = dd_seconds(need)
                    runs.append({"layout": layout, "world": world, "rank": r, "repeat": rep, "seconds": secs,
                                 "dd_seconds": dd, "fresh_fill_seconds": fresh, "box_bytes": dst.numel() * 4,
                                 "read_bytes": sum(os.path.getsize(p) for p in need), "chunks": len(need),
                                 "bit_exact": ok})
                    print(f"{layout} world {world} rank {r}: {secs:.3f} s, dd {dd:.3f} s "
                          f"({len(need)} chunks), exact={ok}", flush=True)
        summary = {}
        for layout, world in (("rows", 2), ("rows", 3), ("cols", 2)):
            sel = [x for x in runs if x["layout"] == layout and x["world"] == world]
            ratios = [x["dd_seconds"] / x["seconds"] for x in sel]
            summary[f"{layout}_{world}"] = {
                "median_seconds": statistics.median(x["seconds"] for x in sel),
                "median_dd_seconds": statistics.median(x["dd_seconds"] for x in sel),
                "median_speed_vs_dd": statistics.median(ratios),
                "median_GBps": statistics.median(x["read_bytes"] / x["seconds"] / 1e9 for x in sel),
                "median_fresh_fill_seconds": statistics.median(x["fresh_fill_seconds"] for x in sel),
                "box_bytes": sel[0]["box_bytes"], "read_bytes": sel[0]["read_bytes"],
                "all_bit_exact": all(x["bit_exact"] for x in sel),
            }
        out = {"benchmark": "shard_load", "gib": rows * COLS * 4 / (1 << 30), "saved_world": SAVED_WORLD,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "summary": summary, "runs": runs}
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "shard_load.json"), "w") as f:
            json.dump(out, f, indent=1)
        for k, v in summary.items():
            print(f"{k}: {v['median_seconds']:.3f} s, dd {v['median_dd_seconds']:.3f} s, "
                  f"{v['median_speed_vs_dd']:.2f}x dd, exact={v['all_bit_exact']}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Per-tensor cost of a save: many small tensors, against a copy_ loop over the same
tensors in the same run.

    /usr/bin/python3 benchmarks/python/bench_small_tensors.py          # 20,000 x 4 KiB and 6,672 x ~3 KiB

For each state: the median pause of ``ckpt.save`` (slots reserved up front, persist
off: the pause only) through the save plan (the layout of the previous save: only
new data pointers) and through the full flatten (the plan dropped before each save:
what every save cost before plans, and what the first save and a changed layout
still cost), the median of a plain ``copy_`` loop into touched tensors, and
of the same loop into views of one shared-memory tensor (``share_memory_()``: what a
peer that keeps its snapshot as torch tensors in /dev/shm does). The cost per tensor above the
byte copy is (pause - copy_) / tensors. Writes benchmarks/results/small_tensors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "python"))

import torch  # noqa: E402

import flashckpt  # noqa: E402


def timed(fn, runs):
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def one(n, numel, runs):
    ts = {f"layer{i // 8}.p{i % 8}": torch.full((numel,), float(i)) for i in range(n)}
    nbytes = sum(t.numel() * t.element_size() for t in ts.values())
    d = tempfile.mkdtemp(prefix="fck-small-")
    try:
        with flashckpt.Checkpointer(d, persist=False, reserve_bytes=2 * nbytes + n * 4096,
                                    reserve_in_background=False, run_id=f"small{os.getpid()}") as c:
            for i in range(3):
                c.save(i, {"model": ts})
            step = [3]

            def save():
                c.save(step[0], {"model": ts})
                step[0] += 1

            pause = timed(save, runs)
            assert c._plan is not None, "the state did not get a save plan"

            def save_full():
                c._plan = None
                save()

            full = timed(save_full, runs)
            c.unlink_memory()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    src = list(ts.values())
    dst = [torch.empty_like(t).fill_(0) for t in src]
    # One shared-memory storage split into views (a tensor per segment would need an fd each).
    pool = torch.zeros(sum(t.numel() for t in src)).share_memory_()
    shm, off = [], 0
    for t in src:
        shm.append(pool[off:off + t.numel()].view(t.shape))
        off += t.numel()

    def copy_into(targets):
        with torch.no_grad():
            for a, b in zip(targets, src):
                a.copy_(b)

    copy = timed(lambda: copy_into(dst), runs)
    shm_copy = timed(lambda: copy_into(shm), runs)
    p, cp, sc = statistics.median(pause), statistics.median(copy), statistics.median(shm_copy)
    fp = statistics.median(full)
    r = {"tensors": n, "bytes": nbytes, "save_pause_s_median": p, "copy_loop_s_median": cp,
         "shm_copy_loop_s_median": sc, "us_per_tensor_above_copy": (p - cp) / n * 1e6,
         "save_vs_copy_loop": p / cp, "save_vs_shm_copy_peer": p / sc,
         "full_flatten_pause_s_median": fp, "full_flatten_us_per_tensor_above_copy": (fp - cp) / n * 1e6,
         "save_pause_s": pause, "full_flatten_pause_s": full, "copy_loop_s": copy, "shm_copy_loop_s": shm_copy}
    print(f"{n} tensors ({nbytes / 2**20:.1f} MiB): save {p * 1e3:.1f} ms (full flatten {fp * 1e3:.1f} ms), "
          f"copy_ loop {cp * 1e3:.1f} ms, shm copy_ peer {sc * 1e3:.1f} ms -> {(p - cp) / n * 1e6:.2f} us/tensor "
          f"above the copy (full flatten {(fp - cp) / n * 1e6:.2f}), {p / cp:.2f}x copy_, {p / sc:.2f}x the peer",
          flush=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"host": os.uname().nodename, "cpus": os.cpu_count(), "torch": torch.__version__,
           "states": [one(20000, 1024, args.runs), one(6672, 786, args.runs)]}
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", "small_tensors.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""Data-parallel state stored once: 4 ranks (gloo on 127.0.0.1), each holding the
same 1 GiB state (GPT-style model + Adam moments, as DDP keeps it), saved per rank
(every rank writes its whole state: the format before replication) and replicated
(``replicated=("model", "optimizer")``: one copy over the ranks), in one run.

    /usr/bin/python3 benchmarks/python/bench_replicated.py            # 1 GiB per rank, 4 ranks
    /usr/bin/python3 benchmarks/python/bench_replicated.py --gib 0.25 --saves 3

Per mode and save (the first save of each mode is a warm-up, not counted):
  pause        save() until the bytes are in shared memory (the training pause)
  durable      save() until the step is committed (wait()), on the slowest rank
  bytes        bytes of the step directory's data files (.data + .replica), all ranks
Then fresh worlds of 4 and of 2 processes load the replicated step from storage
(load_into the model and optimizer they built, every tensor checked), timed per rank,
beside `dd iflag=direct` reading the same bytes (what each rank needs: every replica
share), alone and 4 (or 2) at once as the ranks do.

Writes benchmarks/results/replicated_4ranks.json (medians, every run, ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(REPO, "benchmarks", "results")
GiB = 1 << 30

RANK = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import torch, torch.distributed as dist, flashckpt
from bench_load_into import build
from datetime import timedelta
mode, directory, gib, saves = sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[6])
dist.init_process_group("gloo", timeout=timedelta(seconds=600))
rank, world = dist.get_rank(), dist.get_world_size()
model, opt = build(gib)
out = {"rank": rank, "world": world, "mode": mode}
def state():
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}
if mode in ("per_rank", "replicated"):
    rep = ("model", "optimizer") if mode == "replicated" else None
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    # Slots reserved before the first save (not in the background), and no
    # retention: a save's pause is not mixed with slot preparation or with
    # the deletion of older steps.
    with flashckpt.Checkpointer(directory, replicated=rep, keep_last=0, commit_timeout=600, reserve_bytes=nbytes,
                                reserve_in_background=False, run_id=f"bench-{mode}") as ckpt:
        out["pause_s"], out["durable_s"], out["steps"] = [], [], []
        for i in range(saves + 1):
            with torch.no_grad():  # each step a different state, the same on every rank
                for p in model.parameters():
                    p.add_(1.0)
            dist.barrier()
            t0 = time.perf_counter()
            h = ckpt.save(i + 1, state())
            t1 = time.perf_counter()
            h.wait(timeout=600)
            t2 = time.perf_counter()
            dist.barrier()
            if i > 0:
                out["pause_s"].append(t1 - t0); out["durable_s"].append(t2 - t0); out["steps"].append(i + 1)
        ckpt.unlink_memory()
else:  # load: a fresh world reads the newest step from storage into its tensors
    with flashckpt.Checkpointer(directory, replicated=("model", "optimizer"), run_id=f"bench-load-{world}") as ckpt:
        dist.barrier()
        t0 = time.perf_counter()
        ckpt.load_into(model, opt, optimizer_key="optimizer")
        out["load_s"] = time.perf_counter() - t0
        out["source"] = ckpt.last_load.source
        out["step"] = ckpt.last_load.step
        ckpt.unlink_memory()
dist.barrier()
dist.destroy_process_group()
print("RESULT " + json.dumps(out), flush=True)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, mode, directory, gib, saves):
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK, os.path.join(REPO, "python"), HERE, mode,
                                       directory, str(gib), str(saves)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        so, se = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"{mode} rank failed:\n{se[-4000:]}")
        out.append(json.loads([l for l in so.splitlines() if l.startswith("RESULT ")][0][7:]))
    return out


def step_bytes(directory, step):
    d = os.path.join(directory, f"step-{step}")
    return {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))
            if f.endswith(".data") or f.endswith(".replica")}


def dd_direct(paths, concurrent):
    """Seconds for `concurrent` readers each reading every path with O_DIRECT, in order."""
    script = " && ".join(f"dd if={p} of=/dev/null bs=8M iflag=direct status=none" for p in paths)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["sh", "-c", script]) for _ in range(concurrent)]
    for p in procs:
        if p.wait(timeout=600) != 0:
            raise SystemExit("dd failed")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="state per rank (default 1)")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--saves", type=int, default=3, help="timed saves per mode (after one warm-up)")
    ap.add_argument("--loads", type=int, default=3, help="fresh-world loads per world size")
    ap.add_argument("--dir", default=None, help="storage directory (default: a temp dir under /tmp)")
    args = ap.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="fck-bench-rep-", dir="/tmp")
    res = {"host": platform.node(), "cpus": os.cpu_count(), "gib_per_rank": args.gib, "world": args.world,
           "modes": {}, "loads": {}}
    try:
        for mode in ("per_rank", "replicated"):
            d = os.path.join(base, mode)
            ranks = run_world(args.world, mode, d, args.gib, args.saves)
            last = ranks[0]["steps"][-1]
            files = step_bytes(d, last)
            per_rank_bytes = [files.get(f"rank-{r}.data", 0) + files.get(f"rank-{r}.replica", 0)
                              for r in range(args.world)]
            pauses = [p for r in ranks for p in r["pause_s"]]
            durable = [max(r["durable_s"][i] for r in ranks) for i in range(args.saves)]
            res["modes"][mode] = {
                "pause_s_median": statistics.median(pauses), "pause_s": pauses,
                "durable_s_median": statistics.median(durable), "durable_s": durable,
                "bytes_per_step": sum(files.values()), "bytes_per_rank": per_rank_bytes, "files": files}
            print(f"{mode:>10}: pause {statistics.median(pauses):.3f} s, durable {statistics.median(durable):.2f} s,"
                  f" {sum(files.values()) / GiB:.2f} GiB written per step ({per_rank_bytes})", flush=True)
            if mode == "per_rank":
                shutil.rmtree(d, ignore_errors=True)
        d = os.path.join(base, "replicated")
        last = max(int(n.split("-")[1]) for n in os.listdir(d) if n.startswith("step-"))
        needed = [os.path.join(d, f"step-{last}", f"rank-{r}.replica") for r in range(args.world)]
        needed_bytes = sum(os.path.getsize(p) for p in needed)
        for world in (args.world, max(args.world // 2, 1), 1):
            loads, dd_alone, dd_together = [], [], []
            for _ in range(args.loads):
                subprocess.run(["sync"], check=False)
                ranks = run_world(world, "load", d, args.gib, 0)
                assert all(r["source"] == "storage" and r["step"] == last for r in ranks), ranks
                loads.append(max(r["load_s"] for r in ranks))
                dd_alone.append(dd_direct(needed, 1))
                dd_together.append(dd_direct(needed, world))
            lm, da, dt = statistics.median(loads), statistics.median(dd_alone), statistics.median(dd_together)
            res["loads"][str(world)] = {
                "bytes_per_rank": needed_bytes, "load_s_median_slowest_rank": lm, "load_s": loads,
                "dd_direct_alone_s_median": da, "dd_direct_concurrent_s_median": dt,
                "throughput_vs_dd_alone": da / lm, "throughput_vs_dd_concurrent": dt / lm}
            print(f"load into {world}: {lm:.2f} s (slowest rank, {needed_bytes / GiB:.2f} GiB each); dd O_DIRECT "
                  f"{da:.2f} s alone, {dt:.2f} s with {world} at once -> {da / lm:.2f}x / {dt / lm:.2f}x", flush=True)
        pr, rp = res["modes"]["per_rank"], res["modes"]["replicated"]
        res["ratios"] = {"bytes_per_step": rp["bytes_per_step"] / pr["bytes_per_step"],
                         "durable": rp["durable_s_median"] / pr["durable_s_median"],
                         "pause": rp["pause_s_median"] / pr["pause_s_median"]}
        print("replicated / per rank:", json.dumps(res["ratios"]))
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"replicated_{args.world}ranks.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

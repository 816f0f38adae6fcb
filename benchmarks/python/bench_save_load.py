"""flashckpt.save / load against torch.save / torch.load on one GPT-style state dict.

    /usr/bin/python3 benchmarks/python/bench_save_load.py               # 0.5, 1, 2, 4 GiB
    /usr/bin/python3 benchmarks/python/bench_save_load.py --sizes 2 --runs 3

For each size (a separate process, so that memory is returned between sizes) it
builds a GPT-2-style model state (d_model 1024, vocabulary 50257, as many layers
as the size allows) plus its Adam state in optimizer.state_dict() form - several
hundred tensors - and measures, each the median of --runs runs:

  blocking time   flashckpt.save (first save of a fresh Checkpointer, later saves),
                  torch.save + fsync to a file, torch.save into io.BytesIO,
                  a bare copy_ into preallocated, already-touched tensors (the limit)
  until durable   flashckpt (save start -> handle.wait() returns) vs torch.save + fsync
  load            flashckpt from memory (same process; fresh process), from disk
                  (page cache dropped for the files), torch.load cold and warm

Writes benchmarks/results/python_save_load.json and python_blocking_time.png.
Needs about 4x the state size in RAM (state, two snapshot slots, one loaded copy).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(REPO, "benchmarks", "results")
sys.path.insert(0, os.path.join(REPO, "python"))

GiB = 1 << 30


def gpt_state(target_bytes: int):
    """A GPT-2-style model state_dict and Adam optimizer state_dict of about target_bytes."""
    import torch

    d, vocab, ctx = 1024, 50257, 1024
    per_layer = 12 * d * d + 13 * d  # attn qkv + proj, mlp fc + proj, 2 layernorms, biases
    fixed = vocab * d + ctx * d + 2 * d
    layers = max(1, round((target_bytes / 12 - fixed) / per_layer))  # fp32 param + 2 Adam moments
    shapes = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (ctx, d)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})

    def filled(shape, v):
        return torch.empty(shape).fill_(v)  # touched memory, like a live model's

    model = {k: filled(s, 0.01 * (i % 7)) for i, (k, s) in enumerate(shapes.items())}
    model["lm_head.weight"] = model["transformer.wte.weight"]  # tied, as in GPT-2
    state = {i: {"step": torch.tensor(100.0), "exp_avg": filled(s, 1e-3),
                 "exp_avg_sq": filled(s, 1e-6)} for i, s in enumerate(shapes.values())}
    optim = {"state": state, "param_groups": [{
        "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
        "maximize": False, "foreach": None, "capturable": False, "params": list(range(len(shapes)))}]}
    full = {"model": model, "optim": optim, "extra": {"step": 100, "tokens": 123456789}}
    nbytes = sum(t.numel() * t.element_size() for k, t in model.items() if k != "lm_head.weight")
    nbytes += sum(v.numel() * v.element_size() for s in state.values() for v in s.values())
    ntensors = len(model) + 3 * len(state)
    return full, nbytes, ntensors, layers


def tensors_of(state):
    import torch

    out, seen = [], set()

    def walk(o):
        if isinstance(o, torch.Tensor):
            if id(o) not in seen:
                seen.add(id(o))
                out.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(state)
    return out


def drop_cache(path):
    """Evicts a file (or a directory's files) from the page cache."""
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs]
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def median(xs):
    return statistics.median(xs)


def timed(fn, runs, setup=None):
    times = []
    for _ in range(runs):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


FRESH_LOAD = r"""
import sys, time, json
sys.path.insert(0, sys.argv[2])
t0 = time.perf_counter()
import torch, flashckpt
t1 = time.perf_counter()
ckpt = flashckpt.Checkpointer(sys.argv[1], unlink_memory_on_close=False)
state = ckpt.load()
t2 = time.perf_counter()
src = ckpt.last_load.source
ckpt.close()
print(json.dumps({"import_s": t1 - t0, "open_and_load_s": t2 - t1, "source": src}))
"""


def bench_one(size_gib: float, runs: int, workdir: str) -> dict:
    import torch

    import flashckpt

    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(workdir, exist_ok=True)
    res = {"size_gib_requested": size_gib}
    t0 = time.perf_counter()
    state, nbytes, ntensors, layers = gpt_state(int(size_gib * GiB))
    res.update(state_bytes=nbytes, state_gib=nbytes / GiB, tensors=ntensors, layers=layers,
               build_s=time.perf_counter() - t0)
    log = lambda *a: print(f"[{size_gib} GiB]", *a, file=sys.stderr, flush=True)
    log(f"state: {nbytes / GiB:.2f} GiB, {ntensors} tensors, {layers} layers")
    src = tensors_of(state)

    # 1. The limit: copy_ into preallocated, touched tensors.
    dst = [torch.empty_like(t).fill_(0) for t in src]

    def copy_all():
        for d_, s_ in zip(dst, src):
            d_.copy_(s_)

    res["copy_s"] = timed(copy_all, runs)
    del dst
    log("copy_", median(res["copy_s"]))

    # 2. torch.save into BytesIO.
    def to_bytes():
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf

    res["torch_save_bytesio_s"] = timed(lambda: to_bytes(), runs)
    log("torch.save BytesIO", median(res["torch_save_bytesio_s"]))

    # 3. torch.save + fsync: blocking and durable are the same.
    pt = os.path.join(workdir, "state.pt")

    def save_fsync():
        with open(pt, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    res["torch_save_fsync_s"] = timed(save_fsync, runs)
    log("torch.save+fsync", median(res["torch_save_fsync_s"]))

    # 4. flashckpt: first save of a fresh Checkpointer, then later saves.
    cdir = os.path.join(workdir, "flashckpt")
    shutil.rmtree(cdir, ignore_errors=True)
    first_block, first_durable, block, durable = [], [], [], []
    for r in range(runs):
        shutil.rmtree(cdir, ignore_errors=True)
        ckpt = flashckpt.Checkpointer(cdir, keep_last=1)
        t0 = time.perf_counter()
        h = ckpt.save(1, state)
        first_block.append(time.perf_counter() - t0)
        h.wait(timeout=600)
        first_durable.append(time.perf_counter() - t0)
        if r < runs - 1:
            ckpt.close()
    for i in range(runs):
        t0 = time.perf_counter()
        h = ckpt.save(2 + i, state)
        block.append(time.perf_counter() - t0)
        h.wait(timeout=600)
        durable.append(time.perf_counter() - t0)
    res.update(flashckpt_first_save_s=first_block, flashckpt_first_durable_s=first_durable,
               flashckpt_save_s=block, flashckpt_durable_s=durable)
    log("flashckpt first", median(first_block), "later", median(block), "durable", median(durable))

    # 4b. A fresh Checkpointer with reserve_bytes: slots touched up front.
    ckpt.close()
    shutil.rmtree(cdir, ignore_errors=True)
    t0 = time.perf_counter()
    ckpt = flashckpt.Checkpointer(cdir, keep_last=1, reserve_bytes=nbytes + (64 << 20),
                                  reserve_in_background=False, unlink_memory_on_close=False)
    res["flashckpt_reserve_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = ckpt.save(1, state)
    res["flashckpt_first_save_reserved_s"] = time.perf_counter() - t0
    h.wait(timeout=600)
    for i in range(runs - 1):
        ckpt.save(2 + i, state).wait(timeout=600)
    log("flashckpt reserved first save", res["flashckpt_first_save_reserved_s"])
    # The state is not needed any more: free it so that loads fit in RAM
    # (slots + one loaded copy).
    del state, src

    # 5. Loads from memory, same process.
    def load_mem():
        s = ckpt.load()
        assert ckpt.last_load.source == "memory"
        return s

    res["flashckpt_load_memory_s"] = timed(load_mem, runs)
    log("load memory", median(res["flashckpt_load_memory_s"]))
    segment = ckpt.memory_segment_path
    ckpt.wait(timeout=600)
    ckpt.close()  # keeps the segment (unlink_memory_on_close=False) for a fresh process

    # 6. Fresh process loads from memory (segment kept on close: reopen keeping it).
    if not os.path.exists(segment):
        raise RuntimeError(f"{segment} is gone: cannot measure a fresh-process load from memory")
    fresh = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", FRESH_LOAD, cdir, os.path.join(REPO, "python")],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        fresh.append(json.loads(out.stdout.strip().splitlines()[-1]))
    res["flashckpt_load_memory_fresh_process_s"] = [f["open_and_load_s"] for f in fresh]
    res["fresh_process_import_s"] = [f["import_s"] for f in fresh]
    res["fresh_process_sources"] = [f["source"] for f in fresh]
    log("fresh-process load", median(res["flashckpt_load_memory_fresh_process_s"]), fresh[0]["source"])

    # 7. Loads from disk: flashckpt (cold page cache) vs torch.load (cold, warm).
    with flashckpt.Checkpointer(cdir, keep_last=1, reuse_memory=True) as c:
        c.unlink_memory()
    with flashckpt.Checkpointer(cdir, keep_last=1, reuse_memory=False) as c:
        res["flashckpt_load_disk_cold_s"] = timed(
            lambda: c.load(prefer_memory=False), runs, setup=lambda: drop_cache(cdir))
    log("load disk", median(res["flashckpt_load_disk_cold_s"]))
    res["torch_load_cold_s"] = timed(lambda: torch.load(pt), runs, setup=lambda: drop_cache(pt))
    res["torch_load_warm_s"] = timed(lambda: torch.load(pt), runs)
    log("torch.load cold", median(res["torch_load_cold_s"]), "warm", median(res["torch_load_warm_s"]))
    shutil.rmtree(cdir, ignore_errors=True)
    os.unlink(pt)

    med = {k + "_median": median(v) for k, v in res.items() if isinstance(v, list) and v
           and isinstance(v[0], float)}
    res.update(med)
    res["ratio_torch_save_fsync_over_flashckpt_save"] = (
        med["torch_save_fsync_s_median"] / med["flashckpt_save_s_median"])
    res["ratio_flashckpt_save_over_copy"] = med["flashckpt_save_s_median"] / med["copy_s_median"]
    res["ratio_torch_save_fsync_over_flashckpt_durable"] = (
        med["torch_save_fsync_s_median"] / med["flashckpt_durable_s_median"])
    return res


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["state_gib"] for r in results]
    series = [
        ("torch.save + fsync", "torch_save_fsync_s_median", "o-"),
        ("torch.save → BytesIO", "torch_save_bytesio_s_median", "s-"),
        ("flashckpt.save, first save (fresh Checkpointer)", "flashckpt_first_save_s_median", "v--"),
        ("flashckpt.save", "flashckpt_save_s_median", "D-"),
        ("copy_ into preallocated tensors (limit)", "copy_s_median", "k:"),
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, key, style in series:
        ax.plot(xs, [r[key] for r in results], style, label=label)
    ax.set_xlabel("state size (GiB, GPT-style model + Adam state)")
    ax.set_ylabel("blocking time (s, median)")
    ax.set_yscale("log")
    ax.set_title(f"Training pause per checkpoint ({os.cpu_count()} cores, {platform.machine()})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1, 2, 4])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp/flashckpt-bench")
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(RESULTS, "python_save_load.json"))
    ap.add_argument("--append", action="store_true",
                    help="keep the other sizes already in --out (replace the ones measured now)")
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(bench_one(a.one, a.runs, a.workdir)))
        return
    import torch

    results = []
    if a.append and os.path.exists(a.out):
        with open(a.out) as f:
            results = [r for r in json.load(f)["results"] if r["size_gib_requested"] not in a.sizes]
    failed = []
    for size in a.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(size), "--runs", str(a.runs),
                              "--workdir", a.workdir], stdout=subprocess.PIPE, text=True,
                             timeout=3600)
        if out.returncode != 0:
            print(f"size {size} GiB failed (rc {out.returncode})", file=sys.stderr)
            failed.append(size)
            cleanup(a.workdir)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results.sort(key=lambda r: r["size_gib_requested"])
        write(a, results, torch)
    if failed:
        sys.exit(f"failed sizes: {failed}")


def cleanup(workdir):
    """Drops the segment a killed run left behind (it kept it for the fresh-process load)."""
    import flashckpt

    cdir = os.path.join(workdir, "flashckpt")
    if os.path.isdir(cdir):
        with flashckpt.Checkpointer(cdir, persist=False) as c:
            c.unlink_memory()
        shutil.rmtree(cdir, ignore_errors=True)


def write(a, results, torch):
    doc = {
        "benchmark": "flashckpt Python save/load vs torch.save/torch.load",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "runs": a.runs,
        "statistic": "median of runs (raw runs in *_s lists)",
        "results": results,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    plot(results, os.path.join(os.path.dirname(a.out), "python_blocking_time.png"))
    print(f"{'GiB':>5} {'tensors':>7} {'copy_':>7} {'fc save':>8} {'fc first':>8} "
          f"{'t.save+fsync':>12} {'BytesIO':>8} {'fc durable':>10} {'×fsync':>7} {'/copy':>6}")
    for r in results:
        print(f"{r['state_gib']:5.2f} {r['tensors']:7d} {r['copy_s_median']:7.3f} "
              f"{r['flashckpt_save_s_median']:8.3f} {r['flashckpt_first_save_s_median']:8.3f} "
              f"{r['torch_save_fsync_s_median']:12.3f} {r['torch_save_bytesio_s_median']:8.3f} "
              f"{r['flashckpt_durable_s_median']:10.3f} "
              f"{r['ratio_torch_save_fsync_over_flashckpt_save']:7.1f} "
              f"{r['ratio_flashckpt_save_over_copy']:6.2f}")


if __name__ == "__main__":
    main()

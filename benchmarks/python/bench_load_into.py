"""Fresh-process restore of a GPT-style model + Adam state into an already-built model
and optimizer, against a plain ``copy_`` of the same bytes into already-touched tensors.

    /usr/bin/python3 benchmarks/python/bench_load_into.py              # 2 GiB, 5 fresh processes
    /usr/bin/python3 benchmarks/python/bench_load_into.py --gib 1 --runs 3

The parent builds the state (GPT-2 shapes, d_model 1024, Adam moments; see
bench_save_load.gpt_state), saves it and keeps the shared-memory snapshot. Each run
is a fresh interpreter that builds the model and optimizer (touched memory, as a
restarted trainer has before it restores) and times, in that one process:

  load_into   ckpt.load_into(model, optimizer): the slot copied straight into the
              model's parameters and the optimizer's existing state, crc as it goes
  load        ckpt.load() (a new buffer of the state's size; page faults on the way)
  copy_       a plain copy_ of the same bytes from one set of touched tensors into
              another (the limit a restore into existing tensors aims at)
  shm read    (separate fresh processes) the snapshot's bytes read once through a
              fresh mapping of the shared-memory segment into touched memory: what any
              reader of the segment pays first, a peer that serves views of it included

Writes benchmarks/results/python_load_into.json (medians, every run, ratios).
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(REPO, "benchmarks", "results")
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, HERE)
GiB = 1 << 30

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[4])
import torch, flashckpt
from bench_load_into import build
torch.set_num_threads(__import__("os").cpu_count() or 1)
model, opt = build(float(sys.argv[2]))
out = {}
if sys.argv[5] == "shm":
    # The floor for any reader in a fresh process: the snapshot's bytes read once
    # through a fresh mapping of the segment, into touched memory.
    import mmap, os
    import numpy as np
    fd = os.open(sys.argv[6], os.O_RDONLY)
    n = min(int(sys.argv[7]), os.fstat(fd).st_size)
    m = mmap.mmap(fd, n, prot=mmap.PROT_READ)
    dst = np.ones(n, dtype=np.uint8)
    t0 = time.perf_counter()
    np.copyto(dst, np.frombuffer(m, dtype=np.uint8))
    out["shm_read_s"] = time.perf_counter() - t0
    print(json.dumps(out))
    sys.exit(0)
with flashckpt.Checkpointer(sys.argv[1], unlink_memory_on_close=False) as ckpt:
    t0 = time.perf_counter()
    ckpt.load_into(model, opt)
    out["load_into_s"] = time.perf_counter() - t0
    out["load_into_source"] = ckpt.last_load.source
    t0 = time.perf_counter()
    state = ckpt.load()
    out["load_s"] = time.perf_counter() - t0
    out["load_source"] = ckpt.last_load.source
    del state
# The limit: the same bytes copied into tensors that exist and are touched.
dst = [p.detach() for p in model.parameters()] + [v for s in opt.state.values() for v in s.values()
                                                  if v.dim() > 0]
src = [torch.empty_like(t).fill_(1.0) for t in dst]
t0 = time.perf_counter()
with torch.no_grad():
    for d, s in zip(dst, src):
        d.copy_(s)
out["copy_s"] = time.perf_counter() - t0
out["copy_bytes"] = sum(t.numel() * t.element_size() for t in dst)
print(json.dumps(out))
"""


def build(gib: float):
    """A model whose parameters have GPT-2's shapes (tied embedding) and its Adam with state."""
    import torch

    from bench_save_load import gpt_state

    state, _, _, _ = gpt_state(int(gib * GiB))
    model = torch.nn.Module()
    params = torch.nn.ParameterDict()
    for name, t in state["model"].items():
        if name == "lm_head.weight":
            continue
        params[name.replace(".", "_")] = torch.nn.Parameter(torch.empty(t.shape).fill_(0.5))
    model.params = params
    model.lm_head = params["transformer_wte_weight"]  # tied, as in GPT-2
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    for p in model.parameters():  # state as after a step: touched memory
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.empty_like(p).fill_(0.0),
                        "exp_avg_sq": torch.empty_like(p).fill_(0.0)}
    del state
    return model, opt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", default="/var/tmp/flashckpt-bench-load-into")
    ap.add_argument("--out", default=os.path.join(RESULTS, "python_load_into.json"))
    a = ap.parse_args()
    import torch

    import flashckpt

    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    cdir = os.path.join(a.workdir, "ckpt")
    model, opt = build(a.gib)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(0.001 * (i % 13))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    print(f"state {nbytes / GiB:.2f} GiB; saving", file=sys.stderr)
    with flashckpt.Checkpointer(cdir, unlink_memory_on_close=False) as ckpt:
        ckpt.save(1, {"model": model.state_dict(), "optim": opt.state_dict()}).wait(timeout=1200)
        segment = ckpt.memory_segment_path
    expected = [p.detach().clone() for p in list(model.parameters())[:3]]
    del model, opt
    runs = []
    try:
        for i in range(a.runs):
            r = {}
            for mode in ("flashckpt", "shm"):
                out = subprocess.run([sys.executable, "-c", CHILD, cdir, str(a.gib), os.path.join(REPO, "python"),
                                      HERE, mode, segment, str(nbytes)],
                                     capture_output=True, text=True, timeout=1200)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-3000:])
                r.update(json.loads(out.stdout.strip().splitlines()[-1]))
            runs.append(r)
            print(f"run {i + 1}: load_into {r['load_into_s']:.3f} s ({r['load_into_source']}), "
                  f"load {r['load_s']:.3f} s, copy_ {r['copy_s']:.3f} s, shm read {r['shm_read_s']:.3f} s",
                  file=sys.stderr)
    finally:
        with flashckpt.Checkpointer(cdir) as c:
            check = c.load()  # the bytes restored are the bytes saved
            ok = all(torch.equal(check["model"][n], e) for n, e in
                     zip([k for k in check["model"] if k != "lm_head"][:3], expected))
            del check
            c.unlink_memory()
        shutil.rmtree(a.workdir, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("load_into_s", "load_s", "copy_s", "shm_read_s")}
    result = {
        "benchmark": "fresh-process load_into vs load vs copy_ into touched tensors",
        "state_bytes": nbytes, "state_gib": nbytes / GiB, "runs": runs,
        "medians": med,
        "ratio_load_into_over_copy": med["load_into_s"] / med["copy_s"],
        "ratio_load_over_copy": med["load_s"] / med["copy_s"],
        "ratio_load_into_over_shm_read": med["load_into_s"] / med["shm_read_s"],
        "bytes_checked_equal": ok,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"medians": med, "load_into/copy_": result["ratio_load_into_over_copy"],
                      "load/copy_": result["ratio_load_over_copy"],
                      "load_into/shm read": result["ratio_load_into_over_shm_read"]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

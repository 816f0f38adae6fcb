"""GPU comparison (run through run_gpu_bench.sh, which builds the extension).

For a GPT-style state (model + Adam moments, fp32, on cuda:0) of each size:
  * pinned_memcpy_*: torch copy_(non_blocking=True) into pinned host memory,
    i.e. cudaMemcpyAsync D2H, of one flat buffer and tensor by tensor - the limit;
  * flashckpt_save_blocking: save(blocking=True) into reserved, registered slots;
  * flashckpt_save_nonblocking: return time of save(blocking=False), and the
    time until fence() returns (the copy finished);
  * dcp_async_save: blocking time of torch.distributed.checkpoint.async_save and
    its time until the future completes (when the installed PyTorch has it);
  * torch_save_fsync: torch.save + fsync of the same state (GPU tensors).
Bandwidths are state bytes / time. Medians of --runs. JSON to
benchmarks/results/python_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "python"))
sys.path.insert(0, os.path.join(REPO, "python"))

GiB = 1 << 30


def med(xs):
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[2, 4])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "python_gpu.json"))
    a = ap.parse_args()

    import torch

    import flashckpt
    from bench_save_load import gpt_state, tensors_of

    if not torch.cuda.is_available():
        sys.exit("gpu_bench: torch.cuda.is_available() is False")
    from flashckpt import _native

    ext = _native.load()
    print(f"flashckpt extension {ext.__file__} (built with CUDA: {ext.have_cuda})", flush=True)
    dev = torch.device("cuda:0")
    results = []
    for size in a.sizes:
        r = {"size_gib_requested": size}
        cpu_state, nbytes, ntensors, layers = gpt_state(int(size * GiB))
        state = {"model": {k: v.to(dev) for k, v in cpu_state["model"].items()},
                 "optim": {"state": {i: {k: v.to(dev) for k, v in s.items()}
                                     for i, s in cpu_state["optim"]["state"].items()},
                           "param_groups": cpu_state["optim"]["param_groups"]},
                 "extra": cpu_state["extra"]}
        state["model"]["lm_head.weight"] = state["model"]["transformer.wte.weight"]
        del cpu_state
        torch.cuda.synchronize()
        r.update(state_bytes=nbytes, tensors=ntensors)
        src = tensors_of(state)
        print(f"[{size} GiB] {nbytes / GiB:.2f} GiB on {torch.cuda.get_device_name(0)}, "
              f"{ntensors} tensors", flush=True)

        # The limit: pinned cudaMemcpy of the same bytes.
        flat = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
        pinned_flat = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True)
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in src]

        def copy_flat():
            pinned_flat.copy_(flat, non_blocking=True)
            torch.cuda.synchronize()

        def copy_each():
            for d, s in zip(pinned, src):
                d.copy_(s, non_blocking=True)
            torch.cuda.synchronize()

        copy_flat()
        copy_each()
        r["pinned_memcpy_flat_s"] = [_t(copy_flat) for _ in range(a.runs)]
        r["pinned_memcpy_per_tensor_s"] = [_t(copy_each) for _ in range(a.runs)]
        del flat, pinned_flat, pinned

        # flashckpt, blocking and non-blocking, into reserved slots.
        d = tempfile.mkdtemp(dir=a.workdir, prefix="flashckpt-gpu-")
        try:
            t0 = time.perf_counter()
            ckpt = flashckpt.Checkpointer(d, keep_last=1, reserve_bytes=nbytes + (256 << 20),
                                          reserve_in_background=False)
            r["flashckpt_open_reserve_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            h = ckpt.save(0, state)
            r["flashckpt_first_save_s"] = time.perf_counter() - t0
            h.wait(timeout=1200)
            blocking, durable, nb_return, nb_fence = [], [], [], []
            for i in range(a.runs):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                h = ckpt.save(1 + i, state)
                blocking.append(time.perf_counter() - t0)
                h.wait(timeout=1200)
                durable.append(time.perf_counter() - t0)
            for i in range(a.runs):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                h = ckpt.save(100 + i, state, blocking=False)
                nb_return.append(time.perf_counter() - t0)
                h.fence()
                nb_fence.append(time.perf_counter() - t0)
                h.wait(timeout=1200)
            r.update(flashckpt_save_blocking_s=blocking, flashckpt_durable_s=durable,
                     flashckpt_save_nonblocking_return_s=nb_return,
                     flashckpt_save_nonblocking_fence_s=nb_fence)
            loaded = ckpt.load(map_location="cpu")
            r["flashckpt_load_memory_s"] = ckpt.last_load.seconds
            ok = torch.equal(loaded["model"]["transformer.h.0.mlp.c_fc.weight"],
                             state["model"]["transformer.h.0.mlp.c_fc.weight"].cpu())
            r["roundtrip_equal"] = bool(ok)
            del loaded
            ckpt.close()
        finally:
            shutil.rmtree(d, ignore_errors=True)

        # torch.distributed.checkpoint.async_save, where it exists.
        r["dcp_async_save_s"], r["dcp_async_done_s"] = _dcp(state, a)

        # torch.save + fsync.
        pt = os.path.join(a.workdir, "flashckpt-gpu-bench.pt")

        def save_fsync():
            with open(pt, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        r["torch_save_fsync_s"] = [_t(save_fsync) for _ in range(a.runs)]
        os.unlink(pt)

        for k in list(r):
            if isinstance(r[k], list) and r[k]:
                r[k + "_median"] = med(r[k])
        gbs = lambda s: nbytes / s / 1e9 if s else None
        r["bandwidth_GBps"] = {
            "pinned_memcpy_flat": gbs(r["pinned_memcpy_flat_s_median"]),
            "pinned_memcpy_per_tensor": gbs(r["pinned_memcpy_per_tensor_s_median"]),
            "flashckpt_save_blocking": gbs(r["flashckpt_save_blocking_s_median"]),
            "flashckpt_nonblocking_until_fence": gbs(r["flashckpt_save_nonblocking_fence_s_median"]),
        }
        print(json.dumps({k: v for k, v in r.items() if k.endswith("_median") or k == "bandwidth_GBps"},
                         indent=1), flush=True)
        results.append(r)
        del state, src
        torch.cuda.empty_cache()

    doc = {"benchmark": "flashckpt GPU snapshot vs pinned memcpy and DCP async_save",
           "machine": {"gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count(),
                       "platform": platform.platform(), "torch": torch.__version__,
                       "cuda": torch.version.cuda},
           "runs": a.runs, "results": results}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {a.out}")


def _t(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _dcp(state, a):
    """(blocking times, completion times) of DCP async_save, or ([], []) if unavailable."""
    import torch
    import torch.distributed as dist

    try:
        import torch.distributed.checkpoint as dcp
    except ImportError:
        print("torch.distributed.checkpoint missing: skipping DCP", flush=True)
        return [], []
    if not hasattr(dcp, "async_save"):
        print(f"torch {torch.__version__} has no dcp.async_save: skipping", flush=True)
        return [], []
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29591")
        dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    block, done = [], []
    for i in range(a.runs):
        d = tempfile.mkdtemp(dir=a.workdir, prefix="dcp-")
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fut = dcp.async_save({"model": state["model"], "optim": state["optim"]},
                                 checkpoint_id=d)
            block.append(time.perf_counter() - t0)
            fut.result(timeout=1200)
            done.append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    print(f"dcp.async_save blocking {med(block):.3f} s, done {med(done):.3f} s", flush=True)
    return block, done


if __name__ == "__main__":
    main()

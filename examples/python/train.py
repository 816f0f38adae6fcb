"""A data-parallel training script that checkpoints with flashckpt.

Runs unchanged under flashrun, torchrun or plain python:

    flashrun --nproc-per-node 2 examples/python/train.py --dir /tmp/ckpt --steps 60

It resumes from the newest snapshot every rank has (under flashrun: the step
the agents agreed on, from shared memory when the node still holds it).
`--crash-at-step N` SIGKILLs rank `--crash-rank` once, in the first attempt,
right after step N, to show recovery. `--ckpt torch` checkpoints with
torch.save/torch.load instead (the baseline of benchmarks/recovery).
"""

import time  # first: the exec mark below is the worker's first line of Python (recovery benchmark)

_T_EXEC = time.time()

import argparse
import hashlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import flashckpt  # cheap (the extension loads on first use); under flashrun, before init_process_group

_T_IMPORTED = time.time()


def log(msg):
    rank = os.environ.get("RANK", "0")
    print(f"[train rank{rank} {time.time():.3f}] {msg}", flush=True)


def build_model(width, depth, init=True):
    """The MLP. Without init (when a checkpoint is about to overwrite every
    parameter) its tensors are only allocated, not randomly initialized."""
    def linear(i, o):
        return torch.nn.Linear(i, o) if init else torch.nn.utils.skip_init(torch.nn.Linear, i, o)

    layers = []
    for _ in range(depth):
        layers += [linear(width, width), torch.nn.Tanh()]
    layers.append(linear(width, 1))
    return torch.nn.Sequential(*layers)


def batch(step, rank, width):
    g = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(32, width, generator=g)
    return x, x[:, :8].sin().sum(1, keepdim=True)


def digest(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="checkpoint directory (shared by all ranks)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5, help="snapshot every N steps")
    ap.add_argument("--persist-every", type=int, default=1, help="persist every N-th snapshot")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--crash-at-step", type=int, default=-1)
    ap.add_argument("--crash-rank", type=int, default=1)
    ap.add_argument("--ckpt", choices=["flashckpt", "torch"], default="flashckpt")
    ap.add_argument("--digest-out", help="rank 0 writes the final parameter digest here")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step")
    ap.add_argument("--replicated", action="store_true",
                    help="declare model and optimizer replicated (the same on every rank, as in DDP): each "
                         "step is written once, spread over the ranks, and loads into any world size")
    ap.add_argument("--events", help="every rank appends 'save|resume|done step=S world=W rank=R digest=D' "
                                     "lines to this file (the elastic tests compare them)")
    args = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if world > 1:
        dist.init_process_group("gloo", init_method="env://")
    t_pg = time.time()

    # Where the state comes from, before the model is built: a model about to be
    # restored needs no random init.
    ckpt, resume_from = None, None
    if args.ckpt == "flashckpt":
        ckpt = flashckpt.Checkpointer(args.dir, keep_last=2, persist_every=args.persist_every,
                                      replicated=True if args.replicated else None)
        # the same decision on every rank (collective): a rank's own latest_step() may differ
        if ckpt.restorable_step() is not None:
            resume_from = "flashckpt"
    else:
        path = os.path.join(args.dir, f"rank{rank}.pt")
        if os.path.exists(path):
            resume_from = path
    t_ckpt = time.time()
    model = build_model(args.width, args.depth, init=resume_from is None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t_model = time.time()

    start = 0
    source = "none"
    if resume_from == "flashckpt":
        res = ckpt.load_into(model, opt)
        start = res.step
        source = ckpt.last_load.source
    elif resume_from:
        state = torch.load(resume_from)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"]
        source = "torch.load"
    t_load = time.time()
    if start:
        log(f"resumed from step {start} ({source}) in {1000 * (t_load - t_model):.1f} ms; "
            f"attempt {attempt}; import+init {t_pg - t_start:.3f} s")
    # wall-clock marks of this process's start-up, for benchmarks/recovery
    # (exec: the script's first line; under flashrun --standby, when the warm interpreter took over)
    log(f"phase_marks exec={_T_EXEC:.6f} imported={_T_IMPORTED:.6f} pg_start={t_start:.6f} "
        f"pg_done={t_pg:.6f} ckpt_ready={t_ckpt:.6f} model_ready={t_model:.6f} load_done={t_load:.6f}")
    log(f"resume_point t={t_load:.6f} start={start} source={source} "
        f"pg_init_s={t_pg - t_start:.4f} load_s={t_load - t_model:.4f}")

    def event(what, step, **more):
        if args.events:
            extra = "".join(f" {k}={v}" for k, v in more.items())
            with open(args.events, "a") as f:
                f.write(f"{what} step={step} world={world} rank={rank} digest={digest(model)}{extra}\n")

    if start:
        event("resume", start, source=source, attempt=attempt)
    params = list(model.parameters())
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, rank, args.width)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step == start + 1:
            log(f"first_step_done t={time.time():.6f} step={step}")
        if step % args.every == 0 or step == args.steps:
            t0 = time.perf_counter()
            if ckpt is not None:
                ckpt.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})
            else:
                os.makedirs(args.dir, exist_ok=True)
                path = os.path.join(args.dir, f"rank{rank}.pt")
                with open(path + ".tmp", "wb") as f:
                    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(path + ".tmp", path)
            log(f"step {step} loss {loss.item():.6f} snapshot {1000 * (time.perf_counter() - t0):.1f} ms")
            event("save", step)
        if step == args.crash_at_step and attempt == 0 and world > 1:
            dist.barrier()  # every rank has its snapshot of this step before the failure
        if step == args.crash_at_step and rank == args.crash_rank and attempt == 0:
            log(f"SIGKILL at step {step} (simulated failure)")
            os.kill(os.getpid(), signal.SIGKILL)

    if ckpt is not None:
        ckpt.close()
    d = digest(model)
    log(f"done: step {args.steps}, parameters digest {d}")
    event("done", args.steps)
    if rank == 0 and args.digest_out:
        with open(args.digest_out, "w") as f:
            f.write(d + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

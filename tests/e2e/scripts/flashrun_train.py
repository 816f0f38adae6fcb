"""A small gloo training job for flashrun tests.

Usage: flashrun_train.py OUT_DIR STEPS [--kill-rank R --kill-step K] [--step-seconds S]
Writes OUT_DIR/start_<rank>_<restart>.txt (wall time at process start, pid) and, when
done, OUT_DIR/done_<rank>.json. On the first attempt, rank R SIGKILLs itself at step K.
"""
import argparse
import json
import os
import signal
import sys
import time

started = time.time()
p = argparse.ArgumentParser()
p.add_argument("out_dir")
p.add_argument("steps", type=int)
p.add_argument("--kill-rank", type=int, default=-1)
p.add_argument("--kill-step", type=int, default=-1)
p.add_argument("--step-seconds", type=float, default=0.05)
p.add_argument("--hold-mb", type=int, default=0, help="state held per worker (touched), as a big model would")
args = p.parse_args()

rank = int(os.environ["RANK"])
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
os.makedirs(args.out_dir, exist_ok=True)
with open(os.path.join(args.out_dir, "start_%d_%d.txt" % (rank, restart)), "w") as f:
    f.write("%f %d\n" % (started, os.getpid()))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo", init_method="env://")
torch.manual_seed(0)
model = torch.nn.Linear(16, 1)
held = torch.ones(args.hold_mb * 1024 * 1024 // 4) if args.hold_mb else None
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(args.steps):
    if restart == 0 and rank == args.kill_rank and step == args.kill_step:
        with open(os.path.join(args.out_dir, "killed_at.txt"), "w") as f:
            f.write("%f\n" % time.time())
        os.kill(os.getpid(), signal.SIGKILL)
    x = torch.randn(8, 16)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    for param in model.parameters():
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()
    opt.step()
    if step == 0 or (restart > 0 and not os.path.exists(os.path.join(args.out_dir, "first_step_%d_%d.txt" % (rank, restart)))):
        with open(os.path.join(args.out_dir, "first_step_%d_%d.txt" % (rank, restart)), "w") as f:
            f.write("%f\n" % time.time())
    time.sleep(args.step_seconds)
dist.barrier()
with open(os.path.join(args.out_dir, "done_%d.json" % rank), "w") as f:
    json.dump({"rank": rank, "restart_count": restart, "world_size": dist.get_world_size(),
               "steps": args.steps}, f)
dist.destroy_process_group()

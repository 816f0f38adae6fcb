"""A small real training run used by the process-level tests.

    train_script.py DIR --steps N [--save-at K] [--resume] [--persist 0|1]
                        [--kill-after-save]

Prints one line per step: "loss <step> <float.hex>". With --save-at it saves
{"model", "optim", "sched", "rng", "extra"} after step K. With --resume it
loads the newest step first (load_into + RNG) and continues from there.
"""

import argparse
import os
import sys
import time

import torch

import flashckpt


def build():
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    return model, opt, sched


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--persist", type=int, default=1)
    ap.add_argument("--pad-mib", type=int, default=0, help="extra state to make saves bigger")
    ap.add_argument("--kill-after-save", action="store_true", help="wait to be killed after saving")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, opt, sched = build()
    ckpt = flashckpt.Checkpointer(a.dir, persist=bool(a.persist))
    start = 0
    if a.resume:
        res = ckpt.load_into(model, opt, sched, rng_key="rng")
        start = res.step
        assert res["extra"]["step"] == start
        print(f"resumed {start} {ckpt.last_load.source}", flush=True)
    pad = torch.randn(a.pad_mib << 18) if a.pad_mib else None
    for step in range(start + 1, a.steps + 1):
        x = torch.randn(32, 16)
        y = x.sum(dim=1, keepdim=True).sin()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        print(f"loss {step} {loss.item().hex()}", flush=True)
        if step == a.save_at:
            state = {"model": model.state_dict(), "optim": opt.state_dict(),
                     "sched": sched.state_dict(), "rng": flashckpt.rng_state(),
                     "extra": {"step": step, "pad": pad}}
            ckpt.save(step, state)
            print(f"saved {step}", flush=True)
            if a.kill_after_save:
                time.sleep(120)  # the test SIGKILLs us here
                sys.exit(3)
    ckpt.close()


if __name__ == "__main__":
    main()

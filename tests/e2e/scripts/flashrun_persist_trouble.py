"""A flashrun worker whose persists run into trouble made by the test.

    flashrun_persist_trouble.py DIR --steps N --remove-segment-after K
        saves steps 1..N (each waited for); after step K its shared-memory
        segment is unlinked, as systemd-logind's RemoveIPC=yes does.
    flashrun_persist_trouble.py DIR --steps N --block-last
        a file where step N's directory goes makes its persist fail; the
        script exits without waiting (the failure is reported at exit).
"""
import argparse
import os

import torch

import flashckpt

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--remove-segment-after", type=int, default=-1)
ap.add_argument("--block-last", action="store_true")
a = ap.parse_args()

ckpt = flashckpt.Checkpointer(a.dir)
for step in range(1, a.steps + 1):
    state = {"w": torch.full((1024,), float(step))}
    if step == a.steps and a.block_last:
        with open(os.path.join(a.dir, f"step-{step}"), "w") as f:
            f.write("in the way\n")
        ckpt.save(step, state)
        print(f"saved {step} unwaited", flush=True)
        break
    ckpt.save(step, state).wait()
    print(f"durable {step}", flush=True)
    if step == a.remove_segment_after:
        os.unlink(ckpt.memory_segment_path)
        print(f"removed {ckpt.memory_segment_path}", flush=True)

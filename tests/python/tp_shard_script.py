"""One rank of the tensor-parallel shard tests (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

A hand-sharded layer: the weight W (48 x 24) and Adam's two moments for it are
partitioned over the ranks, by rows or by columns (LAYOUT), each rank holding
only its block; the bias is replicated. Each step gathers W (gloo all_gather:
a copy), computes the loss and gradient of the whole layer on every rank
(identical everywhere, whatever the world size), and updates the rank's block
with an elementwise Adam: runs of any world size and layout are bit-identical,
so a resume can be compared exactly.

train <dir> <steps> <save_at> <out.pt> <layout>: saves step save_at (W, moments as
  flashckpt.Shard, bias replicated), trains on; rank 0 writes the final state and W at save_at.
resume <dir> <steps> <save_at> <out.pt> <layout>: a fresh world of any size and layout
  fills its blocks with load_resharded, trains on; rank 0 writes the final state.
same <dir> <save_at> <layout>: the world that saved loads its own step with ckpt.load()
  and compares the Shards it gets back with what it saved.
overlap <dir>: step 1 saved in rows; step 2 with rank 0's block grown into rank 1's: the
  save fails naming the key and the ranks, step 1 still loads.
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import flashckpt

ROWS, COLS = 48, 24
LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8


def box(layout, rank, world):
    if layout == "rows":
        n = ROWS // world
        return (rank * n, 0), (n, COLS)
    n = COLS // world
    return (0, rank * n), (ROWS, n)


def block(t, off, shape):
    return t[off[0]:off[0] + shape[0], off[1]:off[1] + shape[1]].contiguous()


def initial():
    g = torch.Generator().manual_seed(77)
    return torch.randn(ROWS, COLS, generator=g), torch.randn(ROWS, generator=g)


def batch(step):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(32, COLS, generator=g)


class Layer:
    def __init__(self, layout, rank, world):
        self.layout, self.off, self.shape = layout, *box(layout, rank, world)
        w, b = initial()
        self.w = block(w, self.off, self.shape)
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.bias = b
        self.world = world

    def full_w(self):
        parts = [torch.empty_like(self.w) for _ in range(self.world)]
        dist.all_gather(parts, self.w)
        return torch.cat(parts, dim=0 if self.layout == "rows" else 1)

    def step(self, step):
        w = self.full_w().requires_grad_(True)
        b = self.bias.clone().requires_grad_(True)
        loss = torch.tanh(batch(step) @ w.t() + b).pow(2).mean()
        gw, gb = torch.autograd.grad(loss, [w, b])
        g = block(gw, self.off, self.shape)
        self.m.mul_(B1).add_(g, alpha=1 - B1)
        self.v.mul_(B2).addcmul_(g, g, value=1 - B2)
        mhat = self.m / (1 - B1 ** step)
        vhat = self.v / (1 - B2 ** step)
        self.w.sub_(LR * mhat / (vhat.sqrt() + EPS))
        self.bias.sub_(LR * gb)

    def state(self):
        def shard(t):
            return flashckpt.Shard(t, (ROWS, COLS), self.off)
        return {"tp": {"w": shard(self.w), "exp_avg": shard(self.m), "exp_avg_sq": shard(self.v)},
                "shared": {"bias": self.bias}}

    def gathered(self):
        out = {}
        for name, t in (("w", self.w), ("exp_avg", self.m), ("exp_avg_sq", self.v)):
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t)
            out[name] = torch.cat(parts, dim=0 if self.layout == "rows" else 1)
        out["bias"] = self.bias.clone()
        return out


def main():
    mode, directory = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"rank": rank, "world": world}
    if mode in ("train", "resume"):
        steps, save_at, out, layout = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
        layer = Layer(layout, rank, world)
        first, at_save = 1, None
        if mode == "resume":
            got = flashckpt.load_resharded(directory, save_at, state=layer.state())
            result["keys"] = sorted(got)
            first = save_at + 1
        with flashckpt.Checkpointer(directory, replicated=("shared",), commit_timeout=60,
                                    run_id=f"tp-{mode}-{world}") as ckpt:
            for step in range(first, steps + 1):
                layer.step(step)
                if mode == "train" and step == save_at:
                    ckpt.save(step, layer.state()).wait(timeout=60)
                    at_save = layer.gathered()
            ckpt.unlink_memory()
        final = layer.gathered()
        if rank == 0:
            torch.save({"final": final, "at_save": at_save}, out)
    elif mode == "same":
        save_at, layout = int(sys.argv[3]), sys.argv[4]
        with flashckpt.Checkpointer(directory, replicated=("shared",), commit_timeout=60,
                                    run_id="tp-same") as ckpt:
            got = ckpt.load(save_at)
            ckpt.unlink_memory()
        sh = got["tp"]["w"]
        off, shape = box(layout, rank, world)
        full = torch.load(sys.argv[5])["at_save"]["w"]
        result["is_shard"] = isinstance(sh, flashckpt.Shard)
        result["box"] = [list(sh.offsets), list(sh.tensor.shape), list(sh.global_shape)]
        result["equal"] = bool(torch.equal(sh.tensor, block(full, off, shape)))
    elif mode == "overlap":
        layer = Layer("rows", rank, world)
        with flashckpt.Checkpointer(directory, replicated=("shared",), commit_timeout=60,
                                    run_id="tp-overlap") as ckpt:
            ckpt.save(1, layer.state()).wait(timeout=60)
            state = layer.state()
            full = layer.full_w()  # a collective: on every rank
            if rank == 0:  # one row more than its block: into rank 1's
                w = full[:ROWS // world + 1].contiguous()
                state["tp"]["w"] = flashckpt.Shard(w, (ROWS, COLS), (0, 0))
            try:
                ckpt.save(2, state).wait(timeout=60)
                result["error"] = None
            except flashckpt.FlashCkptError as e:
                result["error"] = str(e)
            ckpt.unlink_memory()
        dist.barrier()
        layer2 = Layer("rows", rank, world)
        layer2.w.zero_()
        flashckpt.load_resharded(directory, 1, state=layer2.state())
        result["step1_loads"] = bool(torch.equal(layer2.w, Layer("rows", rank, world).w))
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

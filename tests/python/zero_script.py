"""One rank of the ZeroRedundancyOptimizer tests (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

train <dir> <steps> <save_at> <out.pt>: a replicated model + ZeRO(Adam) from a fixed seed; saves its
  shard at step save_at (model replicated), trains on to `steps`; rank 0 writes the
  final parameters to out.pt (the run that never stopped).
resume <dir> <steps> <save_at> <out.pt>: a fresh world (any size) loads step save_at
  with load_resharded, trains on to `steps`; rank 0 writes the final parameters.
overlap <dir>: every rank saves the state of every parameter as its "shard": the load
  must refuse it, naming the parameter and the ranks.
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

import flashckpt


def make():
    # Every rank computes the gradient of the whole batch (the data-parallel
    # result without an allreduce, whose summation order would depend on DDP's
    # bucket layout): runs of any world size are then bit-identical, and a
    # resume must reproduce them exactly.
    torch.manual_seed(4321)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64),
                                torch.nn.Linear(64, 8))
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-2)
    return model, zero


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(48, 64, generator=g)


def train_step(model, zero, step):
    loss = model(batch(step)).pow(2).mean()
    zero.zero_grad()
    loss.backward()
    zero.step()


def main():
    mode, directory = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, zero = make()
    result = {"rank": rank, "world": world}
    if mode in ("train", "resume"):
        steps, save_at, out = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        first = 1
        if mode == "resume":
            flashckpt.load_resharded(directory, save_at, model=model, optimizer=zero)
            first = save_at + 1
            result["owned"] = sorted(zero._param_to_index[p] for g in zero.optim.param_groups for p in g["params"])
        with flashckpt.Checkpointer(directory, replicated=("model",), commit_timeout=60,
                                    run_id=f"zero-{mode}-{world}") as ckpt:
            for step in range(first, steps + 1):
                train_step(model, zero, step)
                if mode == "train" and step == save_at:
                    ckpt.save(step, {"model": model.state_dict(),
                                     "optimizer": flashckpt.zero_state_dict(zero)}).wait(timeout=60)
            ckpt.unlink_memory()
        if rank == 0:
            torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    elif mode == "overlap":
        train_step(model, zero, 1)
        full = flashckpt.zero_state_dict(zero)
        # Claim every parameter's state: each rank's local state, copied to all indices.
        some = next(iter(full["state"].values()))
        full["state"] = {i: {k: v.clone() for k, v in some.items()} for i in range(len(zero._index_to_param))}
        with flashckpt.Checkpointer(directory, commit_timeout=60, run_id=f"zero-overlap-{world}") as ckpt:
            ckpt.save(1, {"optimizer": full}).wait(timeout=60)
            ckpt.unlink_memory()
        dist.barrier()
        try:
            flashckpt.load_resharded(directory, 1, optimizer=zero)
            result["error"] = None
        except flashckpt.FlashCkptError as e:
            result["error"] = str(e)
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

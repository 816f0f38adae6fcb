"""One rank of the replicated-state tests (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

save <dir> <expected.pt>: 4-rank DDP training, step 10 saved with the model and
  the optimizer replicated; rank 0 writes the live state to expected.pt.
load <dir> <expected.pt>: any world size loads step 10 from storage (load()
  and load_into() a fresh model) and checks it bit-exact against expected.pt.
diverge <dir>: rank 1's parameters drift; the commit must fail naming them.
memsave <dir> <expected.pt>: as save, but step 10 stays in shared memory only (no persist).
resume <dir> <expected.pt>: every rank asks restorable_step(), and loads into a fresh model
  what it answers (load_into() without a step); memsave's world of 2 left its segments
  for ranks 0 and 1 only. `unlink` as a fourth argument removes this rank's segment.
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import flashckpt


def make_model():
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256),
                               torch.nn.LayerNorm(256))


def train(model, opt, steps):
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(steps):
        x = torch.randn(16, 256, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], f"{path}[{k!r}]") for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main():
    mode, directory = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"rank": rank, "world": world}
    model = DDP(make_model())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    memory_only = mode in ("memsave", "resume")
    with flashckpt.Checkpointer(directory, commit_timeout=60, replicated=("model", "optimizer"),
                                run_id="rep-grow" if memory_only else f"rep-{mode}-{world}",
                                persist=not memory_only) as ckpt:
        result["segment"] = ckpt.memory_segment_path
        if mode == "save":
            train(model, opt, 3)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rank": rank}
            ckpt.save(10, state).wait(timeout=60)
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, sys.argv[3])
            dist.barrier()
            back = ckpt.load(10, prefer_memory=False)
            result["source"] = ckpt.last_load.source
            result["same"] = same(back["model"], state["model"]) and same(back["optimizer"], state["optimizer"])
            result["rank_back"] = back["rank"]
            ckpt.unlink_memory()
        elif mode == "load":
            expected = torch.load(sys.argv[3])
            back = ckpt.load(10)
            result["source"] = ckpt.last_load.source
            result["same"] = same(back["model"], expected["model"]) and same(back["optimizer"], expected["optimizer"])
            fresh = DDP(make_model())
            fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
            ptrs = [p.data_ptr() for p in fresh.parameters()]
            ckpt.load_into(fresh, fresh_opt, step=10, optimizer_key="optimizer")
            result["into_source"] = ckpt.last_load.source
            result["into_in_place"] = ptrs == [p.data_ptr() for p in fresh.parameters()]
            result["into_same"] = (same(fresh.state_dict(), expected["model"]) and
                                   same(fresh_opt.state_dict(), expected["optimizer"]))
            # Training goes on from there, in step on every rank.
            train(fresh, fresh_opt, 1)
            ckpt.save(10 + world, {"model": fresh.state_dict(), "optimizer": fresh_opt.state_dict()}).wait(timeout=60)
            ckpt.unlink_memory()
        elif mode == "memsave":
            train(model, opt, 3)
            ckpt.save(10, {"model": model.state_dict(), "optimizer": opt.state_dict()}).wait(timeout=60)
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, sys.argv[3])
            result["memory"] = ckpt.latest_memory_step()
        elif mode == "resume":
            result["latest"] = ckpt.latest_step()  # this rank's own view
            result["restorable"] = ckpt.restorable_step()
            if result["restorable"] is not None:
                expected = torch.load(sys.argv[3])
                fresh = DDP(make_model())
                fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
                res = ckpt.load_into(fresh, fresh_opt, optimizer_key="optimizer")
                result["loaded"] = res.step
                result["into_source"] = ckpt.last_load.source
                result["into_same"] = (same(fresh.state_dict(), expected["model"]) and
                                       same(fresh_opt.state_dict(), expected["optimizer"]))
            dist.barrier()  # a collective after the decision: every rank took the same path
            if len(sys.argv) > 4 and sys.argv[4] == "unlink":
                ckpt.unlink_memory()
        elif mode == "diverge":
            train(model, opt, 1)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            ckpt.save(1, state).wait(timeout=60)
            if rank == 1:
                with torch.no_grad():
                    model.module[2].bias.add_(1.0)
            try:
                ckpt.save(2, {"model": model.state_dict(), "optimizer": opt.state_dict()}).wait(timeout=60)
                result["error"] = None
            except flashckpt.FlashCkptError as e:
                result["error"] = str(e)
            dist.barrier()
            result["committed"] = ckpt.latest_committed_step()
            ckpt.unlink_memory()
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

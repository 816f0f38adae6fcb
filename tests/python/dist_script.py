"""One rank of the two-rank gloo test (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import flashckpt


def main():
    directory = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    result = {"rank": rank}
    # persist_every=3: step 1 is persisted and committed, 2 and 3 stay in memory.
    with flashckpt.Checkpointer(directory, commit_timeout=60, persist_every=3) as ckpt:
        assert (ckpt.rank, ckpt.world_size) == (rank, 2)
        for step in (1, 2):
            h = ckpt.save(step, {"w": torch.full((1000,), float(rank * 100 + step)),
                                 "extra": {"rank": rank, "step": step}})
            h.wait(timeout=60)
        dist.barrier()
        if rank == 1:
            # Only rank 1 has step 3 (in memory): load() must still agree on 2.
            ckpt.save(3, {"w": torch.zeros(1), "extra": {"rank": rank, "step": 3}})
        dist.barrier()
        state = ckpt.load()
        result["loaded_step"] = ckpt.last_load.step
        result["value"] = state["w"][0].item()
        result["extra"] = state["extra"]
        result["latest"] = ckpt.latest_step()
        # Explicit step: every rank asks for 1.
        result["step1"] = ckpt.load(1)["extra"]["step"]
        dist.barrier()
        result["committed"] = ckpt.latest_committed_step()
        ckpt.unlink_memory()  # the newest steps are in memory only
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

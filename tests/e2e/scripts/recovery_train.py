"""examples/python/train.py for the recovery e2e tests, with the fault injection
meant for the agent kept away from the worker: FLASHCKPT_CRASH_AT /
FLASHCKPT_CRASH_TRACE are set on the flashrun process (so the agent dies at its
N-th crash point while persisting) and must not count the worker's own crash
points. The core reads them once, at the first crash point, so dropping them
before flashckpt is imported is enough."""
import os
import runpy
import sys

for name in ("FLASHCKPT_CRASH_AT", "FLASHCKPT_CRASH_TRACE"):
    os.environ.pop(name, None)

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "examples", "python", "train.py")
sys.argv[0] = os.path.abspath(TRAIN)
runpy.run_path(sys.argv[0], run_name="__main__")

"""Writes this worker's environment as JSON to <out_dir>/env_<RANK>.json."""
import json
import os
import sys

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, "env_%s.json" % os.environ.get("RANK", "x")), "w") as f:
    json.dump(dict(os.environ), f, indent=1, sort_keys=True)
print("rank", os.environ.get("RANK"), "done")

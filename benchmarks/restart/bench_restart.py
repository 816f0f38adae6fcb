"""Restart latency, flashrun against torchrun on the same job in the same run.

A 2-worker gloo job (tests/e2e/scripts/flashrun_train.py) where rank 1 SIGKILLs
itself at step K. Measured from the kill (timestamp written just before it):
  restart_s     : until every replacement worker process runs again (its first
                  line of Python; detect + stop + re-rendezvous + spawn)
  first_step_s  : until every replacement worker finished a training step again
                  (adds `import torch`, init_process_group, the first all-reduce)
Both launchers: --standalone --nproc_per_node 2 --max_restarts 1
--monitor_interval 0.1 (torchrun's fastest setting) -r 1 -t 1 (Debian's torchrun
crashes without them). Medians of --repeats runs; JSON to --out.

Usage: /usr/bin/python3 benchmarks/restart/bench_restart.py [--repeats 3] [--hold-mb 0,1024]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "tests", "e2e", "scripts", "flashrun_train.py")


def flashrun_binary():
    for c in (os.environ.get("FLASHRUN_BIN", ""), os.path.join(REPO, "build", "bin", "flashrun"),
              os.path.join(REPO, "build-launcher", "bin", "flashrun")):
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit("flashrun binary not found: set FLASHRUN_BIN")


def read_time(path):
    with open(path) as f:
        return float(f.read().split()[0])


def one_run(launcher_cmd, hold_mb, steps=60, kill_step=8):
    out = tempfile.mkdtemp(prefix="bench_restart_")
    try:
        cmd = launcher_cmd + ["--standalone", "--nproc_per_node", "2", "--max_restarts", "1",
                              "--monitor_interval", "0.1", "-r", "1", "-t", "1",
                              TRAIN, out, str(steps), "--kill-rank", "1", "--kill-step", str(kill_step),
                              "--step-seconds", "0.05", "--hold-mb", str(hold_mb)]
        env = dict(os.environ, PYTHON_EXEC="/usr/bin/python3", OMP_NUM_THREADS="1")
        p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           timeout=300, start_new_session=True)
        if p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (cmd[0], p.returncode, p.stderr[-2000:]))
        killed = read_time(os.path.join(out, "killed_at.txt"))
        restarted = max(read_time(os.path.join(out, "start_%d_1.txt" % r)) for r in (0, 1))
        first_step = max(read_time(os.path.join(out, "first_step_%d_1.txt" % r)) for r in (0, 1))
        return {"restart_s": restarted - killed, "first_step_s": first_step - killed}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hold-mb", default="0,1024")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "restart", "results.json"))
    args = ap.parse_args()
    launchers = {"torchrun": ["/usr/bin/torchrun"], "flashrun": [flashrun_binary()]}
    results = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
               "job": "2 gloo workers, standalone, rank 1 SIGKILLs itself at step 8, --monitor_interval 0.1",
               "configs": []}
    for hold in [int(x) for x in args.hold_mb.split(",")]:
        config = {"hold_mb_per_worker": hold, "runs": {}, "median": {}}
        for i in range(args.repeats):
            for name, cmd in launchers.items():  # interleaved, so both see the same machine state
                r = one_run(cmd, hold)
                config["runs"].setdefault(name, []).append(r)
                print("hold=%d MiB run %d %-8s restart %.3f s, first step %.3f s" %
                      (hold, i, name, r["restart_s"], r["first_step_s"]), flush=True)
        for name, runs in config["runs"].items():
            config["median"][name] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        t, f = config["median"]["torchrun"], config["median"]["flashrun"]
        config["flashrun_over_torchrun"] = {k: round(f[k] / t[k], 3) for k in t}
        results["configs"].append(config)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(json.dumps([{c["hold_mb_per_worker"]: c["median"]} for c in results["configs"]]))


if __name__ == "__main__":
    main()

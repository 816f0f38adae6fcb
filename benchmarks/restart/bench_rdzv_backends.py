"""Worker-kill recovery across two agents, the built-in rendezvous against etcd-v3.

Two flashrun agents on 127.0.0.1 (--nnodes 2, one gloo worker each, the job of
bench_restart.py: tests/e2e/scripts/flashrun_train.py); the worker of node b
(rank 1) SIGKILLs itself at step K. Node b's agent sees the exit, stops, and
joins the next round; node a's agent hears that the round is over (the c10d
server's answer to its long poll / its etcd watch), stops its worker and joins
too. Measured from the kill (timestamp written just before it):
  restart_s     : until both replacement workers run again (their first line of Python)
  first_step_s  : until both finished a training step again
The same flags for both backends (keep-alives every 0.5 s, 2 missed = dead,
--monitor-interval 0.1); etcd is one member on 127.0.0.1 with its data on a
tmpfs (/dev/shm), started by this script. Runs interleaved, medians; JSON to --out.

Usage: /usr/bin/python3 benchmarks/restart/bench_rdzv_backends.py [--repeats 5]
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "restart"))
from bench_restart import TRAIN, flashrun_binary, read_time  # noqa: E402

CONF = "keep_alive_interval=0.5,keep_alive_max_attempt=2,last_call_timeout=1,join_timeout=60"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One member on 127.0.0.1, data on tmpfs, killed and removed by stop()."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fck-bench-etcd-", dir="/dev/shm")
        port, peer = free_port(), free_port()
        self.endpoint = "127.0.0.1:%d" % port
        url, peer_url = "http://" + self.endpoint, "http://127.0.0.1:%d" % peer
        self.proc = subprocess.Popen(
            ["etcd", "--name", "m0", "--data-dir", os.path.join(self.dir, "data"), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls",
             peer_url, "--initial-cluster", "m0=" + peer_url, "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                req = urllib.request.Request(url + "/v3/kv/range", data=b'{"key":"AA=="}',
                                             headers={"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=1).read()
                return
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise SystemExit("etcd did not come up")

    def version(self):
        return subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def one_run(flashrun, backend, endpoint, run, steps=60, kill_step=8):
    out = tempfile.mkdtemp(prefix="bench_rdzv_")
    procs = []
    try:
        env = dict(os.environ, PYTHON_EXEC="/usr/bin/python3", OMP_NUM_THREADS="1")
        for name in ("node-a", "node-b"):
            cmd = [flashrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", backend,
                   "--rdzv-endpoint", endpoint, "--rdzv-id", "bench-%s-%d" % (backend, run), "--rdzv-conf", CONF,
                   "--node-name", name, "--local-addr", "127.0.0.1", "--max-restarts", "1",
                   "--monitor-interval", "0.1", "-r", "1", "-t", "1",
                   TRAIN, out, str(steps), "--kill-rank", "1", "--kill-step", str(kill_step), "--step-seconds", "0.05"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
            if name == "node-a":
                # node a joins first on both backends, so that it has group rank 0 (and hosts the c10d
                # server): the same layout, the killed worker (rank 1) on node b
                time.sleep(0.5)
        for p in procs:
            _, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError("%s flashrun failed (%d): %s" % (backend, p.returncode, err[-2000:]))
        killed = read_time(os.path.join(out, "killed_at.txt"))
        restarted = max(read_time(os.path.join(out, "start_%d_1.txt" % r)) for r in (0, 1))
        first_step = max(read_time(os.path.join(out, "first_step_%d_1.txt" % r)) for r in (0, 1))
        return {"restart_s": restarted - killed, "first_step_s": first_step - killed}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "recovery_rdzv_backends.json"))
    args = ap.parse_args()
    flashrun = flashrun_binary()
    etcd = Etcd()
    try:
        results = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
                   "job": "2 flashrun agents on 127.0.0.1, one gloo worker each; rank 1 SIGKILLs itself at step 8; "
                          "--rdzv-conf " + CONF + "; --monitor-interval 0.1",
                   "etcd": {"version": etcd.version(), "data_dir": "tmpfs (/dev/shm)"},
                   "runs": {}, "median": {}}
        for i in range(args.repeats):
            for backend in ("c10d", "etcd-v3"):  # interleaved: both see the same machine state
                endpoint = "127.0.0.1:%d" % free_port() if backend == "c10d" else etcd.endpoint
                r = one_run(flashrun, backend, endpoint, i)
                results["runs"].setdefault(backend, []).append(r)
                print("run %d %-7s restart %.3f s, first step %.3f s" % (i, backend, r["restart_s"],
                                                                         r["first_step_s"]), flush=True)
        for name, runs in results["runs"].items():
            results["median"][name] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        c, e = results["median"]["c10d"], results["median"]["etcd-v3"]
        results["etcd_minus_builtin_s"] = {k: round(e[k] - c[k], 3) for k in c}
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
        print(json.dumps(results["median"]), json.dumps(results["etcd_minus_builtin_s"]))
    finally:
        etcd.stop()


if __name__ == "__main__":
    main()

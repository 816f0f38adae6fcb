"""Recovery time after a SIGKILL: flashrun + flashckpt (from memory) against torchrun + torch.save/load.

The same job in one run (examples/python/train.py, 2 gloo ranks on this node,
an MLP + Adam sized so the node holds --gib GiB of training state: parameters
plus the two Adam moments). Rank 1 SIGKILLs itself after step --crash-at-step;
both jobs snapshot every --every steps:

  (a) flashrun --standalone --standby ... train.py --ckpt flashckpt
      (restores from the agent's shared memory; the restarted workers are the
      warm standby interpreters flashrun keeps, torch already imported)
  (a0) the same without --standby ("flashrun_cold": fresh interpreters)
  (b) torchrun --standalone --monitor_interval 0.1 ... train.py --ckpt torch
      (torch.save + fsync every --every steps, torch.load on restart)

Phases, from the kill (the `SIGKILL at step N` log line, written just before
os.kill) until every rank has its state and begins its next step. Worker-side
marks are the latest rank's (the job resumes when the last rank does), so the
phases add up to the resume point:

  detect      kill -> flashrun notices the failure            (flashrun trace)
  stop        -> the surviving workers are stopped            (flashrun trace)
  rendezvous  -> the new round is complete                    (flashrun trace)
  spawn       -> every new worker runs its first line of Python (fork/exec + interpreter start;
                 with --standby: the hand-over to the waiting interpreter)
  (torchrun has no such marks: its detect+stop+rendezvous+spawn is one phase, kill -> first line)
  import      -> `import torch` etc. done
  pg_init     -> dist.init_process_group done (gloo; includes waiting for the other rank)
  ckpt_setup  -> knows what to load (flashckpt: Checkpointer() + latest_step(); torch: a path check)
  model       -> model and optimizer built (without random init: the load overwrites it; same in all)
  load        -> state restored into model and optimizer (resume point)
  first_step  -> the next training step completed on every rank

Also, in fresh processes (one per rank, at the same time, one thread like the
workers): a copy of the per-rank state size into freshly allocated memory
(`torch.empty` + `copy_`, page faults included, which is what a restarted
process restores into) and into already-touched memory.

Usage:
  /usr/bin/python3 benchmarks/recovery/bench_recovery.py [--gib 2] [--repeats 3]
Writes benchmarks/results/recovery.json and benchmarks/results/recovery_phases.png.
"""
import argparse
import atexit
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "python", "train.py")
RESULTS = os.path.join(REPO, "benchmarks", "results")
PY = "/usr/bin/python3"
NPROC = 2

FLASH_PHASES = ["detect", "stop", "rendezvous", "spawn"]
TORCH_PHASES = ["detect+stop+rendezvous+spawn"]
WORKER_PHASES = ["import", "pg_init", "ckpt_setup", "model", "load"]
KINDS = ["flashrun", "flashrun_cold", "torchrun"]
LABELS = {"flashrun": "(a) flashrun --standby", "flashrun_cold": "(a0) flashrun", "torchrun": "(b) torchrun"}

_live = []  # Popen objects (each the leader of its own session / process group)
_tmpdirs = []


def flashrun_binary():
    for c in (os.environ.get("FLASHRUN_BIN", ""), os.path.join(REPO, "build", "bin", "flashrun"),
              os.path.join(REPO, "build-launcher", "bin", "flashrun")):
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit("flashrun binary not found: set FLASHRUN_BIN")


# -- cleanup ----------------------------------------------------------------
def _pids_mentioning(token):
    """Processes whose command line contains `token` (our unique temp dir)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                if token.encode() in f.read():
                    pids.append(int(d))
        except OSError:
            pass
    return pids


def _kill_group(p, grace=5.0):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)  # flashrun/torchrun stop their workers on SIGTERM
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _cleanup():
    while _live:
        _kill_group(_live.pop())
    for d in list(_tmpdirs):
        for pid in _pids_mentioning(d):  # stragglers that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(d, ignore_errors=True)
        _tmpdirs.remove(d)


def _on_signal(signum, frame):
    _cleanup()
    sys.exit(128 + signum)


def _remove_shm(run_id):
    if not run_id:
        return
    for name in os.listdir("/dev/shm"):
        if name.startswith("flashckpt-" + run_id):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


# -- a private copy of what the jobs run ---------------------------------------
def snapshot_code():
    """Copies flashrun, the flashckpt package + extension and train.py into a temp dir.

    The source tree is shared: a rebuild of build/ between a job's first attempt
    and its restart mixes two builds (an old segment read by a new extension).
    Every job of this run uses the same copy instead.
    """
    snap = tempfile.mkdtemp(prefix="bench_recovery_code_")
    _tmpdirs.append(snap)
    src_bin = flashrun_binary()
    os.makedirs(os.path.join(snap, "bin"))
    shutil.copy2(src_bin, os.path.join(snap, "bin", "flashrun"))
    shutil.copytree(os.path.join(REPO, "python", "flashckpt"), os.path.join(snap, "python", "flashckpt"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    build = os.environ.get("FLASHCKPT_BUILD_DIR", os.path.join(REPO, "build"))
    libs = [f for f in os.listdir(os.path.join(build, "python", "flashckpt")) if f.endswith(".so")]
    ext = [f for f in libs if f.startswith("_C")]
    if not ext:
        raise SystemExit("no flashckpt extension in %s/python/flashckpt: build it first" % build)
    os.makedirs(os.path.join(snap, "build", "python", "flashckpt"))
    for f in libs:
        shutil.copy2(os.path.join(build, "python", "flashckpt", f), os.path.join(snap, "build", "python", "flashckpt", f))
    shutil.copy2(TRAIN, os.path.join(snap, "train.py"))
    git = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    info = {"flashrun": src_bin, "flashrun_mtime": time.ctime(os.path.getmtime(src_bin)),
            "extension": os.path.join(build, "python", "flashckpt", ext[0]),
            "extension_mtime": time.ctime(os.path.getmtime(os.path.join(build, "python", "flashckpt", ext[0]))),
            "git": git}
    # Fail fast on a package/extension mismatch (e.g. python/ edited, build/ not rebuilt yet).
    probe = os.path.join(snap, "probe")
    chk = subprocess.run(
        [PY, "-c", "import flashckpt; c = flashckpt.Checkpointer(%r, persist=False); c.unlink_memory(); c.close()" % probe],
        env=dict(os.environ, PYTHONPATH=os.path.join(snap, "python"), FLASHCKPT_BUILD_DIR=os.path.join(snap, "build"),
                 FLASHCKPT_RUN_ID="bench-recovery-probe-%d" % os.getpid()),
        capture_output=True, text=True, timeout=120)
    if chk.returncode != 0:
        raise SystemExit("flashckpt from %s and %s does not work together (a rebuild in progress?):\n%s"
                         % (os.path.join(REPO, "python"), build, chk.stderr[-2000:]))
    return snap, info


CODE = {}  # set by main(): flashrun, pythonpath, build_dir, train


# -- sizing -----------------------------------------------------------------
def model_shape(gib):
    """width, depth of train.py's MLP so that NPROC ranks hold `gib` GiB (params + 2 Adam moments)."""
    params = gib * 2**30 / NPROC / 12
    depth = 5
    width = max(64, int(round(math.sqrt(params / depth) / 8)) * 8)
    return width, depth


def n_params(width, depth):
    return depth * (width * width + width) + width + 1


# -- one job ----------------------------------------------------------------
LINE = re.compile(r"\[train rank(\d+) ([0-9.]+)\] (.*)")
TRACE = re.compile(r"\[flashrun\] trace ([0-9.]+) (.*)")


def kv(text):
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S+)", text))


def one_run(kind, cfg, keep_logs):
    tmp = tempfile.mkdtemp(prefix="bench_recovery_")
    _tmpdirs.append(tmp)
    ckdir = os.path.join(tmp, "ckpt")
    train_args = [CODE["train"], "--dir", ckdir, "--steps", str(cfg["crash_at_step"] + 1), "--every", str(cfg["every"]),
                  "--crash-at-step", str(cfg["crash_at_step"]), "--crash-rank", "1",
                  "--width", str(cfg["width"]), "--depth", str(cfg["depth"]),
                  "--digest-out", os.path.join(tmp, "digest.txt")]
    common = ["--standalone", "--nproc_per_node", str(NPROC), "--max_restarts", "1", "--monitor_interval", "0.1"]
    env = dict(os.environ, PYTHON_EXEC=PY, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=CODE["pythonpath"] + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FLASHCKPT_BUILD_DIR=CODE["build_dir"])
    if kind.startswith("flashrun"):
        standby = ["--standby", "--standby-import", "torch,flashckpt"] if kind == "flashrun" else []
        cmd = ([CODE["flashrun"]] + common + standby + ["--log-dir", os.path.join(tmp, "logs")] + train_args +
               ["--ckpt", "flashckpt"])
        env["FLASHRUN_TRACE_RESTART"] = "1"
    else:
        cmd = ["/usr/bin/torchrun"] + common + ["-r", "1", "-t", "1"] + train_args + ["--ckpt", "torch"]
    log_path = os.path.join(tmp, "out.txt")
    run_id = None
    t0 = time.time()
    with open(log_path, "w") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
        _live.append(p)
        try:
            rc = p.wait(cfg["timeout"])
        except subprocess.TimeoutExpired:
            rc = "timeout"
        _kill_group(p)
        _live.remove(p)
    wall = time.time() - t0
    with open(log_path, errors="replace") as f:
        text = f.read()
    m = re.search(r"run '([^']+)'", text)
    run_id = m.group(1) if m else None
    try:
        if rc != 0:
            raise RuntimeError("%s failed (%s); log tail:\n%s" % (kind, rc, text[-3000:]))
        res = parse(kind, text, cfg)
        with open(os.path.join(tmp, "digest.txt")) as f:
            res["final_digest"] = f.read().strip()
        res["wall_s"] = round(wall, 2)
        return res
    finally:
        _remove_shm(run_id)
        if keep_logs:
            dst = os.path.join(keep_logs, "%s_%d.log" % (kind, int(t0)))
            os.makedirs(keep_logs, exist_ok=True)
            shutil.copy(log_path, dst)
        for pid in _pids_mentioning(tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        _tmpdirs.remove(tmp)


def parse(kind, text, cfg):
    kill_t = None
    marks, resume, first = {}, {}, {}
    traces = []
    for line in text.splitlines():
        m = TRACE.search(line)
        if m:
            traces.append((float(m.group(1)), m.group(2).strip()))
            continue
        m = LINE.search(line)
        if not m:
            continue
        rank, t, msg = int(m.group(1)), float(m.group(2)), m.group(3)
        if msg.startswith("SIGKILL at step"):
            kill_t = t
        elif kill_t is not None and msg.startswith("phase_marks"):
            marks[rank] = {k: float(v) for k, v in kv(msg).items()}
        elif kill_t is not None and msg.startswith("resume_point"):
            resume[rank] = kv(msg)
        elif kill_t is not None and msg.startswith("first_step_done"):
            first[rank] = float(kv(msg)["t"])
    if kill_t is None or len(marks) != NPROC or len(resume) != NPROC or len(first) != NPROC:
        raise RuntimeError("%s: missing marks after the kill (kill=%s, ranks with marks %s, resumed %s, stepped %s)"
                           % (kind, kill_t, sorted(marks), sorted(resume), sorted(first)))
    # The kill line carries a millisecond timestamp written just before os.kill.
    last = {k: max(mk[k] for mk in marks.values()) for k in next(iter(marks.values()))}
    ph = {}
    if kind.startswith("flashrun"):
        after = [(t, w) for t, w in traces if t >= kill_t - 0.002]
        tr = {}
        for t, w in after:
            tr.setdefault(w, t)
        need = ["failure noticed", "workers stopped", "round complete", "workers started"]
        if any(w not in tr for w in need):
            raise RuntimeError("flashrun trace marks missing after the kill: %s" % after)
        ph["detect"] = tr["failure noticed"] - kill_t
        ph["stop"] = tr["workers stopped"] - tr["failure noticed"]
        ph["rendezvous"] = tr["round complete"] - tr["workers stopped"]
        ph["spawn"] = last["exec"] - tr["round complete"]
        extra = {"spawn_until_workers_started_s": tr["workers started"] - tr["round complete"]}
        m = re.search(r"attempt 1, (\d+)/\d+ workers from warm standbys", text)
        extra["workers_from_standbys"] = int(m.group(1)) if m else 0
    else:
        ph["detect+stop+rendezvous+spawn"] = last["exec"] - kill_t
        extra = {}
    ph["import"] = last["imported"] - last["exec"]
    ph["pg_init"] = last["pg_done"] - last["imported"]
    ph["ckpt_setup"] = last["ckpt_ready"] - last["pg_done"]
    ph["model"] = last["model_ready"] - last["ckpt_ready"]
    ph["load"] = last["load_done"] - last["model_ready"]
    resume_s = last["load_done"] - kill_t
    first_s = max(first.values()) - kill_t
    ph["first_step"] = first_s - resume_s
    starts = sorted({int(r["start"]) for r in resume.values()})
    last_snapshot = (cfg["crash_at_step"] // cfg["every"]) * cfg["every"]
    res = {
        "phases_s": {k: round(v, 4) for k, v in ph.items()},
        "resume_point_s": round(resume_s, 4),
        "first_step_done_s": round(first_s, 4),
        "load_per_rank_s": {r: round(mk["load_done"] - mk["model_ready"], 4) for r, mk in sorted(marks.items())},
        "pg_init_per_rank_s": {r: round(mk["pg_done"] - mk["pg_start"], 4) for r, mk in sorted(marks.items())},
        "sources": sorted({r["source"] for r in resume.values()}),
        "resumed_step": starts[0] if len(starts) == 1 else starts,
        "crash_step": cfg["crash_at_step"],
        "last_snapshot_step": last_snapshot,
        "steps_redone": cfg["crash_at_step"] - starts[0],
        "steps_lost_past_last_snapshot": last_snapshot - min(starts),
    }
    res.update({k: round(v, 4) if isinstance(v, float) else v for k, v in extra.items()})
    return res


# -- memcpy baseline --------------------------------------------------------
MEMCPY_CHILD = r"""
import sys, time
import torch
torch.set_num_threads(1)
n, start_at = int(sys.argv[1]), float(sys.argv[2])
src = torch.empty(n, dtype=torch.uint8).fill_(7)      # a ready source (touched)
time.sleep(max(0.0, start_at - time.time()))
t0 = time.perf_counter()
dst = torch.empty(n, dtype=torch.uint8)               # fresh memory: page faults included
dst.copy_(src)
t1 = time.perf_counter()
dst.copy_(src)                                        # the same pages again: already touched
t2 = time.perf_counter()
print("%.6f %.6f" % (t1 - t0, t2 - t1))
"""


def memcpy_baseline(nbytes_per_rank):
    """NPROC fresh processes at once (like the ranks), each copying one rank's state."""
    start_at = time.time() + 4.0 + nbytes_per_rank / 2**30 * 2.0
    procs = [subprocess.Popen([PY, "-c", MEMCPY_CHILD, str(nbytes_per_rank), repr(start_at)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(NPROC)]
    _live.extend(procs)
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outs.append([float(x) for x in out.split()])
        _live.remove(p)
    return {"fresh_s": round(max(o[0] for o in outs), 4), "touched_s": round(max(o[1] for o in outs), 4)}


# -- report -----------------------------------------------------------------
def median_run(runs):
    med = {"phases_s": {k: round(statistics.median(r["phases_s"][k] for r in runs), 4) for k in runs[0]["phases_s"]}}
    for k in ("resume_point_s", "first_step_done_s"):
        med[k] = round(statistics.median(r[k] for r in runs), 4)
    med["load_max_rank_s"] = round(statistics.median(max(r["load_per_rank_s"].values()) for r in runs), 4)
    return med


def table(results):
    med = results["median"]
    kinds = [k for k in KINDS if k in med]
    print("\nmedians of %d runs, %.2f GiB of state on the node (%.3f GB per rank), seconds from the SIGKILL"
          % (results["config"]["repeats"], results["config"]["state_gib_node"], results["config"]["state_bytes_per_rank"] / 1e9))
    print("%-30s" % "phase" + "".join("%24s" % LABELS[k] for k in kinds))

    def row(name, value):
        print("%-30s" % name + "".join("%24s" % ("" if value(k) is None else "%.3f" % value(k)) for k in kinds))

    for k in FLASH_PHASES:
        row(k, lambda kind, k=k: med[kind]["phases_s"].get(k))
    row("detect+stop+rendezvous+spawn", lambda kind: sum(med[kind]["phases_s"].get(k, 0) for k in FLASH_PHASES + TORCH_PHASES))
    for k in WORKER_PHASES:
        row(k, lambda kind, k=k: med[kind]["phases_s"][k])
    row("= resume point", lambda kind: med[kind]["resume_point_s"])
    row("first step", lambda kind: med[kind]["phases_s"]["first_step"])
    row("= first step done", lambda kind: med[kind]["first_step_done_s"])
    r = results["ratios"]
    mc = med["memcpy"]
    print("\nmemcpy of one rank's state (%d processes at once): fresh memory %.3f s, touched memory %.3f s"
          % (NPROC, mc["fresh_s"], mc["touched_s"]))
    print("resume point (a)/(b)            %.3f   (goal <= 0.35)" % r["resume_point_a_over_b"])
    print("resume point (a0)/(b)           %.3f   (without --standby)" % r["resume_point_a0_over_b"])
    print("first step done (a)/(b)         %.3f" % r["first_step_done_a_over_b"])
    print("load (a) / memcpy fresh         %.3f   (goal <= 1.3)" % r["load_a_over_memcpy_fresh"])
    print("load (a) / memcpy touched       %.3f" % r["load_a_over_memcpy_touched"])
    print("load (b) / memcpy fresh         %.3f" % r["load_b_over_memcpy_fresh"])
    print("steps lost past the last snapshot: %s" % r["steps_lost_past_last_snapshot"])


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"detect": "#d62728", "stop": "#ff7f0e", "rendezvous": "#bcbd22", "spawn": "#8c564b",
              "detect+stop+rendezvous+spawn": "#e377c2", "import": "#7f7f7f", "pg_init": "#17becf",
              "model": "#9467bd", "ckpt_setup": "#aec7e8", "load": "#2ca02c", "first_step": "#c7c7c7"}
    bars = [("(b) torchrun + torch.load", results["median"]["torchrun"], TORCH_PHASES),
            ("(a0) flashrun + flashckpt", results["median"]["flashrun_cold"], FLASH_PHASES),
            ("(a) flashrun --standby + flashckpt", results["median"]["flashrun"], FLASH_PHASES)]
    fig, ax = plt.subplots(figsize=(11, 4.4))
    seen = set()
    for y, (label, med, launch) in enumerate(bars):
        left = 0.0
        for k in launch + WORKER_PHASES + ["first_step"]:
            w = med["phases_s"][k]
            ax.barh(y, w, left=left, color=colors[k], edgecolor="white", hatch="//" if k == "first_step" else None,
                    label=k if k not in seen else None)
            if w > 0.06 * max(b[1]["first_step_done_s"] for b in bars):
                ax.text(left + w / 2, y, "%.2f" % w, ha="center", va="center", fontsize=8)
            seen.add(k)
            left += w
        ax.text(med["resume_point_s"], y + 0.42, "resume %.2f s" % med["resume_point_s"], ha="center", fontsize=8)
        ax.plot([med["resume_point_s"]] * 2, [y - 0.4, y + 0.4], color="black", lw=1)
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([b[0] for b in bars])
    ax.set_ylim(-0.6, len(bars) - 0.2)
    ax.set_xlabel("seconds from SIGKILL (medians of %d runs)" % results["config"]["repeats"])
    ax.set_title("Recovery of a 2-rank job with %.2f GiB of state on the node (%s)" %
                 (results["config"]["state_gib_node"], results["machine"]["summary"]))
    ax.legend(ncol=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="training state on the node, GiB (params + Adam moments)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=2, help="snapshot every N steps (both jobs)")
    ap.add_argument("--crash-at-step", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per job before it is killed")
    ap.add_argument("--out", default=os.path.join(RESULTS, "recovery.json"))
    ap.add_argument("--plot", default=os.path.join(RESULTS, "recovery_phases.png"))
    ap.add_argument("--keep-logs", help="copy every job's output into this folder")
    args = ap.parse_args()
    if args.crash_at_step < args.every:
        raise SystemExit("--crash-at-step must be at least --every (a snapshot must exist)")

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    atexit.register(_cleanup)

    snap, code_info = snapshot_code()
    CODE.update(flashrun=os.path.join(snap, "bin", "flashrun"), pythonpath=os.path.join(snap, "python"),
                build_dir=os.path.join(snap, "build"), train=os.path.join(snap, "train.py"))
    width, depth = model_shape(args.gib)
    params = n_params(width, depth)
    per_rank = 3 * params * 4
    cfg = {"width": width, "depth": depth, "every": args.every, "crash_at_step": args.crash_at_step,
           "timeout": args.timeout}
    load1 = os.getloadavg()
    results = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load1],
                    "summary": "%d CPUs, load %.1f" % (os.cpu_count(), load1[0])},
        "config": {"repeats": args.repeats, "ranks": NPROC, "width": width, "depth": depth, "params_per_rank": params,
                   "state_bytes_per_rank": per_rank, "state_gib_node": round(NPROC * per_rank / 2**30, 3),
                   "every": args.every, "crash_at_step": args.crash_at_step, "crash_rank": 1,
                   "launch": "--standalone --nproc_per_node 2 --max_restarts 1 --monitor_interval 0.1",
                   "standby": "(a) only: --standby --standby-import torch,flashckpt",
                   "flashckpt": "--persist-every 1 (every snapshot also written to disk in the background)",
                   "torch": "torch.save + fsync + rename every --every steps, torch.load on restart"},
        "code": code_info,
        "runs": {"flashrun": [], "flashrun_cold": [], "torchrun": [], "memcpy": []},
        "failed": [],
    }
    print("state: %d ranks x %.3f GB (width %d, depth %d, %.1fM params per rank) = %.3f GiB on the node; "
          "crash after step %d, snapshots every %d" % (NPROC, per_rank / 1e9, width, depth, params / 1e6,
                                                       results["config"]["state_gib_node"], args.crash_at_step, args.every),
          flush=True)
    for i in range(args.repeats):
        order = KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]  # interleaved, rotating
        for kind in order:
            try:
                r = one_run(kind, cfg, args.keep_logs)
            except RuntimeError as e:  # recorded, left out of the medians
                results["failed"].append({"repeat": i, "kind": kind, "error": str(e)[-4000:]})
                print("run %d %-8s FAILED: %s" % (i, kind, str(e)[-1500:]), flush=True)
                continue
            r["load_avg_1m"] = round(os.getloadavg()[0], 2)
            results["runs"][kind].append(r)
            print("run %d %-8s resume %.3f s, first step done %.3f s, load %.3f s, resumed step %s (%s), "
                  "phases %s" % (i, kind, r["resume_point_s"], r["first_step_done_s"], r["phases_s"]["load"],
                                 r["resumed_step"], ",".join(r["sources"]),
                                 " ".join("%s=%.3f" % kv_ for kv_ in r["phases_s"].items())), flush=True)
        mc = memcpy_baseline(per_rank)
        results["runs"]["memcpy"].append(mc)
        print("run %d memcpy   fresh %.3f s, touched %.3f s" % (i, mc["fresh_s"], mc["touched_s"]), flush=True)

    if not all(results["runs"][k] for k in KINDS):
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
        raise SystemExit("no successful run of one of %s; see %s" % (KINDS, args.out))
    med = {k: median_run(results["runs"][k]) for k in KINDS}
    med["memcpy"] = {k: round(statistics.median(m[k] for m in results["runs"]["memcpy"]), 4)
                     for k in ("fresh_s", "touched_s")}
    results["median"] = med
    a, a0, b, mc = med["flashrun"], med["flashrun_cold"], med["torchrun"], med["memcpy"]
    digests = {r["final_digest"] for k in KINDS for r in results["runs"][k]}
    results["ratios"] = {
        "resume_point_a_over_b": round(a["resume_point_s"] / b["resume_point_s"], 3),
        "resume_point_a0_over_b": round(a0["resume_point_s"] / b["resume_point_s"], 3),
        "workers_from_standbys_in_a": [r.get("workers_from_standbys") for r in results["runs"]["flashrun"]],
        "first_step_done_a_over_b": round(a["first_step_done_s"] / b["first_step_done_s"], 3),
        "load_a_over_memcpy_fresh": round(a["phases_s"]["load"] / mc["fresh_s"], 3),
        "load_a_over_memcpy_touched": round(a["phases_s"]["load"] / mc["touched_s"], 3),
        "load_b_over_memcpy_fresh": round(b["phases_s"]["load"] / mc["fresh_s"], 3),
        "steps_lost_past_last_snapshot": {k: max(r["steps_lost_past_last_snapshot"] for r in results["runs"][k])
                                          for k in KINDS},
        "same_final_parameters_all_runs": len(digests) == 1,
    }
    results["goals"] = {
        "load_at_most_1.3x_memcpy_fresh": results["ratios"]["load_a_over_memcpy_fresh"] <= 1.3,
        "resume_point_at_most_0.35x_torchrun": results["ratios"]["resume_point_a_over_b"] <= 0.35,
        "zero_steps_lost_past_last_snapshot": results["ratios"]["steps_lost_past_last_snapshot"]["flashrun"] == 0,
    }
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    table(results)
    print("goals: %s" % results["goals"])
    print("same final parameters in every run: %s" % results["ratios"]["same_final_parameters_all_runs"])
    try:
        plot(results, args.plot)
        print("wrote %s and %s" % (args.out, args.plot))
    except ImportError as e:
        print("wrote %s (no plot: %s)" % (args.out, e))


if __name__ == "__main__":
    main()

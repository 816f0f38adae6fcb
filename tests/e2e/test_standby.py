"""flashrun --standby, end to end: warm interpreters (torch already imported)
take over the restarted workers, which resume from shared memory bit-exact;
nothing is left behind.

Run: PYTHONPATH=python FLASHCKPT_BUILD_DIR=build /usr/bin/python3 -m pytest tests/e2e/test_standby.py
"""
import glob
import os
import re
import shutil
import signal
import sys
import uuid

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from flashrun_harness import PYTHON, REPO, Launchers, flashrun_binary, pid_alive, wait_for  # noqa: E402

TRAIN = os.path.join(REPO, "examples", "python", "train.py")
STEPS, EVERY = 40, 5


def _env(shm_dir):
    return {"PYTHONPATH": os.path.join(REPO, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PYTHON_EXEC": PYTHON,
            "FLASHCKPT_BUILD_DIR": os.environ.get("FLASHCKPT_BUILD_DIR", os.path.join(REPO, "build")),
            "FLASHCKPT_SHM_DIR": shm_dir,
            "FLASHRUN_STANDBY_DELAY": "0"}


def _processes_with(token):
    """pids whose environment mentions token (this test's own shared-memory directory)."""
    found = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(d + "/environ", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(d[6:]))
        except OSError:
            pass
    return [p for p in found if p != os.getpid() and pid_alive(p)]


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Job:
    def __init__(self, tmp_path, name):
        self.launchers = Launchers()
        self.dir = tmp_path / name
        self.ckpt = self.dir / "ckpt"
        self.logs = self.dir / "logs"
        self.digest = self.dir / "digest"
        self.shm = "/dev/shm/fckpt-e2e-standby-%s" % uuid.uuid4().hex[:8]
        os.makedirs(self.shm)

    def start(self, flashrun, standby, extra=()):
        args = [flashrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.1",
                "--log-dir", str(self.logs), "-r", "3"]
        if standby:
            args.append("--standby")
        args += [TRAIN, "--dir", str(self.ckpt), "--steps", str(STEPS), "--every", str(EVERY),
                 "--digest-out", str(self.digest)] + [str(x) for x in extra]
        self.p = self.launchers.start(args, env=_env(self.shm))
        return self.p

    def finish(self, timeout):
        try:
            out, err = self.p.communicate(timeout=timeout)
        except Exception:
            self.launchers.kill(self.p)
            out, err = self.p.communicate(timeout=10)
            raise AssertionError("flashrun timed out after %s s\nstderr:\n%s" % (timeout, err[-6000:]))
        return out, err

    def worker_log(self, attempt, local_rank, stream="stdout"):
        files = glob.glob(str(self.logs / "*" / ("attempt_%d" % attempt) / str(local_rank) / (stream + ".log")))
        if not files:
            return ""
        with open(files[0]) as f:
            return f.read()

    def standby_logs(self):
        texts = []
        for f in sorted(glob.glob(str(self.logs / "*" / "standby_*.log"))):
            with open(f) as fh:
                texts.append(fh.read())
        return texts

    def cleanup(self):
        self.launchers.extra_pids += _processes_with(self.shm)
        self.launchers.cleanup()
        try:
            wait_for(lambda: not _processes_with(self.shm), 15, "every process of the job to be gone")
            return sorted(os.listdir(self.shm))
        finally:
            shutil.rmtree(self.shm, ignore_errors=True)


@pytest.fixture(scope="module")
def flashrun():
    return flashrun_binary()


@pytest.fixture
def jobs(tmp_path):
    made = []

    def make(name):
        made.append(Job(tmp_path, name))
        return made[-1]

    yield make
    for j in made:
        leftover = j.cleanup()
        assert not leftover, "shared-memory segments left behind: %s" % leftover


def _snapshots(text):
    return [int(s) for s in re.findall(r"\] step (\d+) loss \S+ snapshot", text)]


def test_restart_runs_in_the_warm_standbys_and_resumes_bit_exact(flashrun, jobs):
    base = jobs("baseline")
    base.start(flashrun, standby=False)
    _, err = base.finish(120)
    assert base.p.returncode == 0, err[-4000:]

    job = jobs("standby")
    job.start(flashrun, standby=True, extra=["--step-sleep", "0.15"])
    # Both standbys have imported torch, and both workers snapshotted step 10: then rank 1 dies.
    wait_for(lambda: sum("ready (imported torch" in t for t in job.standby_logs()) == 2, 90,
             "the 2 standbys to be ready")
    standbys = {int(m) for t in job.standby_logs() for m in re.findall(r"standby pid (\d+): ready", t)}
    assert len(standbys) == 2 and all(pid_alive(p) for p in standbys), standbys
    wait_for(lambda: min(max(_snapshots(job.worker_log(0, lr)), default=0) for lr in (0, 1)) >= 10, 90,
             "both workers to snapshot step 10")
    # The agent told each standby its rank's snapshot size: both hold a touched load buffer.
    wait_for(lambda: sum("load buffer of" in t and "prepared" in t for t in job.standby_logs()) == 2, 30,
             "the 2 standbys to prepare their load buffers")
    victims = [p for p in _processes_with(job.shm)
               if "RANK=1\0" in open("/proc/%d/environ" % p, "rb").read().decode(errors="replace")
               and TRAIN in _cmdline(p) and p not in standbys]
    assert len(victims) == 1, [(p, _cmdline(p)) for p in victims]
    os.kill(victims[0], signal.SIGKILL)
    _, err = job.finish(120)
    assert job.p.returncode == 0, err[-4000:]
    assert "attempt 1, 2/2 workers from warm standbys" in err, err[-4000:]
    # the replacements waited for the restarted workers' first snapshots (not to slow the recovery)
    assert "the restarted workers have snapshotted: warm standbys start again" in err, err[-4000:]

    resumed = set()
    for lr in (0, 1):
        out = job.worker_log(1, lr)
        m = re.search(r"resumed from step (\d+) \(memory\)", out)
        assert m, out[-2000:]
        resumed.add(int(m.group(1)))
        # load_into copied the slot straight into the model and optimizer the worker had
        # built (touched memory: no buffer of the state's size, no page faults into one)
        assert re.search(r"loaded step \d+ from shared memory into caller buffers", job.worker_log(1, lr, "stderr")), \
            job.worker_log(1, lr, "stderr")[-2000:]
        marks = dict(kv.split("=") for kv in re.search(r"phase_marks (.*)", out).group(1).split())
        # torch was imported before the failure: the script's `import torch` costs nothing now
        assert float(marks["imported"]) - float(marks["exec"]) < 0.25, marks
    assert len(resumed) == 1 and resumed.pop() >= 10
    # the restarted workers are the standbys that were waiting (their pids registered with the agent)
    registered = {int(p) for p in re.findall(r"agent: rank \d+ \(pid (\d+)\) registered", err)}
    assert standbys <= registered, (standbys, registered)
    with open(job.digest) as f, open(base.digest) as g:
        assert f.read().strip() == g.read().strip()
    # the job is over: its standbys (the new ones started after the restart too) are gone
    wait_for(lambda: not [p for p in _processes_with(job.shm) if "_flashrun_standby" in _cmdline(p)], 15,
             "the standbys to be gone")


def test_without_standby_flag_no_interpreter_waits(flashrun, jobs):
    job = jobs("plain")
    job.start(flashrun, standby=False, extra=["--steps", "10"])
    _, err = job.finish(120)
    assert job.p.returncode == 0, err[-4000:]
    assert not job.standby_logs()
    assert "warm standbys" not in err

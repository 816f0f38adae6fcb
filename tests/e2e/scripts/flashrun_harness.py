"""Shared helpers for the flashrun end-to-end tests: finding the binary, free
ports, and running launchers with deadlines and no process left behind."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPTS = os.path.join(REPO, "tests", "e2e", "scripts")
PYTHON = "/usr/bin/python3"


def flashrun_binary():
    for candidate in (os.environ.get("FLASHRUN_BIN", ""),
                      os.path.join(REPO, "build", "bin", "flashrun"),
                      os.path.join(REPO, "build-launcher", "bin", "flashrun")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("flashrun binary not found: set FLASHRUN_BIN or build it into build/bin/flashrun "
                "(make -C build flashrun)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(name):
    return os.path.join(SCRIPTS, name)


def pid_alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class Launchers:
    """Starts launchers in their own sessions and kills whatever is left at the end.

    Every launcher gets a private TMPDIR, removed at the end with what a
    SIGKILLed launcher could not remove itself (its log directory made without
    --log-dir, its agent socket; torchrun's torchelastic_* directories)."""

    def __init__(self):
        self.procs = []
        self.extra_pids = []
        self.tmpdir = tempfile.mkdtemp(prefix="fck-e2e-", dir="/tmp")

    def start(self, args, env=None, **kw):
        full_env = dict(os.environ)
        full_env.setdefault("PYTHON_EXEC", PYTHON)
        full_env["TMPDIR"] = self.tmpdir
        full_env.pop("FLASHRUN_PYTHON_INTERPRETER", None)
        if env:
            full_env.update(env)
        p = subprocess.Popen(args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def run(self, args, timeout=60, env=None):
        p = self.start(args, env=env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            out, err = p.communicate(timeout=10)
            raise AssertionError("timed out after %s s: %s\nstdout:\n%s\nstderr:\n%s" % (timeout, args, out, err))
        return p.returncode, out, err

    @staticmethod
    def kill(p):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                self.kill(p)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for pid in self.extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:  # sockets of killed launchers whose TMPDIR path was too long
            for leftover in glob.glob("/tmp/flashrun-%d-*.sock" % p.pid):
                os.unlink(leftover)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out after %s s waiting for %s" % (timeout, what))

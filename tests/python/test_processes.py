"""Real processes: bit-exact resume in a fresh process, and a SIGKILLed saver."""

import os
import signal
import subprocess

import pytest

import flashckpt
from flashckpt_testutil import PYTHON, child_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_script.py")


def run_train(args, timeout=120):
    out = subprocess.run([PYTHON, SCRIPT] + [str(a) for a in args], env=child_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def losses(stdout):
    return {int(l.split()[1]): l.split()[2] for l in stdout.splitlines() if l.startswith("loss ")}


def test_resume_in_fresh_process_is_bit_exact(tmp_path):
    d = tmp_path / "ckpt"
    full = losses(run_train([d, "--steps", 20, "--save-at", 8]))
    assert len(full) == 20
    out = run_train([d, "--steps", 20, "--resume"])
    assert "resumed 8 storage" in out
    resumed = losses(out)
    assert sorted(resumed) == list(range(9, 21))
    for step, value in resumed.items():
        assert value == full[step], f"step {step}: {value} != {full[step]}"


def test_sigkill_right_after_save_loads_from_memory(tmp_path, procs):
    d = tmp_path / "ckpt"
    p = subprocess.Popen([PYTHON, SCRIPT, str(d), "--steps", "10", "--save-at", "5",
                          "--pad-mib", "64", "--kill-after-save"],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    import selectors
    import time

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("saved 5"):
            break
    assert lines and lines[-1].startswith("saved 5"), "".join(lines) + p.stderr.read()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    # The killed process's segment is still there.
    ckpt = flashckpt.Checkpointer(d)
    try:
        assert ckpt.latest_memory_step() == 5
        state = ckpt.load()
        assert ckpt.last_load.step == 5
        assert ckpt.last_load.source == "memory"
        assert state["extra"]["step"] == 5 and state["extra"]["pad"].numel() == 64 << 18
        del state
        ckpt.wait(timeout=60)  # the core persists what the dead process left behind
        assert ckpt.latest_committed_step() == 5
    finally:
        segment = ckpt.memory_segment_path
        ckpt.close()
        if os.path.exists(segment):
            os.unlink(segment)

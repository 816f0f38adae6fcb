"""The Python edge: the core's log lines in `logging` (logger "flashckpt"),
and persist failures that reach the script (at its next save, wait, close,
or loudly at interpreter exit) instead of only a log line."""

import os
import subprocess
import textwrap
import time

import pytest
import torch

import flashckpt
from flashckpt_testutil import PYTHON, child_env


def run_child(code, timeout=120, **env):
    out = subprocess.run([PYTHON, "-c", textwrap.dedent(code)], env=child_env(**env),
                         capture_output=True, text=True, timeout=timeout)
    return out


SAVE_AND_LOAD = """
    import logging, sys
    {setup}
    import torch, flashckpt
    ckpt = flashckpt.Checkpointer(sys.argv[1] if len(sys.argv) > 1 else {d!r}, num_slots=2)
    ckpt.save(1, {{"w": torch.ones(4)}}).wait()
    ckpt.load(prefer_memory=False)
    ckpt.close()
"""


@pytest.mark.parametrize("setup,expect,absent", [
    # Configured: the core's lines go through the handler, with its format.
    ('logging.basicConfig(level=logging.INFO, format="PY %(name)s %(levelname)s %(message)s")',
     ["PY flashckpt INFO loaded step 1 from"], ["[flashckpt I"]),
    # The flashckpt logger's level is respected (info is below it).
    ('logging.basicConfig(level=logging.INFO, format="PY %(name)s %(levelname)s %(message)s");'
     'logging.getLogger("flashckpt").setLevel(logging.WARNING)',
     [], ["loaded step 1", "[flashckpt I"]),
    # Debug lines of the core appear when the logger asks for them.
    ('logging.basicConfig(level=logging.DEBUG, format="PY %(name)s %(levelname)s %(message)s")',
     ["PY flashckpt DEBUG allocated", "PY flashckpt INFO loaded step 1"], []),
    # No logging configured: the core's own format on stderr, as without Python.
    ("", ["[flashckpt I ", "] loaded step 1 from"], ["PY "]),
])
def test_core_lines_go_to_the_flashckpt_logger(tmp_path, setup, expect, absent):
    out = run_child(SAVE_AND_LOAD.format(setup=setup, d=str(tmp_path / "ckpt")))
    assert out.returncode == 0, out.stderr[-3000:]
    for text in expect:
        assert text in out.stderr, (text, out.stderr[-3000:])
    for text in absent:
        assert text not in out.stderr, (text, out.stderr[-3000:])


def block_step(d, step):
    """A file where the step's directory goes: its persist fails (mkdir)."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"step-{step}"), "w") as f:
        f.write("not a directory\n")


def test_an_unwaited_persist_failure_raises_at_the_next_save(tmp_path):
    d = str(tmp_path / "ckpt")
    with flashckpt.Checkpointer(d) as ckpt:
        ckpt.save(1, {"w": torch.ones(4)}).wait()
        block_step(d, 2)
        ckpt.save(2, {"w": torch.full((4,), 2.0)})
        deadline = time.monotonic() + 60
        while ckpt.persist_failures == 0:  # step 2's persist fails on its own thread
            assert time.monotonic() < deadline, "the persist of step 2 did not fail within 60 s"
            time.sleep(0.005)
        with pytest.raises(flashckpt.FlashCkptError, match=r"(?s)save of step 3 not taken.*step 2 failed.*step-2"):
            ckpt.save(3, {"w": torch.full((4,), 3.0)})
        assert ckpt.latest_memory_step() == 2
        assert ckpt.persist_failures == 1
        assert ckpt.latest_committed_step() == 1
        os.unlink(os.path.join(d, "step-2"))
        ckpt.save(3, {"w": torch.full((4,), 3.0)}).wait()  # told once: the retry persists
        assert ckpt.latest_committed_step() == 3


def test_wait_raises_an_unreported_persist_failure_once(tmp_path):
    d = str(tmp_path / "ckpt")
    with flashckpt.Checkpointer(d) as ckpt:
        block_step(d, 5)
        ckpt.save(5, {"w": torch.ones(4)})
        with pytest.raises(flashckpt.FlashCkptError, match="persisting step 5 failed"):
            ckpt.wait(timeout=60)
        ckpt.wait(timeout=60)
        os.unlink(os.path.join(d, "step-5"))
        ckpt.save(6, {"w": torch.ones(4)}).wait()


def test_a_persist_failure_at_exit_is_reported_loudly(tmp_path):
    d = str(tmp_path / "ckpt")
    block_step(d, 7)
    out = run_child(f"""
        import torch, flashckpt
        ckpt = flashckpt.Checkpointer({d!r})
        print(ckpt.memory_segment_path, flush=True)
        ckpt.save(7, {{"w": torch.ones(4)}})
        # exits without wait() or close()
    """)
    segment = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    try:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "could not make every snapshot durable" in out.stderr, out.stderr[-3000:]
        assert "persisting step 7 failed" in out.stderr, out.stderr[-3000:]
        assert d in out.stderr
        # Not durable: the snapshot was kept in memory for a later process.
        assert segment and os.path.exists(segment), out.stderr[-3000:]
    finally:
        if segment and os.path.exists(segment):
            os.unlink(segment)

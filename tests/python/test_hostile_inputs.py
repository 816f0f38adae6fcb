"""Careless and hostile inputs, table-driven: each row is an input, the error
text it must produce, and (for the Python API) the check that nothing already
saved was lost. The next such input is one line to add.

Rows cover the Python API, the `flashckpt` CLI and flashrun's argument and
rendezvous-configuration handling."""

import os
import subprocess
import sys

import pytest
import torch

import flashckpt
from flashckpt.errors import (FailedPreconditionError, InvalidArgumentError, NotFoundError)
from flashckpt_testutil import PYTHON, REPO, child_env

sys.path.insert(0, os.path.join(REPO, "tests", "e2e", "scripts"))
from flashrun_harness import flashrun_binary  # noqa: E402  (skips when flashrun is not built)

SAVED = {"w": torch.arange(16, dtype=torch.float32), "meta": {"epoch": 3}}


def _cyclic():
    s = {"model": {"w": torch.ones(2)}}
    s["model"]["again"] = [s]
    return s


# (case, action on an open Checkpointer whose step 1 is committed, error class, text in the message)
API_CASES = [
    ("save: float step", lambda c: c.save(1.7, SAVED), InvalidArgumentError, "step must be a non-negative integer, got 1.7"),
    ("save: integral float step", lambda c: c.save(2.0, SAVED), InvalidArgumentError, "use int(step)"),
    ("save: bool step", lambda c: c.save(True, SAVED), InvalidArgumentError, "got True (bool)"),
    ("save: step 2**63", lambda c: c.save(2**63, SAVED), InvalidArgumentError, "within 0..2**63-1"),
    ("save: negative step", lambda c: c.save(-1, SAVED), InvalidArgumentError, "got -1"),
    ("save: string step", lambda c: c.save("3", SAVED), InvalidArgumentError, "got '3' (str)"),
    ("save: float tensor step", lambda c: c.save(torch.tensor(2.5), SAVED), InvalidArgumentError, "step must be"),
    ("load: negative step", lambda c: c.load(-1), InvalidArgumentError, "got -1"),
    ("load: float step", lambda c: c.load(1.5), InvalidArgumentError, "got 1.5"),
    ("load: bool step", lambda c: c.load(True), InvalidArgumentError, "got True"),
    ("load: missing step", lambda c: c.load(12345), NotFoundError, "12345"),
    ("save: cyclic state", lambda c: c.save(5, _cyclic()), ValueError,
     "cannot save state['model']['again'][0]: the state contains a cycle"),
    ("save: unpicklable value", lambda c: c.save(5, {"f": lambda: 1}), TypeError, "cannot save state['f']"),
    ("save: key that is not UTF-8", lambda c: c.save(5, {"w": {"\udc80": torch.ones(2)}}), ValueError,
     "cannot save state['w']['\\udc80']: its key cannot be encoded as UTF-8"),
    ("save: committed step with other contents", lambda c: c.save(1, {"w": torch.zeros(16)}).wait(),
     FailedPreconditionError, "persist step 1 refused"),
]


@pytest.mark.parametrize("case,action,error,text", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_input_is_refused_and_nothing_saved_is_lost(tmp_path, case, action, error, text):
    d = str(tmp_path / "ckpt")
    with flashckpt.Checkpointer(d) as ckpt:
        ckpt.save(1, SAVED).wait()
        with pytest.raises(error) as raised:
            action(ckpt)
        assert text in str(raised.value), f"{case}: {raised.value}"
        assert ckpt.latest_committed_step() == 1, case
        for prefer_memory in (True, False):
            got = ckpt.load(1, prefer_memory=prefer_memory)
            assert torch.equal(got["w"], SAVED["w"]) and got["meta"] == SAVED["meta"], case
    # And from a fresh process's point of view, from storage.
    with flashckpt.Checkpointer(d, persist=False) as again:
        assert torch.equal(again.load(1, prefer_memory=False)["w"], SAVED["w"]), case
    again.unlink_memory()


def test_load_into_an_optimizer_over_other_parameters_changes_nothing(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in fresh.parameters()]
    partial = torch.optim.Adam(list(fresh.parameters())[:2], lr=0.5)
    d = str(tmp_path / "ckpt")
    with flashckpt.Checkpointer(d) as ckpt:
        ckpt.save(1, {"model": model.state_dict(), "optim": opt.state_dict()}).wait()
        with pytest.raises(flashckpt.StateDictMismatchError, match="nothing was changed"):
            ckpt.load_into(fresh, partial)  # from memory: the in-place path
        assert ckpt.last_load is None or ckpt.last_load.source == "memory"
    with flashckpt.Checkpointer(d, persist=False) as again:  # the segment is gone: from storage
        with pytest.raises(flashckpt.StateDictMismatchError, match="nothing was changed"):
            again.load_into(fresh, partial)
    again.unlink_memory()
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))
    assert partial.param_groups[0]["lr"] == 0.5 and not partial.state


def test_a_stale_restore_step_outside_flashrun_names_the_variable(tmp_path):
    d = str(tmp_path / "ckpt")
    with flashckpt.Checkpointer(d) as ckpt:
        ckpt.save(1, SAVED).wait()
    out = subprocess.run([PYTHON, "-c", "import sys, flashckpt\n"
                          "with flashckpt.Checkpointer(sys.argv[1]) as c:\n"
                          "    c.load()\n", d],
                         env=child_env(FLASHCKPT_RESTORE_STEP="77"), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "FLASHCKPT_RESTORE_STEP=77 names a step" in out.stderr and "unset it" in out.stderr, out.stderr


# --- the CLI: (arguments, exit status, text on stderr) --------------------------------------------
CLI_CASES = [
    (["ls", "{missing}"], 2, "not a directory"),
    (["export", "{ckpt}", "1", "{missing}/out.pt"], 2, "directory {missing} does not exist"),
    (["export", "{ckpt}", "1", "{tmp}"], 2, "it is a directory"),
    (["export", "{ckpt}", "99", "{tmp}/out.pt"], 1, "99"),
    (["verify", "{ckpt}", "99"], 1, "99"),
]


@pytest.fixture
def committed_dir(tmp_path):
    d = str(tmp_path / "ckpt")
    with flashckpt.Checkpointer(d) as ckpt:
        for s in range(1, 40):
            ckpt.save(s, {"w": torch.full((4,), float(s))}).wait()
    return d


@pytest.mark.parametrize("args,rc,text", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_input_gives_a_clear_error_without_traceback(tmp_path, committed_dir, args, rc, text):
    fill = {"ckpt": committed_dir, "missing": str(tmp_path / "nope"), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    out = subprocess.run([PYTHON, "-m", "flashckpt"] + argv, env=child_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == rc, (argv, out.returncode, out.stderr)
    assert text.format(**fill) in out.stderr, (argv, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert sorted(os.listdir(committed_dir))[:2] != [], "the checkpoint directory is untouched"


def test_cli_ls_into_a_closed_pipe_is_quiet(committed_dir):
    out = subprocess.run(f"{PYTHON} -m flashckpt ls {committed_dir} | head -2", shell=True, env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert len(out.stdout.splitlines()) == 2
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_cli_ls_marks_the_highest_committed_step_as_latest(tmp_path):
    d = str(tmp_path / "ckpt")
    with flashckpt.Checkpointer(d) as ckpt:
        for s in (1000, 1, 2, 3):
            ckpt.save(s, {"w": torch.ones(2)}).wait()
        assert ckpt.latest_step() == 1000
        assert ckpt.last_load is None
        ckpt.load()
        assert ckpt.last_load.step == 1000
    out = subprocess.run([PYTHON, "-m", "flashckpt", "ls", d], env=child_env(), capture_output=True, text=True,
                         timeout=60)
    latest = [l for l in out.stdout.splitlines() if "<- latest" in l]
    assert len(latest) == 1 and latest[0].split()[0] == "1000", out.stdout
    with open(os.path.join(d, "latest")) as f:
        assert f.read().strip() == "1000"


# --- flashrun: (arguments before the script, text of the usage error; exit status 2) ----------------
FLASHRUN_CASES = [
    (["--nproc-per-node", "99999999"], "more than this node allows"),
    (["--nproc-per-node", "100", "--max-nproc-per-node", "50"], "Pass --max-nproc-per-node 100"),
    (["--worker-timeout", "-5"], "--worker-timeout: must be a number of seconds, 0 or more (0 turns it off), got '-5'"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout: invalid float value: 'nan'"),
    (["--monitor-interval", "0"], "--monitor-interval: must be a positive number of seconds"),
    (["--rdzv-conf", "join_timeout=abc"], "join_timeout=abc is not a number of seconds"),
    (["--rdzv-conf", "keep_alive_interval=-1"], "keep_alive_interval=-1 must be a positive number of seconds"),
    (["--rdzv-conf", "keep_alive_interval=abc"], "keep_alive_interval=abc is not a number of seconds"),
    (["--rdzv-conf", "keep_alive_interval=0.001"], "below 0.05 s"),
    (["--rdzv-conf", "keep_alive_max_attempt=0"], "keep_alive_max_attempt=0 must be a whole number"),
    (["--rdzv-conf", "last_call_timeout=-3"], "last_call_timeout=-3 must be 0 or more seconds"),
    (["--rdzv-conf", "is_host=maybe"], "is_host=maybe is not true or false"),
    (["--rdzv-conf", "no_such_key=1"], "unknown key 'no_such_key'"),
]


@pytest.mark.parametrize("args,text", FLASHRUN_CASES, ids=[" ".join(c[0]) for c in FLASHRUN_CASES])
def test_flashrun_argument_is_refused_before_anything_starts(tmp_path, args, text):
    out = subprocess.run([flashrun_binary(), "--standalone"] + args + [os.path.join(tmp_path, "never_run.py")],
                         env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, (args, out.returncode, out.stderr[-2000:])
    assert "flashrun: error:" in out.stderr and text in out.stderr, (args, out.stderr[-2000:])
    assert not os.listdir(tmp_path), f"{args}: start-up state was made: {os.listdir(tmp_path)}"


# --- flashrun against a hostile rendezvous endpoint ------------------------------------------------
@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 200 OK\r\n\r\nhello"], ids=["accept-and-close", "garbage"])
def test_flashrun_backs_off_from_an_endpoint_that_accepts_and_closes(tmp_path, reply):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(1)
            try:
                if reply:
                    conn.sendall(reply)
            except OSError:
                pass
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    never = tmp_path / "never_run.py"
    never.write_text("raise SystemExit('the rendezvous must not complete')\n")
    try:
        out = subprocess.run([flashrun_binary(), "--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                              f"127.0.0.1:{port}", "--rdzv-conf", "join_timeout=4,is_host=false", str(never)],
                             env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        t.join(timeout=5)
        server.close()
    assert out.returncode == 1, out.returncode  # documented: the rendezvous could not complete
    assert f"127.0.0.1:{port}" in out.stderr and "calls" in out.stderr, out.stderr[-2000:]
    # Backing off from 50 ms to 2 s within 4 s: a handful of calls (each at most two
    # connections), not the thousands of a retry loop.
    assert 1 <= len(accepted) <= 60, (len(accepted), out.stderr[-2000:])


@pytest.mark.parametrize("keep", [False, True], ids=["no-logs-asked-for", "with-r"])
def test_flashrun_log_directory_honours_tmpdir_and_goes_unless_logs_were_asked_for(tmp_path, keep):
    script = tmp_path / "ok.py"
    script.write_text("print('hello from the worker')\n")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    extra = ["-r", "3"] if keep else []
    out = subprocess.run([flashrun_binary(), "--standalone"] + extra + [str(script)],
                         env=dict(os.environ, TMPDIR=str(tmpdir)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"logs in {tmpdir}/flashrun_" in out.stderr, out.stderr[-2000:]
    left = os.listdir(tmpdir)
    if keep:
        assert len(left) == 1 and left[0].startswith("flashrun_"), left
        logs = [os.path.join(dp, f) for dp, _, fs in os.walk(tmpdir / left[0]) for f in fs if f == "stdout.log"]
        assert logs and "hello from the worker" in open(logs[0]).read()
    else:
        assert left == [], f"the log directory was left behind: {left}"

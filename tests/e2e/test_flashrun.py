"""flashrun end to end: real processes, real torch.distributed gloo on 127.0.0.1."""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from flashrun_harness import (PYTHON, REPO, Launchers, flashrun_binary, free_port, pid_alive,  # noqa: E402
                              script, wait_for)

FAST_RDZV = "keep_alive_interval=0.5,keep_alive_max_attempt=2,last_call_timeout=1,join_timeout=30"


@pytest.fixture
def launchers():
    l = Launchers()
    yield l
    l.cleanup()


@pytest.fixture
def flashrun():
    return flashrun_binary()


# --- bad input -----------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--nnodes", "0"], "--nnodes"),
    (["--nnodes", "3:2"], "maximum (2) is below the minimum (3)"),
    (["--nproc-per-node", "many"], "--nproc-per-node"),
    (["--max-restarts", "-1"], "--max-restarts"),
    (["--monitor-interval", "0"], "--monitor-interval"),
    (["--rdzv-backend", "zookeeper"], "invalid choice"),
])
def test_bad_flags_give_argparse_errors(flashrun, launchers, args, message):
    rc, out, err = launchers.run([flashrun] + args + [script("flashrun_env_dump.py"), "/tmp/x"], timeout=10)
    assert rc == 2, err
    assert err.startswith("usage: flashrun"), err
    assert "flashrun: error:" in err and message in err, err


def test_missing_script_is_an_error(flashrun, launchers):
    rc, _, err = launchers.run([flashrun, "--standalone", "/nonexistent/train.py"], timeout=10)
    assert rc == 2
    assert "training script '/nonexistent/train.py' does not exist" in err


def test_help_lists_both_spellings(flashrun, launchers):
    rc, out, _ = launchers.run([flashrun, "--help"], timeout=10)
    assert rc == 0
    for flag in ("--nproc-per-node NPROC_PER_NODE, --nproc_per_node", "--rdzv-conf", "--max-restarts",
                 "--local-ranks-filter", "--signals-to-handle", "--worker-timeout", "training_script"):
        assert flag in out


def test_pet_environment_variables_are_defaults(flashrun, launchers, tmp_path):
    rc, _, err = launchers.run([flashrun, "--standalone", script("flashrun_env_dump.py"), str(tmp_path)],
                               env={"PET_NPROC_PER_NODE": "2"}, timeout=30)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["env_0.json", "env_1.json"]


def test_rendezvous_port_in_use_is_reported(flashrun, launchers, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, _, err = launchers.run(
            [flashrun, "--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:%d" % port,
             "--rdzv-conf", "is_host=1", script("flashrun_env_dump.py"), str(tmp_path)], timeout=20)
    assert rc == 1
    assert "127.0.0.1:%d" % port in err and "in use" in err, err


def test_standalone_ignores_a_busy_default_port(flashrun, launchers, tmp_path):
    # torchrun's standalone uses 29400; ours takes a free port, so a busy one never fails the job.
    try:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 29400))
        busy.listen(1)
    except OSError:
        busy = None
    try:
        rc, _, err = launchers.run([flashrun, "--standalone", script("flashrun_env_dump.py"), str(tmp_path)],
                                   timeout=30)
        assert rc == 0, err
    finally:
        if busy:
            busy.close()


def test_endpoint_that_never_answers_times_out_with_address(flashrun, launchers, tmp_path):
    port = free_port()  # nothing listens there
    started = time.time()
    rc, _, err = launchers.run(
        [flashrun, "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:%d" % port,
         "--rdzv-conf", "is_host=0,join_timeout=2", script("flashrun_env_dump.py"), str(tmp_path)], timeout=30)
    assert rc == 1
    assert "127.0.0.1:%d" % port in err, err
    assert "after 2." in err or "after 1." in err, err
    assert time.time() - started < 15


def test_wrong_token_cannot_join(flashrun, launchers, tmp_path):
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", "127.0.0.1:%d" % port, "--rdzv-id", "tok", "--local-addr", "127.0.0.1"]
    host = launchers.start([flashrun] + common + ["--rdzv-conf", "join_timeout=8", "--node-name", "a",
                                                   script("flashrun_env_dump.py"), str(tmp_path)],
                           env={"FLASHRUN_RDZV_TOKEN": "right"})
    rc, _, err = launchers.run([flashrun] + common + ["--rdzv-conf", "is_host=0,join_timeout=5", "--node-name", "b",
                                                      script("flashrun_env_dump.py"), str(tmp_path)],
                               env={"FLASHRUN_RDZV_TOKEN": "wrong"}, timeout=30)
    assert rc == 1
    assert "token" in err, err
    host.wait(timeout=30)
    assert host.returncode == 1  # nobody else joined
    assert not os.listdir(tmp_path)


# --- environment ---------------------------------------------------------------
def test_worker_environment_matches_torchrun(flashrun, launchers, tmp_path):
    if not os.access("/usr/bin/torchrun", os.X_OK):
        pytest.skip("Debian's torchrun (python3-torch) is not installed")
    flags = ["--standalone", "--nproc_per_node", "2", "--max_restarts", "1", "--role", "trainer"]
    rc, _, err = launchers.run(["/usr/bin/torchrun", "-r", "1", "-t", "1"] + flags +
                               [script("flashrun_env_dump.py"), str(tmp_path / "torchrun")], timeout=90)
    assert rc == 0, err
    rc, _, err = launchers.run([flashrun, "-r", "1", "-t", "1"] + flags +
                               [script("flashrun_env_dump.py"), str(tmp_path / "flashrun")], timeout=60)
    assert rc == 0, err
    ours_only = {"FLASHCKPT_AGENT_SOCKET", "FLASHCKPT_RESTORE_STEP", "FLASHCKPT_HEARTBEAT_FILE",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING", "FLASHRUN_PYTHON_INTERPRETER"}
    differ_by_design = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"}
    for rank in (0, 1):
        theirs = json.load(open(tmp_path / "torchrun" / ("env_%d.json" % rank)))
        ours = json.load(open(tmp_path / "flashrun" / ("env_%d.json" % rank)))
        for name in sorted(set(theirs) | set(ours)):
            if name in ours_only:
                assert name in ours
                continue
            assert name in theirs and name in ours, name
            if name in differ_by_design:
                continue
            assert theirs[name] == ours[name], (rank, name, theirs[name], ours[name])
        suffix = os.path.join("attempt_0", str(rank), "error.json")
        assert theirs["TORCHELASTIC_ERROR_FILE"].endswith(suffix)
        assert ours["TORCHELASTIC_ERROR_FILE"].endswith(suffix)
        assert ours["MASTER_PORT"].isdigit() and ours["TORCHELASTIC_RUN_ID"]


# --- supervisor ----------------------------------------------------------------
def test_worker_failing_at_every_start_gives_summary(flashrun, launchers, tmp_path):
    rc, _, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "2",
                                "--monitor-interval", "0.1", "--log-dir", str(tmp_path), "-r", "3",
                                script("flashrun_fail_always.py")], timeout=90)
    assert rc == 1
    assert "flashrun_fail_always.py FAILED" in err, err
    assert "Root Cause (first observed failure):" in err
    assert "exitcode  : 1" in err
    assert "RuntimeError: flashrun test failure on rank" in err  # the traceback from the error file
    assert "no restarts left (--max-restarts 2)" in err
    run_dir = glob.glob(str(tmp_path / "*"))[0]
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("attempt_")) == ["attempt_0", "attempt_1", "attempt_2"]
    assert os.path.exists(os.path.join(run_dir, "status.json"))  # the checkpoint service's status
    # The rank named as the root cause wrote its traceback; the other one may have been stopped
    # before it got that far (both fail at once, the first exit stops the group).
    root_rank = re.search(r"rank      : (\d+) \(local_rank: (\d+)\)", err).group(2)
    with open(os.path.join(run_dir, "attempt_2", root_rank, "stderr.log")) as f:
        assert "RuntimeError: flashrun test failure on rank" in f.read()


def test_logs_redirects_and_tee_prefix(flashrun, launchers, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "2", "--log-dir",
                                  str(tmp_path / "logs"), "--rdzv-id", "ignored", "-t", "0:1", "-r", "1:1",
                                  script("flashrun_env_dump.py"), str(out_dir)], timeout=30)
    assert rc == 0, err
    assert "[default0]:rank 0 done" in out
    assert "rank 1 done" not in out  # redirected only
    run_dir = glob.glob(str(tmp_path / "logs" / "*"))[0]
    for rank in (0, 1):
        with open(os.path.join(run_dir, "attempt_0", str(rank), "stdout.log")) as f:
            assert f.read() == "rank %d done\n" % rank


def test_sigterm_leaves_no_worker_behind(flashrun, launchers, tmp_path):
    p = launchers.start([flashrun, "--standalone", "--nproc-per-node", "2", "--shutdown-timeout", "2",
                         script("flashrun_sleep.py"), str(tmp_path), "120"])
    wait_for(lambda: len(glob.glob(str(tmp_path / "pid_*"))) == 2, 30, "workers to start")
    pids = []
    for f in glob.glob(str(tmp_path / "pid_*")):
        pids += [int(x) for x in open(f).read().split()]
    launchers.extra_pids += pids
    assert all(pid_alive(pid) for pid in pids)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=20)
    assert p.returncode == 128 + signal.SIGTERM
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), 10, "workers and their children to be gone")


def test_sigint_leaves_no_worker_behind(flashrun, launchers, tmp_path):
    p = launchers.start([flashrun, "--standalone", "--nproc-per-node", "1", script("flashrun_sleep.py"),
                         str(tmp_path), "120"])
    wait_for(lambda: len(glob.glob(str(tmp_path / "pid_*"))) == 1, 30, "worker to start")
    pids = [int(x) for x in open(glob.glob(str(tmp_path / "pid_*"))[0]).read().split()]
    launchers.extra_pids += pids
    p.send_signal(signal.SIGINT)
    p.wait(timeout=40)
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), 10, "worker to be gone")


def test_hung_worker_is_restarted_after_worker_timeout(flashrun, launchers, tmp_path):
    rc, _, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "1", "--max-restarts", "1",
                                "--monitor-interval", "0.2", "--worker-timeout", "1.5",
                                script("flashrun_heartbeat.py"), str(tmp_path)], timeout=60)
    assert rc == 0, err
    assert "no heartbeat" in err, err
    assert open(tmp_path / "done_0").read() == "1"
    pid = int(open(tmp_path / "pid_0_0").read())
    assert not pid_alive(pid)


# --- multi-node on 127.0.0.1 ---------------------------------------------------
def _port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _two_agent_args(flashrun, port, run_id, nnodes, node_name, extra):
    return [flashrun, "--nnodes", nnodes, "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:%d" % port, "--rdzv-id", run_id, "--rdzv-conf", FAST_RDZV,
            "--monitor-interval", "0.1", "--local-addr", "127.0.0.1", "--node-name", node_name] + extra


def test_two_agents_restart_after_worker_sigkill(flashrun, launchers, tmp_path):
    port = free_port()
    train = ["--max-restarts", "2", script("flashrun_train.py"), str(tmp_path), "40",
             "--kill-rank", "3", "--kill-step", "10"]
    a = launchers.start(_two_agent_args(flashrun, port, "kill-worker", "2", "node-a", train))
    b = launchers.start(_two_agent_args(flashrun, port, "kill-worker", "2", "node-b", train))
    out_a, err_a = a.communicate(timeout=120)
    out_b, err_b = b.communicate(timeout=60)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    for rank in range(4):
        done = json.load(open(tmp_path / ("done_%d.json" % rank)))
        assert done["restart_count"] == 1 and done["world_size"] == 4
    assert os.path.exists(tmp_path / "start_3_1.txt") and not os.path.exists(tmp_path / "start_3_2.txt")


def test_agent_sigkilled_survivor_goes_on_alone(flashrun, launchers, tmp_path):
    port = free_port()
    train = ["--max-restarts", "2", script("flashrun_train.py"), str(tmp_path), "400", "--step-seconds", "0.02"]
    a = launchers.start(_two_agent_args(flashrun, port, "kill-agent", "1:2", "node-a", train))
    # a hosts the rendezvous (the first to bind); b, the one killed, is a client.
    wait_for(lambda: _port_open(port), 20, "node a to host the rendezvous")
    b = launchers.start(_two_agent_args(flashrun, port, "kill-agent", "1:2", "node-b", train))
    wait_for(lambda: len(glob.glob(str(tmp_path / "start_*_0.txt"))) == 4, 60, "4 workers to start")
    time.sleep(3)  # training
    victim = b
    victim_pids = [int(open(f).read().split()[1]) for f in glob.glob(str(tmp_path / "start_*_0.txt"))]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    launchers.extra_pids += victim_pids
    out_a, err_a = a.communicate(timeout=150)
    assert a.returncode == 0, err_a
    done = [json.load(open(f)) for f in glob.glob(str(tmp_path / "done_*.json"))]
    assert len(done) == 2 and all(d["world_size"] == 2 for d in done), done


def test_sigterm_while_waiting_for_other_nodes_exits_promptly(flashrun, launchers, tmp_path):
    port = free_port()
    p = launchers.start(_two_agent_args(flashrun, port, "lonely", "2", "node-a",
                                        [script("flashrun_env_dump.py"), str(tmp_path)]))
    wait_for(lambda: _port_open(port), 20, "the agent to host the rendezvous")
    time.sleep(0.5)
    started = time.time()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=10)
    assert p.returncode == 128 + signal.SIGTERM
    assert time.time() - started < 5


def test_static_backend_single_node(flashrun, launchers, tmp_path):
    port = free_port()
    rc, _, err = launchers.run([flashrun, "--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(port),
                                script("flashrun_env_dump.py"), str(tmp_path)], timeout=30)
    assert rc == 0, err
    env = json.load(open(tmp_path / "env_1.json"))
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(port)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["GROUP_WORLD_SIZE"] == "1"


def test_python_module_entry_point(launchers, tmp_path):
    binary = flashrun_binary()
    rc, _, err = launchers.run([PYTHON, "-m", "flashckpt.run", "--standalone", script("flashrun_env_dump.py"),
                                str(tmp_path)], env={"FLASHRUN_BIN": binary,
                                                     "PYTHONPATH": os.path.join(REPO, "python")}, timeout=30)
    assert rc == 0, err
    env = json.load(open(tmp_path / "env_0.json"))
    assert env["FLASHRUN_PYTHON_INTERPRETER"] == PYTHON


def _summary_block(text):
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("====="))
    end = max(i for i, l in enumerate(lines) if l.startswith("====="))
    block = []
    for line in lines[start:end + 1]:
        for field in ("  time      : ", "  exitcode  : ", "  error_file: "):
            if line.startswith(field):
                line = field + "<varies>"
        if line.endswith(" FAILED"):
            # torchrun names the interpreter instead of the script when PYTHON_EXEC is set
            line = "<entrypoint> FAILED"
        block.append(line)
    return block


def test_failure_summary_matches_torchrun(flashrun, launchers, tmp_path):
    if not os.access("/usr/bin/torchrun", os.X_OK):
        pytest.skip("Debian's torchrun (python3-torch) is not installed")
    flags = ["-r", "1", "-t", "1", "--standalone", "--nproc_per_node", "1", script("flashrun_fail_always.py")]
    rc_t, out_t, err_t = launchers.run(["/usr/bin/torchrun"] + flags, timeout=90)
    rc_f, out_f, err_f = launchers.run([flashrun] + flags, timeout=60)
    assert rc_t != 0 and rc_f == 1
    assert _summary_block(err_f) == _summary_block(err_t + out_t)


def test_new_node_below_max_triggers_rerendezvous(flashrun, launchers, tmp_path):
    port = free_port()
    train = ["--max-restarts", "0", script("flashrun_train.py"), str(tmp_path), "150", "--step-seconds", "0.02"]
    a = launchers.start(_two_agent_args(flashrun, port, "scale-up", "1:2", "node-a", train))
    wait_for(lambda: os.path.exists(tmp_path / "start_0_0.txt"), 60, "node a's workers to start alone")
    b = launchers.start(_two_agent_args(flashrun, port, "scale-up", "1:2", "node-b", train))
    out_a, err_a = a.communicate(timeout=120)
    out_b, err_b = b.communicate(timeout=60)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    assert "a node failed, left or joined" in err_a
    done = [json.load(open(f)) for f in glob.glob(str(tmp_path / "done_*.json"))]
    assert sorted(d["rank"] for d in done) == [0, 1, 2, 3]
    assert all(d["world_size"] == 4 and d["restart_count"] == 0 for d in done)  # scaling is not a restart


def test_local_ranks_filter_module_and_run_path(flashrun, launchers, tmp_path):
    rc, out, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "2", "-t", "3",
                                  "--local-ranks-filter", "1", "--log-dir", str(tmp_path / "logs"),
                                  script("flashrun_env_dump.py"), str(tmp_path / "filter")], timeout=30)
    assert rc == 0, err
    assert "[default1]:rank 1 done" in out and "rank 0 done" not in out
    # -m: the script directory on PYTHONPATH, the module name as the entry point
    rc, _, err = launchers.run([flashrun, "--standalone", "-m", "flashrun_env_dump", str(tmp_path / "module")],
                               env={"PYTHONPATH": os.path.dirname(script("flashrun_env_dump.py"))}, timeout=30)
    assert rc == 0, err
    assert os.path.exists(tmp_path / "module" / "env_0.json")
    rc, _, err = launchers.run([flashrun, "--standalone", "--run-path", script("flashrun_env_dump.py"),
                                str(tmp_path / "run_path")], timeout=30)
    assert rc == 0, err
    assert os.path.exists(tmp_path / "run_path" / "env_0.json")


# --- persists in trouble ---------------------------------------------------------
def _trouble(flashrun, launchers, tmp_path, *args):
    shm = tmp_path / "shm"
    shm.mkdir()
    ckpt = tmp_path / "ckpt"
    env = {"PYTHONPATH": os.path.join(REPO, "python"), "FLASHCKPT_SHM_DIR": str(shm)}
    rc, out, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "1", "--log-dir",
                                  str(tmp_path / "logs"), "-t", "3", script("flashrun_persist_trouble.py"),
                                  str(ckpt)] + [str(x) for x in args], timeout=120, env=env)
    return rc, out, err, ckpt, shm


def test_a_removed_segment_is_created_again_and_the_job_stays_durable(flashrun, launchers, tmp_path):
    rc, out, err, ckpt, shm = _trouble(flashrun, launchers, tmp_path, "--steps", 6, "--remove-segment-after", 3)
    assert rc == 0, err[-4000:]
    assert "was removed by another process while in use" in err and "RemoveIPC" in err, err[-4000:]
    for step in range(1, 7):
        assert "durable %d" % step in out, out
    with open(ckpt / "latest") as f:
        assert f.read().strip() == "6"
    assert not list(shm.iterdir()), "the agent removes durable segments at the end"


def test_a_persist_that_failed_at_the_end_makes_flashrun_exit_3(flashrun, launchers, tmp_path):
    rc, out, err, ckpt, shm = _trouble(flashrun, launchers, tmp_path, "--steps", 4, "--block-last")
    try:
        assert rc == 3, err[-4000:]
        # The worker heard of it at exit, loudly...
        assert "could not make every snapshot durable" in err and "persisting step 4 failed" in err, err[-4000:]
        # ...and flashrun says what is not on storage.
        assert "all workers finished, but the newest snapshots could not be made durable" in err, err[-4000:]
        assert "rank 0: step 4 (newest durable: 3)" in err, err[-4000:]
        assert "all workers finished successfully" not in err
        with open(ckpt / "latest") as f:
            assert f.read().strip() == "3"
        # Counted in the agent's status (and metrics).
        status_files = glob.glob(str(tmp_path / "logs" / "*" / "status.json"))
        assert len(status_files) == 1, status_files
        with open(status_files[0]) as f:
            status = json.load(f)
        assert status["persist_failures"] >= 1, status  # the worker's, and the retry at the end
        assert status["ranks"]["0"]["newest_failed_step"] == 4, status
    finally:
        for f in shm.iterdir():  # the undurable segment is kept for a later run: not for this test
            f.unlink()


# --- torch 2.x's flags (torch/distributed/run.py) ------------------------------
PRINTER = ("import os, sys\n"
           "r = os.environ['RANK']\n"
           "print('step 1 loss 0.5 rank ' + r, flush=True)\n"
           "print('nothing to see ' + r, flush=True)\n"
           "print('acc,top1 ' + r, flush=True)\n"
           "print('NCCL WARN rank ' + r, file=sys.stderr, flush=True)\n"
           "print('plain stderr ' + r, file=sys.stderr, flush=True)\n")


def _run_dir(logs):
    dirs = glob.glob(str(logs / "*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.parametrize("streams", ["console", "tee", "redirect"])
def test_duplicate_filters_copy_matching_lines_to_the_attempt_log(flashrun, launchers, tmp_path, streams):
    prog = tmp_path / "printer.py"
    prog.write_text(PRINTER)
    logs = tmp_path / "logs"
    extra = {"console": [], "tee": ["-t", "3"], "redirect": ["-r", "3"]}[streams]
    rc, out, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "2", "--log-dir", str(logs),
                                  "--duplicate-stdout-filters", "loss,acc,,top1", "--duplicate_stderr_filters", "NCCL"]
                                 + extra + [str(prog)], timeout=60)
    assert rc == 0, err
    attempt = os.path.join(_run_dir(logs), "attempt_0")
    with open(os.path.join(attempt, "filtered_stdout.log")) as f:
        lines = sorted(f.read().splitlines())
    assert lines == sorted(["[default%d]:step 1 loss 0.5 rank %d" % (r, r) for r in (0, 1)]
                           + ["[default%d]:acc,top1 %d" % (r, r) for r in (0, 1)]), lines
    with open(os.path.join(attempt, "filtered_stderr.log")) as f:
        assert sorted(f.read().splitlines()) == ["[default0]:NCCL WARN rank 0", "[default1]:NCCL WARN rank 1"]
    # the console and the per-rank logs are what they are without filters
    if streams == "console":
        assert "nothing to see 0" in out and "\nstep 1 loss 0.5 rank 1" in "\n" + out
        assert "plain stderr 1" in err
    elif streams == "tee":
        assert "[default1]:nothing to see 1" in out
    else:
        assert "nothing to see" not in out and "loss" not in out
    if streams != "console":
        with open(os.path.join(attempt, "1", "stdout.log")) as f:
            assert f.read().count("\n") == 3


def test_virtual_local_rank_gives_each_worker_its_device_as_device_0(flashrun, launchers, tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "5,7"}
    rc, _, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "2", "--virtual-local-rank",
                                script("flashrun_env_dump.py"), str(tmp_path)], timeout=30, env=env)
    assert rc == 0, err
    for rank, device in ((0, "5"), (1, "7")):
        with open(tmp_path / ("env_%d.json" % rank)) as f:
            e = json.load(f)
        assert e["LOCAL_RANK"] == "0" and e["RANK"] == str(rank) and e["CUDA_VISIBLE_DEVICES"] == device, e
    rc, _, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "2", "--virtual-local-rank",
                                script("flashrun_env_dump.py"), str(tmp_path)], timeout=30,
                               env={"CUDA_VISIBLE_DEVICES": "3"})
    assert rc == 2 and "CUDA_VISIBLE_DEVICES='3' lists 1 devices for 2 workers" in err, err


def test_console_event_log_handler_prints_torchelastic_status_events(flashrun, launchers, tmp_path):
    rc, _, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "2", "--event-log-handler", "console",
                                script("flashrun_env_dump.py"), str(tmp_path)], timeout=30)
    assert rc == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.startswith('{"name": "torchelastic.')]
    assert [(e["source"], e["metadata"]["global_rank"]) for e in events] == [("WORKER", 0), ("WORKER", 1),
                                                                           ("AGENT", None)], events
    assert all(e["name"] == "torchelastic.worker.status.SUCCEEDED" for e in events)
    assert json.loads(events[1]["metadata"]["metadata"])["local_rank"] == 1
    # a failure: FAILED, with the worker's error
    rc, _, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "1", "--event_log_handler", "console",
                                script("flashrun_fail_always.py"), str(tmp_path)], timeout=60)
    assert rc == 1
    events = [json.loads(line) for line in err.splitlines() if line.startswith('{"name": "torchelastic.')]
    assert [e["name"] for e in events] == ["torchelastic.worker.status.FAILED"] * 2, events
    assert events[0]["metadata"]["raw_error"], events[0]
    # and none with the default handler
    rc, _, err = launchers.run([flashrun, "--standalone", "--nproc-per-node", "1", script("flashrun_env_dump.py"),
                                str(tmp_path)], timeout=30)
    assert rc == 0 and "torchelastic.worker.status" not in err


"""Multi-node end to end on the test bed (tests/e2e/scripts/testbed.py): each node
in its own network and mount namespace, with its own address on a bridge and its
own /dev/shm; the checkpoint directory is shared. Skipped with the reason where
namespaces cannot be made (not root, no kernel support); the loopback variants in
test_recovery.py run everywhere.
"""
import functools
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from flashrun_harness import PYTHON, flashrun_binary, wait_for  # noqa: E402
from testbed import TestBed  # noqa: E402
from test_recovery import (FAST_RDZV, TRAIN as TRAIN_SCRIPT, _committed_steps, _env, make_ckpt_dir,  # noqa: E402
                           resumed, snapshotted, train_args, worker_logs)

PORT = 29400  # every node has its own port space


@pytest.fixture
def bed():
    b = TestBed.create()
    yield b
    b.destroy()


@pytest.fixture(scope="module")
def flashrun():
    return flashrun_binary()


def agent_argv(flashrun, node, name, endpoint, run_id, logs, extra, max_restarts="2", backend="c10d"):
    return [flashrun, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", backend,
            "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--rdzv-conf", FAST_RDZV, "--monitor-interval", "0.1",
            "--local-addr", node.address, "--node-name", name, "--max-restarts", max_restarts,
            "--log-dir", str(logs), "-r", "3"] + extra


def last_attempt(log_dir):
    attempts = [int(p.rsplit("_", 1)[1]) for p in glob.glob(str(log_dir / "*" / "attempt_*"))]
    assert attempts, "no attempt logged under %s" % log_dir
    return max(attempts)


def communicate(p, timeout, *others):
    """p's output once it exits within `timeout` s. On a timeout, p and `others`
    (the other nodes' agents, still running) are killed and every one's output
    goes into the error: a hang on one node often shows only on another."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        report = ["timed out after %s s" % timeout]
        for i, q in enumerate((p,) + others):
            if q.poll() is None:
                os.killpg(q.pid, signal.SIGKILL)
            out, err = q.communicate(timeout=10)
            report.append("--- %s\nstdout:\n%s\nstderr:\n%s" % ("this agent" if i == 0 else "agent %d" % i,
                                                                 out[-3000:], err[-6000:]))
        raise AssertionError("\n".join(report))


def test_nodes_have_their_own_address_memory_and_nothing_else(bed, tmp_path):
    a, b = bed.add_node("a"), bed.add_node("b")
    probe = ("import os, socket, sys\n"
             "open('/dev/shm/fck-bed-probe', 'w').write(sys.argv[1])\n"
             "print(sorted(f for f in os.listdir('/dev/shm') if f.startswith('fck-bed')))\n"
             "s = socket.socket(); s.settimeout(3)\n"
             "print('peer', s.connect_ex((sys.argv[2], 9)))\n"  # closed port on the peer: refused (111), not unreachable
             "s = socket.socket(); s.settimeout(3)\n"
             "print('outside', s.connect_ex(('192.0.2.1', 80)))\n")  # no route off the bridge
    outs = []
    for node, peer in ((a, b), (b, a)):
        p = node.start([PYTHON, "-c", probe, node.name, peer.address])
        out, err = communicate(p, 30)
        assert p.returncode == 0, err
        outs.append(out)
    for out in outs:
        assert "['fck-bed-probe']" in out, out  # its own file only
        assert "peer 111" in out, out
        assert re.search(r"outside (101|113|110|11)\b", out), out  # ENETUNREACH / EHOSTUNREACH / timeout
    assert not os.path.exists("/dev/shm/fck-bed-probe")  # the host's /dev/shm saw nothing


class Rendezvous:
    """Where the agents meet: the built-in server hosted by node a's agent, or an
    etcd member in a node of its own."""

    def __init__(self, bed, backend, a):
        self.backend = backend
        if backend == "c10d":
            self.endpoint = "%s:%d" % (a.address, PORT)
            self.store = "the rendezvous store at %s" % self.endpoint
            self.etcd = None
        else:
            self.etcd = bed.start_etcd(1)
            self.endpoint = self.etcd.endpoints
            self.store = "etcd at %s" % self.endpoint

    def settle(self):
        if self.backend == "c10d":
            time.sleep(1)  # node a hosts the rendezvous: let it bind first


BACKENDS = pytest.mark.parametrize("backend", ["c10d", "etcd-v3"])


@BACKENDS
def test_worker_kill_resumes_from_each_nodes_memory_and_a_lost_node_from_storage(bed, flashrun, tmp_path, backend):
    ck = make_ckpt_dir(tmp_path / "ckpt")
    a, b = bed.add_node("a"), bed.add_node("b")
    rdzv = Rendezvous(bed, backend, a)
    endpoint = rdzv.endpoint

    agent = functools.partial(agent_argv, backend=backend)

    env = _env()
    env["GLOO_SOCKET_IFNAME"] = "eth0"  # gloo would take the address the host name resolves to (loopback here)

    # 1. rank 3 (node b) SIGKILLs itself right after step 15: both nodes restore it from their own memory.
    crash = train_args(ck, "--crash-at-step", 15, "--crash-rank", 3)
    pa = a.start(agent(flashrun, a, "node-a", endpoint, "bed-kill", tmp_path / "logs-a", crash), env=env)
    rdzv.settle()
    pb = b.start(agent(flashrun, b, "node-b", endpoint, "bed-kill", tmp_path / "logs-b", crash), env=env)
    out_a, err_a = communicate(pa, 120, pb)
    out_b, err_b = communicate(pb, 60)
    assert pa.returncode == 0 and pb.returncode == 0, err_a[-4000:] + err_b[-4000:]
    for err in (err_a, err_b):
        assert "restore step 15: in memory on every node" in err, err[-4000:]
        assert "commit through %s" % rdzv.store in err, err[-4000:]
    for logs in ("logs-a", "logs-b"):
        out = worker_logs(tmp_path / logs, 1)
        assert sorted(out) == [0, 1] and all(resumed(t) == [(15, "memory")] for t in out.values()), out
    assert 30 in _committed_steps(ck)

    # 2. node b is lost (its processes killed, its /dev/shm gone with its mount namespace);
    #    its replacement, with empty memory, and node a resume from the same committed step.
    ck2 = make_ckpt_dir(tmp_path / "ckpt2")
    slow = train_args(ck2, "--persist-every", 2, "--step-sleep", 0.15)
    pa = a.start(agent(flashrun, a, "node-a", endpoint, "bed-loss", tmp_path / "loss-a", slow), env=env)
    rdzv.settle()
    pb = b.start(agent(flashrun, b, "node-b", endpoint, "bed-loss", tmp_path / "loss-b", slow), env=env)

    def newest_on_a():
        logs = worker_logs(tmp_path / "loss-a", 0)
        return min([max(snapshotted(t), default=0) for t in logs.values()] or [0]) if len(logs) == 2 else 0

    wait_for(lambda: newest_on_a() >= 20, 120, "node a's workers to snapshot step 20")
    b.kill()
    committed = _committed_steps(ck2)
    assert committed, "nothing committed before the node was lost"
    b2 = bed.add_node("b2")
    pb2 = b2.start(agent(flashrun, b2, "node-b", endpoint, "bed-loss", tmp_path / "loss-b2", slow), env=env)
    out_a, err_a = communicate(pa, 180, pb2)
    out_b2, err_b2 = communicate(pb2, 60)
    assert pa.returncode == 0 and pb2.returncode == 0, err_a[-4000:] + err_b2[-4000:]
    # A restart anywhere counts for every node: the replacement's first attempt
    # is numbered by the job's restart count, not 0 (it is 1 when node a's workers
    # failed before node b2 joined, 0 when b2 joined first).
    lines = [resumed(t) for t in worker_logs(tmp_path / "loss-a", last_attempt(tmp_path / "loss-a")).values()]
    lines_b2 = [resumed(t) for t in worker_logs(tmp_path / "loss-b2", last_attempt(tmp_path / "loss-b2")).values()]
    steps = {l[0][0] for l in lines + lines_b2}
    assert len(lines + lines_b2) == 4 and len(steps) == 1, (lines, lines_b2)
    assert steps.pop() == max(committed), (lines, lines_b2, committed)
    assert all(l[0][1] == "storage" for l in lines_b2), lines_b2


@BACKENDS
def test_a_partitioned_node_is_left_behind_and_stops_its_workers(bed, flashrun, tmp_path, backend):
    """--nnodes 1:2. Node b's link goes down: node a stops hearing its keep-alives, re-rendezvous
    alone and finishes the job in a world of 2 from the newest committed step; node b cannot reach
    the rendezvous, stops its workers and exits with an error instead of training on as a second
    world (split brain) over the same checkpoint directory."""
    ck = make_ckpt_dir(tmp_path / "ckpt")
    a, b = bed.add_node("a"), bed.add_node("b")
    rdzv = Rendezvous(bed, backend, a)
    endpoint = rdzv.endpoint
    env = _env()
    env["GLOO_SOCKET_IFNAME"] = "eth0"
    ev = tmp_path / "events"
    train = [TRAIN_SCRIPT, "--dir", str(ck), "--steps", "60", "--every", "5", "--replicated", "--events", str(ev),
             "--step-sleep", "0.1"]

    def start(node, name):
        args = agent_argv(flashrun, node, name, endpoint, "bed-split", tmp_path / ("logs-" + node.name), train,
                      backend=backend)
        args[args.index("--nnodes") + 1] = "1:2"
        return node.start(args, env=env)

    pa = start(a, "node-a")
    rdzv.settle()
    pb = start(b, "node-b")
    wait_for(lambda: len([l for l in _lines(ev) if l.startswith("save step=10 ")]) == 4, 120,
             "the world of 4 to save step 10")
    b.partition()
    cut = time.time()
    out_b, err_b = communicate(pb, 120, pa)
    b_exited = time.time() - cut
    out_a, err_a = communicate(pa, 180)
    assert pa.returncode == 0, err_a[-6000:]
    assert pb.returncode != 0, err_b[-4000:]
    assert b_exited < 90, b_exited
    # it noticed within its keep-alives, stopped its workers, and gave up after join_timeout
    lost = "lost the rendezvous server" if backend == "c10d" else "lost this node's etcd lease"
    assert lost in err_b and "could not join after" in err_b, err_b[-4000:]
    assert endpoint in err_b.splitlines()[-1] if err_b.splitlines() else False, err_b[-2000:]
    assert not b.pids(), b.pids()  # its workers are gone with it
    saves = [l for l in _lines(ev) if l.startswith("save ")]
    # after the cut, node b's ranks (2, 3) saved nothing in a world of their own
    assert not [l for l in saves if " world=2 " in l and (" rank=2 " in l or " rank=3 " in l)], saves
    done = [l for l in _lines(ev) if l.startswith("done ")]
    assert sorted(done) == sorted(l for l in done if " world=2 " in l) and len(done) == 2, done
    assert "the world is now 2 ranks" in err_a, err_a[-6000:]


def _lines(path):
    return open(path).read().splitlines() if os.path.exists(path) else []


# --- etcd faults (etcd-v3 only) ---------------------------------------------------------------
def _etcd_job(bed, flashrun, tmp_path, run_id, etcd, rdzv_conf, steps="60"):
    """2 nodes x 2 workers on etcd, training `steps` steps (a snapshot every 5, 0.1 s a step)."""
    ck = make_ckpt_dir(tmp_path / "ckpt")
    a, b = bed.add_node("a"), bed.add_node("b")
    env = _env()
    env["GLOO_SOCKET_IFNAME"] = "eth0"
    ev = tmp_path / "events"
    train = [TRAIN_SCRIPT, "--dir", str(ck), "--steps", steps, "--every", "5", "--events", str(ev),
             "--step-sleep", "0.1"]
    procs = []
    for node, name in ((a, "node-a"), (b, "node-b")):
        args = agent_argv(flashrun, node, name, etcd.endpoints, run_id, tmp_path / ("logs-" + node.name), train,
                          backend="etcd-v3")
        args[args.index("--rdzv-conf") + 1] = rdzv_conf
        procs.append(node.start(args, env=env))
    return ck, ev, procs


def test_an_etcd_member_killed_mid_run_does_not_stop_the_job(bed, flashrun, tmp_path):
    """A 3-member etcd cluster; the member every agent talks to first is killed after step 10:
    the clients go on to the others, the job trains to the end in one attempt and commits."""
    etcd = bed.start_etcd(3)
    # A lease of 3 s rides out etcd's election of a new leader (election timeout 1 s here).
    conf = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=1,join_timeout=30"
    ck, ev, (pa, pb) = _etcd_job(bed, flashrun, tmp_path, "bed-member", etcd, conf)
    wait_for(lambda: len([l for l in _lines(ev) if l.startswith("save step=10 ")]) == 4, 120,
             "the world of 4 to save step 10")
    etcd.stop(0)
    out_a, err_a = communicate(pa, 180, pb)
    out_b, err_b = communicate(pb, 60)
    assert pa.returncode == 0 and pb.returncode == 0, err_a[-4000:] + err_b[-4000:]
    for err in (err_a, err_b):
        assert "lost this node's etcd lease" not in err, err[-4000:]
    assert 60 in _committed_steps(ck)
    done = [l for l in _lines(ev) if l.startswith("done ")]
    assert len(done) == 4 and all(" world=4 " in l for l in done), done
    resumes = [l for l in _lines(ev) if l.startswith("resume ")]
    assert not resumes, resumes  # never restarted


def test_etcd_down_mid_run_stops_the_workers_and_the_job_resumes_when_it_is_back(bed, flashrun, tmp_path):
    """All of etcd (one member) goes down after step 10. No agent can renew its lease: each stops
    its workers (none trains on without the others' word) and keeps trying to join. etcd comes
    back within join_timeout: the agents form the next round and resume from their memory."""
    etcd = bed.start_etcd(1)
    ck, ev, (pa, pb) = _etcd_job(bed, flashrun, tmp_path, "bed-down", etcd, FAST_RDZV)
    wait_for(lambda: len([l for l in _lines(ev) if l.startswith("save step=10 ")]) == 4, 120,
             "the world of 4 to save step 10")
    etcd.stop(0)
    down = time.time()
    time.sleep(3.5)  # past the 2 s lease (and a renewal period): every agent has stopped its workers
    saves_then = len([l for l in _lines(ev) if l.startswith("save ")])
    time.sleep(2)  # 0.1 s a step, a save every 5: 4 more saves a second if anyone trained on
    assert len([l for l in _lines(ev) if l.startswith("save ")]) == saves_then, "workers trained on without etcd"
    etcd.start(0)
    etcd.wait_healthy(30)
    out_a, err_a = communicate(pa, 180, pb)
    out_b, err_b = communicate(pb, 60)
    assert pa.returncode == 0 and pb.returncode == 0, err_a[-4000:] + err_b[-4000:]
    for err in (err_a, err_b):
        assert "lost this node's etcd lease" in err, err[-4000:]
    resumes = [l for l in _lines(ev) if l.startswith("resume ")]
    assert len(resumes) == 4 and all(" source=memory " in l for l in resumes), resumes
    step = {int(re.search(r"step=(\d+)", l).group(1)) for l in resumes}
    assert len(step) == 1 and step.pop() >= 10, resumes
    done = [l for l in _lines(ev) if l.startswith("done ")]
    assert len(done) == 4 and all(" world=4 " in l for l in done), done
    assert 60 in _committed_steps(ck)
    assert time.time() - down < 200


def _two_node_job(bed, flashrun, tmp_path, backend, run_id, train, nnodes="2"):
    """Nodes a and b, their agents' argv for `train`; returns (a, b, rdzv, start(node, name))."""
    a, b = bed.add_node("a"), bed.add_node("b")
    rdzv = Rendezvous(bed, backend, a)
    env = _env()
    env["GLOO_SOCKET_IFNAME"] = "eth0"

    def start(node, name):
        args = agent_argv(flashrun, node, name, rdzv.endpoint, run_id, tmp_path / ("logs-" + node.name), train,
                          backend=backend)
        args[args.index("--nnodes") + 1] = nnodes
        return node.start(args, env=env)

    return a, b, rdzv, start


@BACKENDS
def test_sigterm_to_every_flashrun_commits_the_newest_snapshot(bed, flashrun, tmp_path, backend):
    """The workers persist only their first snapshot; SIGTERM to both agents at once: each
    stops its workers and persists its ranks' newest snapshot, and rank 0's agent commits it
    across the nodes before they exit."""
    ck = make_ckpt_dir(tmp_path / "ckpt")
    ev = tmp_path / "events"
    train = [TRAIN_SCRIPT, "--dir", str(ck), "--steps", "1000", "--every", "5", "--persist-every", "1000",
             "--events", str(ev), "--step-sleep", "0.05"]
    a, b, rdzv, start = _two_node_job(bed, flashrun, tmp_path, backend, "bed-term", train)
    pa = start(a, "node-a")
    rdzv.settle()
    pb = start(b, "node-b")

    def newest_all():
        saves = {}
        for l in _lines(ev):
            if l.startswith("save "):
                r = int(re.search(r" rank=(\d+)", l).group(1))
                saves[r] = max(saves.get(r, 0), int(re.search(r"step=(\d+)", l).group(1)))
        return min(saves.values()) if len(saves) == 4 else 0

    wait_for(lambda: newest_all() >= 20, 120, "every rank to snapshot step 20")
    assert _committed_steps(ck) == [5]
    pa.send_signal(signal.SIGTERM)
    pb.send_signal(signal.SIGTERM)
    out_a, err_a = communicate(pa, 90, pb)
    out_b, err_b = communicate(pb, 90)
    assert pa.returncode == 128 + signal.SIGTERM and pb.returncode == 128 + signal.SIGTERM, err_a[-4000:] + err_b[-4000:]
    newest = newest_all()
    committed = _committed_steps(ck)
    # a worker may have saved a step and been stopped before it logged it: at most one step newer
    assert max(committed) in (newest, newest + 5), (committed, newest)
    assert "persisting rank 0 step %d" % max(committed) in err_a + err_b, (err_a + err_b)[-4000:]


@BACKENDS
def test_a_node_joining_below_max_starts_a_round_with_it(bed, flashrun, tmp_path, backend):
    """--nnodes 1:2: node a trains alone (a world of 2); node b joins: a's agent stops its
    workers, the next round has both nodes, and the world of 4 goes on from the newest
    committed step (a world of another size restores committed steps only)."""
    ck = make_ckpt_dir(tmp_path / "ckpt")
    ev = tmp_path / "events"
    train = [TRAIN_SCRIPT, "--dir", str(ck), "--steps", "60", "--every", "5", "--replicated", "--events", str(ev),
             "--step-sleep", "0.1"]
    a, b, rdzv, start = _two_node_job(bed, flashrun, tmp_path, backend, "bed-join", train, nnodes="1:2")
    pa = start(a, "node-a")
    # committed, not only saved: a persist still in flight when b joins is abandoned before the next round
    # (the round's restore step must not be overtaken by a commit of the old world), and step 5 restores
    wait_for(lambda: [l for l in _lines(ev) if l.startswith("save step=10 ") and " world=2 " in l]
             and 10 in _committed_steps(ck), 120, "node a alone to save and commit step 10")
    pb = start(b, "node-b")
    out_a, err_a = communicate(pa, 180, pb)
    out_b, err_b = communicate(pb, 90)
    assert pa.returncode == 0 and pb.returncode == 0, err_a[-4000:] + err_b[-4000:]
    resumes = [l for l in _lines(ev) if l.startswith("resume ") and " world=4 " in l]
    assert len(resumes) == 4, "\n".join(_lines(ev)[-20:]) + "\n--- node a:\n" + err_a[-6000:] + "\n--- node b:\n" + err_b[-6000:]
    steps = {int(re.search(r"step=(\d+)", l).group(1)) for l in resumes}
    assert len(steps) == 1, resumes
    step = steps.pop()
    assert step >= 10, resumes
    # the world of 4 starts from exactly what the world of 2 saved (and committed) at that step
    saved = {re.search(r"digest=(\w+)", l).group(1) for l in _lines(ev)
             if l.startswith("save step=%d " % step) and " world=2 " in l}
    assert len(saved) == 1, (step, saved)
    digest = saved.pop()
    assert all(" digest=%s " % digest in l for l in resumes), (digest, resumes)
    done = [l for l in _lines(ev) if l.startswith("done ")]
    assert len(done) == 4 and all(" world=4 " in l for l in done), done
    assert "the world is now 4 ranks" in err_a, err_a[-4000:]

"""flashrun with --rdzv-backend etcd-v3 on 127.0.0.1 (a real etcd started per test):
runs without root, where the multi-host test bed (test_testbed.py) cannot."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from etcd_harness import local_etcd  # noqa: E402,F401 (a fixture)
from test_recovery import (FAST_RDZV, _committed_steps, agent_args, flashrun, make_ckpt_dir,  # noqa: E402,F401
                           nodes, resumed, train_args, worker_logs)


def test_two_nodes_on_etcd_with_authentication_resume_a_killed_worker_from_memory(flashrun, nodes, local_etcd,
                                                                                  tmp_path):
    local_etcd.enable_auth("s3cret")
    password = tmp_path / "etcd-password"
    password.write_text("s3cret\n")
    conf = FAST_RDZV + ",user=root,password_file=%s" % password
    ck = make_ckpt_dir(tmp_path / "ckpt")
    rid = nodes.run_id("etcd-kill")
    crash = train_args(ck, "--crash-at-step", 15, "--crash-rank", 3)
    procs = []
    for name in ("a", "b"):
        args = agent_args(flashrun, 0, rid, "node-" + name, str(tmp_path / ("logs-" + name)), crash,
                          backend="etcd-v3", endpoint=local_etcd.endpoint, rdzv_conf=conf)
        procs.append(nodes.start(args, nodes.shm_dir(name)))
    outs = [nodes.communicate(p, 90) for p in procs]
    assert all(p.returncode == 0 for p in procs), "".join(err[-4000:] for _, err in outs)
    for _, err in outs:
        assert "etcd-v3 rendezvous '%s' at etcd at %s" % (rid, local_etcd.endpoint) in err, err[-4000:]
        assert "commit through etcd at %s" % local_etcd.endpoint in err, err[-4000:]
        assert "restore step 15: in memory on every node" in err, err[-4000:]
    for name in ("a", "b"):
        out = worker_logs(tmp_path / ("logs-" + name), 1)
        assert sorted(out) == [0, 1] and all(resumed(t) == [(15, "memory")] for t in out.values()), out
    assert 30 in _committed_steps(ck)


def test_a_wrong_etcd_password_is_a_clear_error_at_once(flashrun, nodes, local_etcd, tmp_path):
    local_etcd.enable_auth("s3cret")
    password = tmp_path / "etcd-password"
    password.write_text("wrong\n")
    args = agent_args(flashrun, 0, nodes.run_id("etcd-pw"), "node-a", str(tmp_path / "logs"), ["/bin/true"],
                      nnodes="1", backend="etcd-v3", endpoint=local_etcd.endpoint,
                      rdzv_conf=FAST_RDZV + ",user=root,password_file=%s" % password)
    args.insert(1, "--no-python")
    t0 = time.time()
    p = nodes.start(args, nodes.shm_dir("a"))
    _, err = nodes.communicate(p, 30)
    assert p.returncode != 0
    assert time.time() - t0 < 15, "no hang on a wrong password"
    assert "authentication as user 'root' failed" in err and local_etcd.endpoint in err, err[-3000:]


def test_no_etcd_at_the_endpoint_fails_naming_it(flashrun, nodes, tmp_path):
    from flashrun_harness import free_port
    endpoint = "127.0.0.1:%d" % free_port()
    args = agent_args(flashrun, 0, nodes.run_id("etcd-none"), "node-a", str(tmp_path / "logs"), ["/bin/true"],
                      nnodes="1", backend="etcd-v3", endpoint=endpoint)
    args.insert(1, "--no-python")
    t0 = time.time()
    p = nodes.start(args, nodes.shm_dir("a"))
    _, err = nodes.communicate(p, 60)
    assert p.returncode != 0
    assert time.time() - t0 < 30
    assert endpoint in err and "cannot use etcd" in err, err[-3000:]

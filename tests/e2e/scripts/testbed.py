"""A multi-host test bed on one machine: every simulated node runs in its own
network namespace, with its own address on a bridge the bed creates, and its own
mount namespace with a private /dev/shm and a private node-local directory. A
shared directory (the tests' tmp_path) stands for the parallel file system: it
is the same in every node.

    bed = TestBed.create()          # skips the test with the reason when it cannot
    a = bed.add_node("a")           # namespace, veth on the bridge, address 10.x.y.11
    p = a.start([...flashrun...])   # runs inside the node (Popen)
    a.kill()                        # node loss: every process in it SIGKILLed, its /dev/shm gone
    a.partition() / a.heal()        # its link down / up
    etcd = bed.start_etcd(3)        # an etcd cluster, each member in a node of its own
    bed.destroy()                   # processes, namespaces, links: all gone, also after a failure

Traffic goes only to addresses on the bridge (nodes have no other route) and
to each node's own loopback. The bed checks its setup before anything runs
(root, `ip netns`, `unshare --mount`, a /24 that no interface of the host
uses) and removes what it made.
"""
import os
import random
import shutil
import signal
import subprocess
import time
import uuid

import pytest


def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, timeout=20, check=check)


def _why_not():
    """None when namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "the multi-host test bed needs root (network and mount namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return "the multi-host test bed needs %s" % tool
    probe = "fckprobe%s" % uuid.uuid4().hex[:6]
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return "cannot create a network namespace: %s" % r.stderr.strip()
    _ip("netns", "del", probe, check=False)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True,
                       timeout=20)
    if r.returncode != 0:
        return "cannot create a mount namespace: %s" % r.stderr.strip()
    return None


class Node:
    def __init__(self, bed, name, index):
        self.bed = bed
        self.name = name
        self.netns = "fck%s%d" % (bed.tag, index)
        self.veth = "fv%s%d" % (bed.tag, index)
        self.address = "%s.%d" % (bed.subnet, 10 + index)
        self.local_dir = "/var/tmp/fck-node-%s-%s" % (bed.tag, name)  # a private tmpfs inside the node
        self.procs = []

    def _setup(self):
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.veth + "n")
        _ip("link", "set", self.veth + "n", "netns", self.netns)
        _ip("link", "set", self.veth, "master", self.bed.bridge, "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        _ip("-n", self.netns, "link", "set", self.veth + "n", "name", "eth0")
        _ip("-n", self.netns, "addr", "add", self.address + "/24", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        os.makedirs(self.local_dir, exist_ok=True)

    def start(self, argv, env=None, **kw):
        """Runs argv in this node: its network namespace, and a mount namespace of its own
        with a fresh tmpfs on /dev/shm and on the node-local directory."""
        inner = ("mount -t tmpfs -o size=4g,mode=1777 fck-shm /dev/shm && "
                 "mount -t tmpfs -o size=1g fck-local %s && exec \"$@\"" % self.local_dir)
        cmd = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "--",
               "sh", "-c", inner, "sh"] + [str(a) for a in argv]
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        p = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def pids(self):
        r = _ip("netns", "pids", self.netns, check=False)
        return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []

    def kill(self):
        """Node loss: every process in the node SIGKILLed. Its /dev/shm and local
        directory go with its mount namespace."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        assert not self.pids(), "processes left in %s: %s" % (self.netns, self.pids())

    def partition(self):
        _ip("link", "set", self.veth, "down")

    def heal(self):
        _ip("link", "set", self.veth, "up")

    def _teardown(self):
        self.kill()
        _ip("netns", "del", self.netns, check=False)
        _ip("link", "del", self.veth, check=False)  # gone with the namespace already, normally
        shutil.rmtree(self.local_dir, ignore_errors=True)


_HEALTH_PROBE = """
import json, sys, urllib.request
req = urllib.request.Request("http://%s:2379/v3/kv/range" % sys.argv[1], data=json.dumps({"key": "AA=="}).encode(),
                             headers={"Content-Type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=2).read()
    print("up")
except Exception as e:
    print("down", e)
"""


class EtcdCluster:
    """etcd members on the bed: `endpoints` is what --rdzv-endpoint takes."""

    def __init__(self, nodes):
        self.nodes = nodes
        self.endpoints = ",".join("%s:2379" % n.address for n in nodes)

    def answers(self, node):
        """Whether the member in `node` serves reads (asked from inside that node)."""
        r = subprocess.run(["ip", "netns", "exec", node.netns, "python3", "-c", _HEALTH_PROBE, node.address],
                           capture_output=True, text=True, timeout=20)
        return r.stdout.startswith("up")

    def stop(self, i):
        """Member i's process killed (its data stays)."""
        self.nodes[i].kill()

    def start(self, i):
        self.nodes[i].start(self.nodes[i].etcd_argv)

    def wait_healthy(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self.answers(n) for n in self.nodes):
                return
            time.sleep(0.3)
        raise AssertionError("etcd on the test bed did not come up within %s s (logs: /tmp/fck-*-etcd*.log)" % timeout)


class TestBed:
    __test__ = False  # not a pytest test class
    def __init__(self):
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = "fckbr%s" % self.tag
        self.subnet = None
        self.nodes = []
        self.logs = []

    @classmethod
    def create(cls):
        why = _why_not()
        if why:
            pytest.skip(why)
        bed = cls()
        try:
            bed.subnet = bed._free_subnet()
            _ip("link", "add", bed.bridge, "type", "bridge")
            _ip("link", "set", bed.bridge, "up")
        except Exception:
            bed.destroy()
            raise
        return bed

    @staticmethod
    def _free_subnet():
        used = _ip("-o", "-4", "addr").stdout
        routes = _ip("-4", "route").stdout
        for _ in range(100):
            subnet = "10.%d.%d" % (random.randint(200, 250), random.randint(1, 254))
            if (subnet + ".") not in used and (subnet + ".") not in routes:
                return subnet
        raise RuntimeError("no free 10.x.y.0/24 for the test bed's bridge")

    def add_node(self, name):
        node = Node(self, name, len(self.nodes) + 1)
        self.nodes.append(node)
        node._setup()
        return node

    def start_etcd(self, members=1):
        """An etcd cluster of `members` members, each in a node of its own (data in
        that node's private directory, log in /tmp), up and healthy; skips the test
        where no etcd is installed. Returns an EtcdCluster."""
        binary = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
        if binary is None:
            pytest.skip("no etcd binary (apt install etcd-server)")
        first = len([n for n in self.nodes if n.name.startswith("etcd")])
        nodes = [self.add_node("etcd%d" % (first + i)) for i in range(members)]
        cluster = ",".join("%s=http://%s:2380" % (n.name, n.address) for n in nodes)
        for n in nodes:
            # The data outlives the member's process (a restart keeps it); removed with the bed.
            data = "/var/tmp/fck-%s-%s-data" % (self.tag, n.name)
            log = "/tmp/fck-%s-%s.log" % (self.tag, n.name)
            self.logs += [log, data]
            n.etcd_argv = ["sh", "-c", "exec \"$0\" \"$@\" >> %s 2>&1" % log, binary, "--name", n.name,
                           "--data-dir", data,
                           "--listen-client-urls", "http://%s:2379,http://127.0.0.1:2379" % n.address,
                           "--advertise-client-urls", "http://%s:2379" % n.address,
                           "--listen-peer-urls", "http://%s:2380" % n.address,
                           "--initial-advertise-peer-urls", "http://%s:2380" % n.address,
                           "--initial-cluster", cluster, "--initial-cluster-state", "new",
                           "--heartbeat-interval", "100", "--election-timeout", "1000", "--log-level", "error"]
            n.start(n.etcd_argv)
        etcd = EtcdCluster(nodes)
        etcd.wait_healthy(60)
        return etcd

    def destroy(self):
        errors = []
        for node in self.nodes:
            try:
                node._teardown()
            except Exception as e:  # keep going: remove everything that can be removed
                errors.append("%s: %s" % (node.name, e))
        _ip("link", "del", self.bridge, check=False)
        left = [n.netns for n in self.nodes if n.netns in _ip("netns", "list", check=False).stdout]
        if _ip("link", "show", self.bridge, check=False).returncode == 0:
            left.append(self.bridge)
        for path in self.logs:  # etcd logs and data directories
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)
        if errors or left:
            raise AssertionError("test bed teardown: %s; left: %s" % (errors, left))

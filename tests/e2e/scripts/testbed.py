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


class TestBed:
    __test__ = False  # not a pytest test class
    def __init__(self):
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = "fckbr%s" % self.tag
        self.subnet = None
        self.nodes = []

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
        if errors or left:
            raise AssertionError("test bed teardown: %s; left: %s" % (errors, left))

"""One etcd member on 127.0.0.1 for end-to-end tests: Debian's etcd-server on free
ports, its data in a temporary directory; stopped (SIGKILL) and removed at the end.
Skips the test where no etcd is installed."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

from flashrun_harness import free_port


class LocalEtcd:
    def __init__(self):
        binary = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
        if binary is None:
            pytest.skip("no etcd binary (apt install etcd-server)")
        self.dir = tempfile.mkdtemp(prefix="fck-etcd-", dir="/tmp")
        self.port = free_port()
        peer = free_port()
        self.endpoint = "127.0.0.1:%d" % self.port
        url, peer_url = "http://" + self.endpoint, "http://127.0.0.1:%d" % peer
        self.log = open(os.path.join(self.dir, "etcd.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "--name", "m0", "--data-dir", os.path.join(self.dir, "data"), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls",
             peer_url, "--initial-cluster", "m0=" + peer_url, "--log-level", "error"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while not self.post("/v3/kv/range", {"key": "AA=="}):
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError("etcd did not come up on %s" % self.endpoint)
            time.sleep(0.1)

    def post(self, path, body, token=None):
        """The gateway's JSON answer, or None when etcd did not answer 200."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        req = urllib.request.Request("http://%s%s" % (self.endpoint, path), data=json.dumps(body).encode(),
                                     headers=headers)
        try:
            return json.loads(urllib.request.urlopen(req, timeout=2).read() or b"{}")
        except Exception:
            return None

    def enable_auth(self, password):
        """The root user with that password, and authentication on."""
        assert self.post("/v3/auth/user/add", {"name": "root", "password": password}) is not None
        assert self.post("/v3/auth/role/add", {"name": "root"}) is not None
        assert self.post("/v3/auth/user/grant", {"user": "root", "role": "root"}) is not None
        assert self.post("/v3/auth/enable", {}) is not None
        assert self.post("/v3/kv/range", {"key": "AA=="}) is None  # refused without a token now

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def local_etcd():
    e = LocalEtcd()
    yield e
    e.stop()

"""Workers started by flashrun join torch's ``env://`` store without a lost second.

With ``init_process_group(init_method="env://")`` rank 0 opens the TCPStore at
MASTER_ADDR:MASTER_PORT and every other rank connects to it. A rank whose
connect comes before rank 0 listens is refused, and torch (1.13) tries again
only after a fixed second. After a restart into warm standbys every rank
reaches that point within milliseconds of the others, so that second was most
of the process-group set-up. Here the other ranks wait for rank 0's listener
(a connect every 2 ms, the connection closed at once; the store ignores it)
and then let torch connect. Nothing else changes: same store, same timeout.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from urllib.parse import parse_qs, urlparse

_POLL_S = 0.002
_MAX_WAIT_S = 60.0  # then torch's own connect (and its timeout) takes over


def wait_for_listener(host: str, port: int, wait_s: float) -> bool:
    """True once host:port accepts a TCP connection, False after wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, left))):
                return True
        except OSError:
            if left <= 0:
                return False
            time.sleep(_POLL_S)


def _rank_of(url: str) -> int:
    query = parse_qs(urlparse(url).query)
    raw = query.get("rank", [os.environ.get("RANK", "0")])[0]
    try:
        return int(raw)
    except ValueError:
        return 0


def install() -> bool:
    """Wraps torch's env:// rendezvous handler (once); False when torch.distributed is not loaded."""
    module = sys.modules.get("torch.distributed.rendezvous")
    handlers = getattr(module, "_rendezvous_handlers", None)
    inner = handlers.get("env") if isinstance(handlers, dict) else None
    if inner is None:
        return False
    if getattr(inner, "_flashckpt_waits_for_master", False):
        return True

    def env_handler(url: str, *args, **kwargs):
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if addr and port.isdigit() and not agent_store and _rank_of(url) != 0:
            timeout = kwargs.get("timeout")
            limit = _MAX_WAIT_S if timeout is None else min(_MAX_WAIT_S, timeout.total_seconds())
            wait_for_listener(addr, int(port), limit)
        return inner(url, *args, **kwargs)

    env_handler._flashckpt_waits_for_master = True
    env_handler.__wrapped__ = inner
    handlers["env"] = env_handler
    return True

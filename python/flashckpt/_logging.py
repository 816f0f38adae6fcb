"""The core's log lines in Python's ``logging``, logger ``flashckpt``.

The compiled core queues its lines (from any thread, without the GIL); a
daemon thread here takes them and hands them to ``logging.getLogger("flashckpt")``
with their level, so handlers, formats and levels configured by the training
script apply. With no handler configured anywhere (a script that never calls
``logging.basicConfig``) the lines go to stderr in the core's own format at the
level of ``$FLASHCKPT_LOG`` (default info), as without Python.

The core's threshold follows ``$FLASHCKPT_LOG`` when set, else the logger's
effective level (re-read twice a second), so debug lines cost nothing unless
someone asked for them.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import List, Optional, Tuple

logger = logging.getLogger("flashckpt")

_PY_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
_LETTERS = "DIWE"
_NAMES = {"debug": 0, "info": 1, "warn": 2, "warning": 2, "error": 3}

_lock = threading.Lock()
_native = None
_thread: Optional[threading.Thread] = None
_stop = threading.Event()


def _env_level() -> Optional[int]:
    v = os.environ.get("FLASHCKPT_LOG")
    if v is None:
        return None
    return _NAMES.get(v.strip().lower(), 1)


def _core_level(py_level: int) -> int:
    if py_level <= logging.DEBUG:
        return 0
    if py_level <= logging.INFO:
        return 1
    if py_level <= logging.WARNING:
        return 2
    return 3


def threshold() -> int:
    """The core's threshold now: 0 debug ... 3 error."""
    env = _env_level()
    if env is not None:
        return env
    if logger.hasHandlers():
        return _core_level(logger.getEffectiveLevel())
    return 1


def _emit(lines: List[Tuple[int, str, str]], dropped: int) -> None:
    routed = logger.hasHandlers()
    floor = threshold()
    for level, prefix, message in lines:
        level = min(max(level, 0), 3)
        if routed:
            text = f"[{prefix}] {message}" if prefix else message
            logger.log(_PY_LEVELS[level], "%s", text)
        elif level >= floor:
            now = time.time()
            stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
            sys.stderr.write(f"[flashckpt {_LETTERS[level]} {stamp}{' ' + prefix if prefix else ''}] "
                             f"{message}\n")
    if dropped:
        logger.warning("%d log lines of the flashckpt core were dropped (the queue was full)", dropped)
    if not routed:
        sys.stderr.flush()


def _run(native) -> None:
    while not _stop.is_set():
        try:
            lines, dropped = native.take_log_lines(0.25)
            if lines or dropped:
                _emit(lines, dropped)
            native.set_log_level(threshold())
        except Exception:  # a handler that raises must not end the routing
            pass


def install(native) -> None:
    """Routes the core's lines through ``logging`` (idempotent)."""
    global _native, _thread
    with _lock:
        if _thread is not None:
            return
        _native = native
        native.set_log_level(threshold())
        native.route_log(True)
        _stop.clear()
        _thread = threading.Thread(target=_run, args=(native,), name="flashckpt-log", daemon=True)
        _thread.start()


def shutdown() -> None:
    """Delivers the queued lines and gives stderr back to the core (at exit)."""
    global _thread
    with _lock:
        if _thread is None:
            return
        _stop.set()
        _thread.join(timeout=2.0)
        _thread = None
        native = _native
        native.route_log(False)
        lines, dropped = native.take_log_lines(0.0)
        if lines or dropped:
            try:
                _emit(lines, dropped)
            except Exception:
                pass


def _after_fork_in_child() -> None:
    global _thread
    if _native is not None:
        _native.after_fork_in_child()
    _thread = None


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

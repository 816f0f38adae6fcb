"""flashckpt: checkpoints of PyTorch training state at memory-copy speed.

    import flashckpt
    with flashckpt.Checkpointer("/ckpt/run1", keep_last=3) as ckpt:
        h = ckpt.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})
        ...
        state = ckpt.load()                    # newest step every rank has

Importing this package is cheap: torch and the compiled extension load on
first use of ``Checkpointer`` (so ``python -m flashckpt.run`` works even where
the extension is not built).
"""

from __future__ import annotations

from ._heartbeat import heartbeat
from .errors import (CorruptionError, DeadlineExceededError, FailedPreconditionError,
                     FlashCkptError, InvalidArgumentError, NotFoundError,
                     PermissionDeniedError, ResourceExhaustedError, StateDictMismatchError,
                     UnavailableError)

__version__ = "0.1.0"

if __import__("os").environ.get("FLASHCKPT_AGENT_SOCKET"):
    # A worker of flashrun: ranks other than 0 wait for rank 0's store instead
    # of losing torch's fixed one-second connect retry (see _worker_rdzv).
    from . import _worker_rdzv

    _worker_rdzv.install()

_LAZY = {
    "Checkpointer": ("checkpointer", "Checkpointer"),
    "SaveHandle": ("checkpointer", "SaveHandle"),
    "LoadResult": ("checkpointer", "LoadResult"),
    "install_fence": ("checkpointer", "install_fence"),
    "rng_state": ("rng", "rng_state"),
    "set_rng_state": ("rng", "set_rng_state"),
    "load_device_plugin": ("devices", "load_device_plugin"),
    "device_types": ("devices", "device_types"),
    "zero_state_dict": ("resharding", "zero_state_dict"),
    "load_resharded": ("resharding", "load_resharded"),
    "Shard": ("_state", "Shard"),
}


def __getattr__(name):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'flashckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{target[0]}", __name__), target[1])
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "Checkpointer", "SaveHandle", "LoadResult", "install_fence", "rng_state", "set_rng_state",
    "load_device_plugin", "device_types", "zero_state_dict", "load_resharded",
    "Shard", "heartbeat", "FlashCkptError", "InvalidArgumentError", "NotFoundError", "CorruptionError",
    "ResourceExhaustedError", "PermissionDeniedError", "FailedPreconditionError",
    "DeadlineExceededError", "UnavailableError", "StateDictMismatchError",
]

"""Device backends: which tensor device types flashckpt can save, and loading more.

Tensors on the CPU are copied by the core itself; tensors on any other device type
are copied by that type's backend, a plugin implementing
``include/flashckpt/device_plugin.h`` (device-to-host into the pinned snapshot slot,
host-to-device back). CUDA's backend is built with flashckpt and loaded on the first
CUDA tensor; others are loaded by path::

    import flashckpt
    flashckpt.load_device_plugin("/opt/vendor/lib/libflashckpt_xpu.so")   # -> "xpu"
    flashckpt.device_types()                                             # ["xpu"]
"""

from __future__ import annotations

from typing import List

from . import _native


def load_device_plugin(path: str) -> str:
    """Loads the device backend plugin at ``path``; returns the device type it serves."""
    return _native.load().load_device_plugin(str(path))


def device_types() -> List[str]:
    """Device types with a loaded backend (CUDA appears once a CUDA tensor was saved)."""
    return list(_native.load().device_types())

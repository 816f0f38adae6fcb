"""Capture and restore the random number generators a training loop uses.

    state["rng"] = flashckpt.rng_state()        # before save()
    flashckpt.set_rng_state(loaded["rng"])      # after load()

Covers Python's ``random``, NumPy's global generator (when NumPy is
importable), the torch CPU generator and, when CUDA is initialized, every
CUDA device's generator.
"""

from __future__ import annotations

import random
from typing import Any, Dict


def rng_state() -> Dict[str, Any]:
    import torch

    state: Dict[str, Any] = {
        "random": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import torch

    if "random" in state:
        random.setstate(state["random"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu() if state["torch"].device.type != "cpu"
                            else state["torch"].clone())
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        n = torch.cuda.device_count()
        if len(cuda) > n:
            cuda = cuda[:n]
        torch.cuda.set_rng_state_all(cuda)

"""Device backends from Python: a device type with no backend is a clear error, and
plugins load by path (the test backend built with the C++ tests)."""

import glob
import os

import pytest
import torch

import flashckpt
from flashckpt import errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _test_plugin():
    build = os.environ.get("FLASHCKPT_BUILD_DIR", os.path.join(REPO, "build"))
    found = glob.glob(os.path.join(build, "lib", "libflashckpt_test_device.so"))
    if not found:
        pytest.skip(f"the test device plugin is not built in {build}/lib (C++ tests off?)")
    return found[0]


def test_a_device_type_with_no_backend_names_the_type_the_key_and_the_remedy(tmp_path):
    state = {"cpu": torch.arange(4.0), "w": torch.empty(8, 8, device="meta")}
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        with pytest.raises(errors.UnavailableError) as e:
            ckpt.save(1, state)
        msg = str(e.value)
        assert "no device backend for 'meta' tensors" in msg
        assert "'w'" in msg
        assert "load_device_plugin" in msg
        assert ckpt.steps() == []  # nothing half-saved
        ckpt.save(2, {"cpu": torch.arange(4.0)}).wait(timeout=60)  # the Checkpointer still works
        assert torch.equal(ckpt.load()["cpu"], torch.arange(4.0))


def test_plugins_load_by_path_and_a_bad_path_is_named():
    assert flashckpt.load_device_plugin(_test_plugin()) == "flashckpt_test"
    assert "flashckpt_test" in flashckpt.device_types()
    with pytest.raises(errors.FlashCkptError, match="/nonexistent/libxpu.so"):
        flashckpt.load_device_plugin("/nonexistent/libxpu.so")

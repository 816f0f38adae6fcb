"""The layer order of docs/ARCHITECTURE.md is enforced by scripts/check_layers.py."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "check_layers.py")


def run(root):
    return subprocess.run([sys.executable, SCRIPT, "--root", root], capture_output=True, text=True, timeout=60)


def write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_this_checkout_follows_the_layer_order():
    r = run(REPO)
    assert r.returncode == 0, r.stderr


def test_an_upward_include_fails_naming_file_line_and_layers(tmp_path):
    root = str(tmp_path)
    write(root, "include/flashckpt/types.h", "#pragma once\n")
    write(root, "include/flashckpt/checkpointer.h", '#include "flashckpt/types.h"\n')
    write(root, "csrc/common/log.h", '#include "flashckpt/types.h"\n#include "absl/status/status.h"\n')
    write(root, "csrc/storage/commit.h", '#include "common/log.h"\n\n#include "flashckpt/checkpointer.h"\n')
    r = run(root)
    assert r.returncode == 1
    assert 'csrc/storage/commit.h:3: layer "storage" includes "flashckpt/checkpointer.h" of layer "public-api"' \
        in r.stderr, r.stderr
    assert "1 upward include(s)" in r.stderr


def test_a_file_in_no_layer_fails(tmp_path):
    root = str(tmp_path)
    write(root, "csrc/misc/helpers.h", "#pragma once\n")
    r = run(root)
    assert r.returncode == 1
    assert "csrc/misc/helpers.h: in no layer" in r.stderr

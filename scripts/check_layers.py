#!/usr/bin/env python3
"""Fails on an #include that goes up the layer order (docs/ARCHITECTURE.md, "Layers").

    /usr/bin/python3 scripts/check_layers.py            # this checkout
    /usr/bin/python3 scripts/check_layers.py --root DIR # another tree of the same shape

Each source file under csrc/ and include/flashckpt/ belongs to a layer (by its
folder, or for public headers by its name). A file may include headers of its own
layer and of the layers listed for it below, nothing else of the project's own;
system and third-party headers (<...>, "absl/...", "google/...", ...) are not checked.
Generated Protobuf headers count as part of the layer that owns their schema.
Tests, benchmarks and examples may reach into any layer and are not checked.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

# layer -> the layers it may include (besides itself). Keep in step with the
# table in docs/ARCHITECTURE.md.
ALLOWED: dict[str, set[str]] = {
    "public-types": set(),                       # flashckpt/errors.h, types.h, config.h, log.h
    "common": {"public-types"},
    "shm": {"public-types", "common"},
    "proto": set(),                              # flashckpt.pb.h (manifest, records)
    "snapshot": {"public-types", "common", "shm", "proto"},
    "storage": {"public-types", "common", "shm", "proto", "snapshot"},
    "ipc": {"public-types", "common", "agent-proto"},
    "agent-proto": set(),                        # agent.pb.h (worker <-> agent)
    "public-api": {"public-types"},              # flashckpt/checkpointer.h
    "device-abi": set(),                         # flashckpt/device_plugin.h (C ABI of device backends)
    "api": {"public-types", "public-api", "common", "shm", "proto", "snapshot", "storage", "ipc", "agent-proto",
            "device-abi"},
    "rendezvous-proto": set(),
    "rendezvous": {"rendezvous-proto"},
    "agent": {"public-types", "common", "shm", "proto", "snapshot", "storage", "ipc", "agent-proto",
              "rendezvous", "rendezvous-proto"},
    "launcher": {"public-types", "common", "shm", "proto", "snapshot", "storage", "ipc", "agent-proto",
                 "rendezvous", "rendezvous-proto", "agent"},
    "public-torch": {"public-types", "public-api"},   # flashckpt/torch.h
    "torch": {"public-types", "public-api", "public-torch"},
    "python": {"public-types", "public-api"},
    "cuda": {"device-abi"},
}

PUBLIC = {"errors.h": "public-types", "types.h": "public-types", "log.h": "public-types", "config.h": "public-types",
          "config.h.in": "public-types", "checkpointer.h": "public-api", "torch.h": "public-torch",
          "device_plugin.h": "device-abi"}
GENERATED = {"flashckpt.pb.h": "proto", "agent.pb.h": "agent-proto", "rendezvous.pb.h": "rendezvous-proto"}
SOURCE_EXT = (".h", ".cc", ".cu", ".cuh", ".in")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def layer_of_file(rel: str) -> str | None:
    parts = rel.split("/")
    if parts[0] == "include" and len(parts) == 3 and parts[1] == "flashckpt":
        return PUBLIC.get(parts[2])
    if parts[0] == "csrc" and len(parts) >= 3:
        return parts[1] if parts[1] in ALLOWED else None
    return None


def layer_of_include(path: str) -> str | None:
    if path in GENERATED:
        return GENERATED[path]
    parts = path.split("/")
    if parts[0] == "flashckpt" and len(parts) == 2:
        return PUBLIC.get(parts[1])
    if len(parts) >= 2 and parts[0] in ALLOWED:
        return parts[0]
    return None  # not ours: absl/, google/, boost/, gtest/, torch/, pybind11/ ...


def check(root: str) -> tuple[list[str], list[str]]:
    violations, unknown = [], []
    for top in ("csrc", "include"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            for name in sorted(files):
                if not name.endswith(SOURCE_EXT):
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                layer = layer_of_file(rel)
                if layer is None:
                    unknown.append(rel)
                    continue
                with open(full, encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        m = INCLUDE.match(line)
                        if not m:
                            continue
                        target = layer_of_include(m.group(1))
                        if target is None or target == layer or target in ALLOWED[layer]:
                            continue
                        violations.append(f'{rel}:{lineno}: layer "{layer}" includes "{m.group(1)}" of layer '
                                          f'"{target}", which it may not (allowed: '
                                          f'{", ".join(sorted(ALLOWED[layer])) or "nothing else"})')
    return violations, unknown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="checkout to check (default: this one)")
    args = ap.parse_args()
    violations, unknown = check(args.root)
    for u in unknown:
        print(f"{u}: in no layer; add its folder to ALLOWED in scripts/check_layers.py and to "
              "docs/ARCHITECTURE.md", file=sys.stderr)
    for v in violations:
        print(v, file=sys.stderr)
    if violations or unknown:
        print(f"layer check: {len(violations)} upward include(s), {len(unknown)} file(s) in no layer "
              "(docs/ARCHITECTURE.md, Layers)", file=sys.stderr)
        return 1
    print("layer check: every include of csrc/ and include/flashckpt/ follows the layer order")
    return 0


if __name__ == "__main__":
    sys.exit(main())

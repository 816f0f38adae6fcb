"""``python -m flashckpt.run`` = the ``flashrun`` launcher (torchrun-compatible).

Execs the C++ binary, passing this interpreter to it (FLASHRUN_PYTHON_INTERPRETER)
so that workers run under the same Python. Importable on its own: it needs
nothing else from the package.
"""
import os
import shutil
import sys

__all__ = ["find_flashrun_binary", "main"]


def find_flashrun_binary():
    """The flashrun binary: next to the package, $FLASHRUN_BIN, on PATH, or the repo's build/."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "bin", "flashrun"), os.environ.get("FLASHRUN_BIN", "")]
    on_path = shutil.which("flashrun")
    if on_path:
        candidates.append(on_path)
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(here)), "build", "bin", "flashrun"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    binary = find_flashrun_binary()
    if binary is None:
        sys.stderr.write(
            "flashckpt.run: the flashrun binary was not found (looked in flashckpt/bin/, $FLASHRUN_BIN, "
            "PATH and build/bin/ of the source tree); build it with `make flashrun` or set FLASHRUN_BIN\n"
        )
        return 2
    env = dict(os.environ)
    env["FLASHRUN_PYTHON_INTERPRETER"] = sys.executable
    os.execve(binary, [binary] + args, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

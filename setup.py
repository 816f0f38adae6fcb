"""Builds flashckpt._C (and, when the target exists, the flashrun binary) with CMake.

Configured by environment variables:
  FLASHCKPT_CMAKE_BUILD_DIR  build folder (default: build-py in the source tree,
                             so that rebuilds are incremental)
  FLASHCKPT_CMAKE_ARGS       extra arguments for the configure step
  FLASHCKPT_BUILD_JOBS       parallel jobs (default 2)
  FLASHCKPT_SKIP_FLASHRUN=1  do not build or ship the flashrun binary
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _copy(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    shutil.copy2(src, dst)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = os.environ.get("FLASHCKPT_CMAKE_BUILD_DIR", os.path.join(ROOT, "build-py"))
        os.makedirs(build_dir, exist_ok=True)
        jobs = os.environ.get("FLASHCKPT_BUILD_JOBS", "2")
        cfg = [
            "cmake", "-S", ROOT, "-B", build_dir,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DFLASHCKPT_WITH_PYTHON=ON",
            "-DFLASHCKPT_WITH_TESTS=OFF",
            "-DFLASHCKPT_WITH_BENCHMARKS=OFF",
            "-DFLASHCKPT_WITH_TORCH=OFF",
        ]
        cfg += shlex.split(os.environ.get("FLASHCKPT_CMAKE_ARGS", ""))
        self._run(cfg)
        self._run(["cmake", "--build", build_dir, "--target", "flashckpt_python", "-j", jobs])

        built = os.path.join(build_dir, "python", "flashckpt",
                             "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
        if not os.path.exists(built):
            raise RuntimeError(f"CMake did not produce {built}: is pybind11-dev installed "
                               "(see the CMake output above)?")
        dest = self.get_ext_fullpath(ext.name)
        _copy(built, dest)
        # The CUDA copy engine, loaded by the core at run time from the module's folder.
        for lib in glob.glob(os.path.join(build_dir, "python", "flashckpt", "lib*.so")):
            _copy(lib, os.path.join(os.path.dirname(dest), os.path.basename(lib)))
            self._editable_extras.append(os.path.basename(lib))

        # flashrun is optional: ship it when this tree has the target.
        if os.environ.get("FLASHCKPT_SKIP_FLASHRUN") == "1" or not self._has_target(build_dir, "flashrun"):
            print("flashckpt: no flashrun target, not shipping bin/flashrun", file=sys.stderr)
            return
        self._run(["cmake", "--build", build_dir, "--target", "flashrun", "-j", jobs])
        binary = os.path.join(build_dir, "bin", "flashrun")
        _copy(binary, os.path.join(os.path.dirname(dest), "bin", "flashrun"))
        self._editable_extras.append(os.path.join("bin", "flashrun"))

    def run(self):
        self._editable_extras = []
        super().run()

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        # Editable installs copy only the module back; bring flashrun and the CUDA engine.
        built_pkg = os.path.dirname(self.get_ext_fullpath("flashckpt._C"))
        for rel in getattr(self, "_editable_extras", []):
            src = os.path.join(built_pkg, rel)
            if os.path.exists(src):
                _copy(src, os.path.join(ROOT, "python", "flashckpt", rel))

    @staticmethod
    def _has_target(build_dir, target):
        out = subprocess.run(["cmake", "--build", build_dir, "--target", "help"],
                             capture_output=True, text=True)
        return out.returncode == 0 and any(
            line.split(":")[0].strip(". ") == target or line.strip() == f"... {target}"
            for line in out.stdout.splitlines())

    @staticmethod
    def _run(cmd):
        print("flashckpt:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)


setup(ext_modules=[CMakeExtension("flashckpt._C")], cmdclass={"build_ext": CMakeBuild})

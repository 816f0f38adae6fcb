"""Which compiled extension the package picks from a source tree's build folders."""
import importlib.machinery
import os

from flashckpt import _native

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _fake_build(root, name, mtime):
    d = root / name / "python" / "flashckpt"
    d.mkdir(parents=True)
    path = d / ("_C" + SUFFIX)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return str(path)


def test_newest_in_tree_build_comes_first(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHCKPT_BUILD_DIR", raising=False)
    old_py = _fake_build(tmp_path, "build-py", 1_000_000)
    new_cmake = _fake_build(tmp_path, "build", 2_000_000)
    assert list(_native._candidates(str(tmp_path))) == [new_cmake, old_py]
    os.utime(old_py, (3_000_000, 3_000_000))  # build-py rebuilt since
    assert list(_native._candidates(str(tmp_path))) == [old_py, new_cmake]


def test_build_dir_from_the_environment_comes_before_the_tree(tmp_path, monkeypatch):
    chosen = _fake_build(tmp_path / "elsewhere", "b", 1)
    in_tree = _fake_build(tmp_path, "build", 2_000_000)
    monkeypatch.setenv("FLASHCKPT_BUILD_DIR", str(tmp_path / "elsewhere" / "b"))
    assert list(_native._candidates(str(tmp_path))) == [chosen, in_tree]


def test_no_build_gives_no_candidates(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHCKPT_BUILD_DIR", raising=False)
    assert list(_native._candidates(str(tmp_path))) == []

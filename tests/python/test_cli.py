"""The flashckpt command: ls, verify, export, --help."""

import subprocess

import pytest
import torch

import flashckpt
from flashckpt_testutil import PYTHON, child_env
from flashckpt import cli


@pytest.fixture
def ckpt_dir(tmp_path):
    d = tmp_path / "ckpt"
    with flashckpt.Checkpointer(d, keep_last=0) as ckpt:
        for step in (5, 10):
            ckpt.save(step, {"model": {"w": torch.full((256, 256), float(step))},
                             "extra": {"step": step, "name": "run"}}).wait(timeout=60)
    (d / "step-15").mkdir()  # an incomplete step: a crashed save
    (d / "step-15" / "rank-0.data").write_bytes(b"\0" * 4096)
    return d


def test_ls(ckpt_dir, capsys):
    assert cli.main(["ls", str(ckpt_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["STEP", "SIZE", "RANKS", "STATE"]
    rows = {int(l.split()[0]): l for l in out[1:]}
    assert "committed" in rows[5] and "latest" not in rows[5]
    assert "committed" in rows[10] and "<- latest" in rows[10]
    assert "incomplete" in rows[15]
    assert "KiB" in rows[10] and rows[10].split()[3] == "0"


def test_verify_ok_and_corrupt(ckpt_dir, capsys):
    assert cli.main(["verify", str(ckpt_dir)]) == 0
    captured = capsys.readouterr()
    assert "OK: 2 step(s)" in captured.out
    assert "100.0%" in captured.err  # the progress bar reached the end
    assert cli.main(["verify", str(ckpt_dir), "10"]) == 0
    data = ckpt_dir / "step-10" / "rank-0.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0x01
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    assert cli.main(["verify", str(ckpt_dir), "10"]) == 1
    err = capsys.readouterr().err
    assert "FAILED step 10 rank 0: CorruptionError" in err
    assert cli.main(["verify", str(ckpt_dir), "99"]) == 1


def test_export_is_torch_loadable(ckpt_dir, tmp_path):
    out = tmp_path / "step10.pt"
    assert cli.main(["export", str(ckpt_dir), "10", str(out)]) == 0
    # A plain torch.load in a process that never imports flashckpt.
    code = ("import torch,sys; s=torch.load(sys.argv[1]); "
            "assert s['extra']=={'step':10,'name':'run'}; "
            "assert torch.equal(s['model']['w'], torch.full((256,256),10.)); print('ok')")
    r = subprocess.run([PYTHON, "-c", code, str(out)], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert cli.main(["export", str(ckpt_dir), "99", str(tmp_path / "x.pt")]) == 1


@pytest.mark.parametrize("sub", [[], ["ls"], ["verify"], ["export"]])
def test_help(sub):
    r = subprocess.run([PYTHON, "-m", "flashckpt"] + sub + ["--help"], capture_output=True,
                       text=True, timeout=60, env=child_env())
    assert r.returncode == 0, r.stderr
    assert "usage: flashckpt" in r.stdout


def test_not_a_directory(tmp_path, capsys):
    assert cli.main(["ls", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err

"""The CUDA path (skipped without a GPU): blocking and non-blocking saves, fences."""

import pytest
import torch

import flashckpt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_roundtrip_blocking(tmp_path):
    dev = torch.device("cuda:0")
    state = {"w": torch.randn(256, 256, device=dev), "b": torch.randn(256, device=dev).bfloat16(),
             "t": torch.randn(64, 32, device=dev).t(), "cpu": torch.arange(5)}
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(1, state).wait(timeout=60)
        out = ckpt.load()
        assert out["w"].device == dev and torch.equal(out["w"], state["w"])
        assert torch.equal(out["t"], state["t"])
        cpu = ckpt.load(map_location="cpu")
        assert cpu["b"].device.type == "cpu" and torch.equal(cpu["b"], state["b"].cpu())
        disk = ckpt.load(prefer_memory=False)
        assert torch.equal(disk["w"], state["w"])


def test_cuda_non_blocking_with_fence_hook(tmp_path):
    model = torch.nn.Linear(512, 512).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with flashckpt.Checkpointer(tmp_path / "c") as ckpt:
        flashckpt.install_fence(opt, ckpt, model=model)
        x = torch.randn(64, 512, device="cuda")
        model(x).sum().backward()
        opt.step()
        expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
        h = ckpt.save(1, {"model": model.state_dict(), "optim": opt.state_dict()}, blocking=False)
        # The hooks fence before parameters change.
        model(x).sum().backward()
        opt.step()
        h.wait(timeout=60)
        out = ckpt.load(map_location="cpu")
        for k, v in expected.items():
            assert torch.equal(out["model"][k], v.cpu()), k

"""The fused optimizers every training loop builds give torch's default optimizers' numbers."""
import copy

import pytest
import torch

from tokenseg.core import optim
from tokenseg.config import load_config
from tokenseg.engine import build_optimizer
from tokenseg.methods import get_method


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _groups(net):  # decayed weights and undecayed biases, with their own lr, as the engine's groups
    return [{"params": [net[0].weight, net[2].weight], "weight_decay": 0.05},
            {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0, "lr": 3e-3}]


@pytest.mark.parametrize("make,kwargs,tol", [(optim.adamw, {"lr": 1e-2, "eps": 1e-8}, 1e-6),
                                             (optim.sgd, {"lr": 1e-2, "momentum": 0.9}, 0.0)])
def test_fused_steps_equal_the_default_optimizer(make, kwargs, tol):
    a, b = _net(), _net()
    fused, default = make(_groups(a), **kwargs), make(_groups(b), fused=False, **kwargs)
    assert optim.is_fused(fused) and not optim.is_fused(default)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(5, 6, generator=g)
        for net, opt in ((a, fused), (b, default)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa - pb).abs().max() <= tol
    assert any((pa - pc).abs().max() > 1e-3 for pa, pc in zip(a.parameters(), _net().parameters()))  # it moved
    # the fused state loads into the default one (a checkpoint resumes either way)
    default.load_state_dict(copy.deepcopy(fused.state_dict()))


def test_an_optimizer_without_a_fused_kernel_falls_back():
    class NoFused(torch.optim.SGD):
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be on a supported device")
            super().__init__(params, **kw)

    opt = optim._build(NoFused, _net().parameters(), True, lr=0.1)
    assert isinstance(opt, NoFused) and not optim.is_fused(opt)


@pytest.mark.parametrize("fused", [True, False])
def test_the_engine_builds_the_fused_optimizer_unless_told_not_to(fused):
    cfg = load_config("demo", [f"train.fused_optimizer={str(fused).lower()}", "model.img_size=32",
                               "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, img_size: 32}"])
    method = get_method(cfg.model.method)
    model = method.build(cfg, 3)
    opt, _ = build_optimizer(method, model, cfg, steps_per_epoch=2, total_steps=4)
    assert optim.is_fused(opt) is fused

"""max_norm_param_groups and the per-unit convention of each layer (issue 2, point 6)."""

from __future__ import annotations

import torch
from torch import nn

from maxnorm_optim import MaxNormWrapper, max_norm_param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(3, 5, 3)
        self.deconv = nn.ConvTranspose2d(5, 4, 3)
        self.deconv1d = nn.ConvTranspose1d(4, 2, 2)
        self.bn = nn.BatchNorm2d(5)
        self.ln = nn.LayerNorm(6)
        self.bil = nn.Bilinear(6, 6, 3)
        self.lin = nn.Linear(6, 7)
        self.rnn = nn.GRU(6, 4)
        self.lin_tied = self.lin  # shared module: its parameters appear once


def test_groups_split_weights_from_everything_else():
    net = Net()
    groups = max_norm_param_groups(net, 2.0)
    by_dim = {str(g["norm_dim"]): g for g in groups if g["max_norm"] is not None}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(by_dim["per_unit"]["params"]) == ids(
        [net.emb.weight, net.conv.weight, net.bil.weight, net.lin.weight]
    )
    assert ids(by_dim["(0, 2, 3)"]["params"]) == {id(net.deconv.weight)}
    assert ids(by_dim["(0, 2)"]["params"]) == {id(net.deconv1d.weight)}
    (rest,) = [g for g in groups if g["max_norm"] is None]
    expected_rest = {id(p) for p in net.parameters()} - {
        id(p) for g in groups if g["max_norm"] is not None for p in g["params"]
    }
    assert ids(rest["params"]) == expected_rest
    assert id(net.bn.weight) in ids(rest["params"]) and id(net.conv.bias) in ids(rest["params"])
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(net.parameters()))


def test_transposed_conv_constrains_each_output_channel():
    net = Net()
    opt = MaxNormWrapper(torch.optim.SGD(max_norm_param_groups(net, 0.5), lr=0.0))
    with torch.no_grad():
        net.deconv.weight.mul_(50)
    opt.project()
    # ConvTranspose2d weight is (in, out, kh, kw): one norm per output channel (dim 1).
    per_out = net.deconv.weight.transpose(0, 1).flatten(1).norm(dim=1)
    assert bool((per_out <= 0.5).all()) and bool((per_out >= 0.5 * (1 - 1e-5)).all())
    per_row = net.lin.weight.norm(dim=1)
    assert bool((per_row <= 0.5).all())


def test_groups_carry_options_and_work_with_any_optimizer():
    net = Net()
    groups = max_norm_param_groups(net, 3.0, norm_type=1.0)
    opt = MaxNormWrapper(torch.optim.Adam(groups, lr=1e-3))
    assert opt.param_groups[0]["norm_type"] == 1.0
    assert opt.param_groups[-1]["max_norm"] is None

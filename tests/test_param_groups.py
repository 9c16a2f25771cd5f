"""max_norm_param_groups: which weights get one norm per unit, overrides, and the edge cases
(weight norm, other parametrizations, sparse embeddings, lazy modules, tied weights)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

from maxnorm_optim import MaxNormWrapper, max_norm_param_groups

OPTIONS = ("max_norm", "min_norm", "rate", "norm_type", "norm_dim", "error_if_nonfinite")


def ids(params):
    return [id(p) for p in params]


def layout(groups):
    """Each group as (its options without params, the ids of its params)."""
    return [({k: v for k, v in g.items() if k != "params"}, ids(g["params"])) for g in groups]


def constrained(max_norm, norm_dim="per_unit", **extra):
    options = {
        "max_norm": max_norm,
        "min_norm": 0.0,
        "rate": 1.0,
        "norm_type": 2.0,
        "norm_dim": norm_dim,
        "error_if_nonfinite": False,
    }
    return {**options, **extra}


UNCONSTRAINED = {"max_norm": None}


def slice_norms(t, norm_dim):
    """Per-unit norms of ``t`` under a group's norm_dim (``"per_unit"``: over dims 1..)."""
    dims = tuple(range(1, t.dim())) if norm_dim == "per_unit" else norm_dim
    return torch.linalg.vector_norm(t.detach(), dim=dims)


def assert_partition(model, groups):
    """Every parameter of the model is in exactly one group."""
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in model.parameters()}
    assert all(g["params"] for g in groups)


def inflate(model, factor=50.0):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)


# -- the default split ---------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.bag = nn.EmbeddingBag(10, 6)
        self.conv = nn.Conv2d(3, 5, 3)
        self.deconv = nn.ConvTranspose2d(5, 4, 3)
        self.deconv1d = nn.ConvTranspose1d(4, 2, 2)
        self.bn = nn.BatchNorm2d(5)
        self.ln = nn.LayerNorm(6)
        self.bil = nn.Bilinear(6, 6, 3)
        self.lin = nn.Linear(6, 7)
        self.cell = nn.LSTMCell(6, 4)
        self.prelu = nn.PReLU(3)
        self.lin_tied = self.lin  # shared module: its parameters appear once


def test_default_groups_split_unit_weights_from_everything_else():
    net = Net()
    groups = max_norm_param_groups(net, 2.0)
    assert layout(groups) == [
        (
            constrained(2.0),
            ids(
                [
                    net.emb.weight,
                    net.bag.weight,
                    net.conv.weight,
                    net.bil.weight,
                    net.lin.weight,
                    net.cell.weight_ih,
                    net.cell.weight_hh,
                ]
            ),
        ),
        (constrained(2.0, (0, 2, 3)), ids([net.deconv.weight])),
        (constrained(2.0, (0, 2)), ids([net.deconv1d.weight])),
        (
            UNCONSTRAINED,
            ids(
                [
                    net.conv.bias,
                    net.deconv.bias,
                    net.deconv1d.bias,
                    net.bn.weight,
                    net.bn.bias,
                    net.ln.weight,
                    net.ln.bias,
                    net.bil.bias,
                    net.lin.bias,
                    net.cell.bias_ih,
                    net.cell.bias_hh,
                    net.prelu.weight,
                ]
            ),
        ),
    ]
    assert_partition(net, groups)


def test_biases_and_gains_are_in_the_unconstrained_group():
    """Every 0-d / 1-d parameter (biases, norm gains, PReLU slopes) is left unconstrained,
    whatever "per_unit" does with vectors."""
    net = Net()
    groups = max_norm_param_groups(net, 2.0)
    (rest,) = [g for g in groups if g["max_norm"] is None]
    vectors = {id(p) for p in net.parameters() if p.dim() <= 1}
    assert vectors == set(ids(rest["params"]))


def test_options_are_written_into_every_constrained_group():
    net = Net()
    groups = max_norm_param_groups(
        net, 3.0, norm_type=math.inf, min_norm=0.5, rate=0.5, error_if_nonfinite=True
    )
    for g in groups[:-1]:
        assert {k: g[k] for k in OPTIONS if k != "norm_dim"} == {
            "max_norm": 3.0,
            "min_norm": 0.5,
            "rate": 0.5,
            "norm_type": math.inf,
            "error_if_nonfinite": True,
        }
    assert set(groups[-1]) == {"params", "max_norm"}


def test_transposed_conv_constrains_each_output_channel():
    net = Net()
    opt = MaxNormWrapper(torch.optim.SGD(max_norm_param_groups(net, 0.5), lr=0.0))
    inflate(net)
    bias = net.deconv.bias.detach().clone()
    opt.project()
    # ConvTranspose2d weight is (in, out, kh, kw): one norm per output channel (dim 1).
    per_out = net.deconv.weight.transpose(0, 1).flatten(1).norm(dim=1)
    assert bool((per_out <= 0.5).all()) and bool((per_out >= 0.5 * (1 - 1e-5)).all())
    assert bool((net.lin.weight.norm(dim=1) <= 0.5).all())
    assert torch.equal(net.deconv.bias, bias)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
        lambda ps: torch.optim.NAdam(ps, lr=1e-2),
        lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    ],
    ids=["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "NAdam", "Adamax"],
)
def test_groups_work_with_any_optimizer(make):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 8, 3),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.ConvTranspose1d(8, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 10, 3),
    )
    opt = MaxNormWrapper(make(max_norm_param_groups(model, 0.3)))
    assert [g["max_norm"] for g in opt.param_groups] == [0.3, 0.3, None]
    x = torch.randn(16, 2, 10)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for g in opt.param_groups[:2]:
        for p in g["params"]:
            assert slice_norms(p, g["norm_dim"]).max() <= 0.3


def test_max_norm_none_and_no_overrides_leaves_everything_unconstrained():
    net = Net()
    groups = max_norm_param_groups(net, None)
    assert layout(groups) == [(UNCONSTRAINED, ids(net.parameters()))]


# -- EEGNet: several bounds in one call -----------------------------------------------------
class EEGNet(nn.Module):
    """EEGNet-4,2 (Lawhern et al. 2018) as in arl-eegmodels / braindecode: max-norm 1 on the
    depthwise spatial conv, 0.25 on the classifier, nothing on the other convs."""

    def __init__(self, n_chans=8, n_times=64, n_classes=4, f1=8, d=2, f2=16) -> None:
        super().__init__()
        self.conv_temporal = nn.Conv2d(1, f1, (1, 33), padding=(0, 16), bias=False)
        self.bnorm_temporal = nn.BatchNorm2d(f1)
        self.depthwise = nn.Conv2d(f1, f1 * d, (n_chans, 1), groups=f1, bias=False)
        self.bnorm_1 = nn.BatchNorm2d(f1 * d)
        self.elu = nn.ELU()
        self.pool_1 = nn.AvgPool2d((1, 4))
        self.drop = nn.Dropout(0.25)
        self.separable = nn.Sequential()
        self.separable.add_module(
            "depth", nn.Conv2d(f1 * d, f1 * d, (1, 17), padding=(0, 8), groups=f1 * d, bias=False)
        )
        self.separable.add_module("point", nn.Conv2d(f1 * d, f2, 1, bias=False))
        self.bnorm_2 = nn.BatchNorm2d(f2)
        self.pool_2 = nn.AvgPool2d((1, 8))
        self.classifier = nn.Linear(f2 * (n_times // 32), n_classes)

    def forward(self, x):
        x = self.bnorm_temporal(self.conv_temporal(x))
        x = self.drop(self.pool_1(self.elu(self.bnorm_1(self.depthwise(x)))))
        x = self.drop(self.pool_2(self.elu(self.bnorm_2(self.separable(x)))))
        return self.classifier(x.flatten(1))


def test_eegnet_in_one_call():
    torch.manual_seed(0)
    model = EEGNet()
    groups = max_norm_param_groups(
        model, None, overrides={"depthwise": {"max_norm": 1.0}, "classifier": {"max_norm": 0.25}}
    )
    assert layout(groups) == [
        (constrained(1.0), ids([model.depthwise.weight])),
        (constrained(0.25), ids([model.classifier.weight])),
        (
            UNCONSTRAINED,
            ids(
                [
                    model.conv_temporal.weight,
                    model.bnorm_temporal.weight,
                    model.bnorm_temporal.bias,
                    model.bnorm_1.weight,
                    model.bnorm_1.bias,
                    model.separable.depth.weight,
                    model.separable.point.weight,
                    model.bnorm_2.weight,
                    model.bnorm_2.bias,
                    model.classifier.bias,
                ]
            ),
        ),
    ]
    opt = MaxNormWrapper(torch.optim.AdamW(groups, lr=1e-2))
    inflate(model, 20.0)
    temporal = model.conv_temporal.weight.detach().clone()
    opt.project()
    assert slice_norms(model.depthwise.weight, "per_unit").max() <= 1.0
    assert slice_norms(model.classifier.weight, "per_unit").max() <= 0.25
    assert torch.equal(model.conv_temporal.weight, temporal)  # not constrained
    x, y = torch.randn(32, 1, 8, 64), torch.randint(0, 4, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert slice_norms(model.depthwise.weight, "per_unit").max() <= 1.0
    assert slice_norms(model.classifier.weight, "per_unit").max() <= 0.25


# -- overrides: which one wins ---------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.mlp = nn.Linear(4, 4)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 4, 1)
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.head = nn.Linear(4, 3)


def bounds(model, groups):
    """Qualified weight name -> max_norm of its group (None: unconstrained)."""
    where = {id(p): g["max_norm"] for g in groups for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters() if p.dim() >= 2}


def test_a_name_pattern_covers_the_layers_inside_the_module():
    model = Model()
    got = bounds(model, max_norm_param_groups(model, 3.0, overrides={"blocks": {"max_norm": None}}))
    assert got["stem.weight"] == got["head.weight"] == 3.0
    assert all(v is None for k, v in got.items() if k.startswith("blocks."))


def test_more_literal_characters_win_and_exact_beats_glob():
    model = Model()
    overrides = {
        "*": {"max_norm": 0.1},  # 0 literal characters
        "blocks.*": {"max_norm": 0.2},  # 7
        "blocks.*.attn": {"max_norm": 0.3},  # 12
        "blocks.1": {"max_norm": 0.4},  # 8, exact
        "blocks.[12].mlp": {"max_norm": 0.5},  # 11: a character class is a wildcard
        "blocks.2.mlp": {"max_norm": 0.6},  # 12, exact
        "blocks.2.mlp*": {"max_norm": 0.7},  # 12, glob
    }
    got = bounds(model, max_norm_param_groups(model, 3.0, overrides=overrides))
    assert got == {
        "stem.weight": 0.1,
        "blocks.0.attn.0.weight": 0.3,
        "blocks.0.attn.1.weight": 0.3,
        "blocks.0.mlp.weight": 0.2,
        "blocks.1.attn.0.weight": 0.3,  # "blocks.*.attn" (12) beats "blocks.1" (8)
        "blocks.1.attn.1.weight": 0.3,
        "blocks.1.mlp.weight": 0.5,  # "blocks.[12].mlp" (11) beats "blocks.1" (8)
        "blocks.2.attn.0.weight": 0.3,
        "blocks.2.attn.1.weight": 0.3,
        "blocks.2.mlp.weight": 0.6,  # exact beats a glob with as many literal characters
        "head.weight": 0.1,
    }


def test_at_equal_specificity_the_nearer_module_wins():
    model = Model()
    # Both globs with 4 literal characters: "b*s.0" matches the block "blocks.0",
    # "b*.0.*" the layers inside it ("blocks.0.mlp", "blocks.0.attn.0", ...).
    overrides = {"b*s.0": {"max_norm": 0.2}, "b*.0.*": {"max_norm": 0.7}}
    got = bounds(model, max_norm_param_groups(model, 3.0, overrides=overrides))
    assert got["blocks.0.mlp.weight"] == got["blocks.0.attn.1.weight"] == 0.7
    assert got["blocks.1.mlp.weight"] == 3.0


def test_a_name_beats_a_type_and_types_apply_to_what_is_inside():
    model = Model()
    overrides = {nn.Linear: {"max_norm": 0.5}, "head": {"max_norm": 2.0}, Block: {"rate": 0.5}}
    groups = max_norm_param_groups(model, 3.0, overrides=overrides)
    got = bounds(model, groups)
    assert got["head.weight"] == 2.0  # the name beats the type nn.Linear
    assert got["blocks.0.mlp.weight"] == 0.5  # nn.Linear (the layer) beats Block (around it)
    assert got["stem.weight"] == 3.0
    rates = {id(p): g.get("rate") for g in groups for p in g["params"]}
    assert rates[id(model.blocks[0].mlp.weight)] == 1.0  # options do not cascade
    model = Model()
    got = bounds(model, max_norm_param_groups(model, 3.0, overrides={Block: {"max_norm": 0.5}}))
    assert got["blocks.2.attn.1.weight"] == 0.5 and got["head.weight"] == 3.0


class MyLinear(nn.Linear):
    pass


class Tagged(nn.Module):
    pass


class TaggedLinear(nn.Linear, Tagged):
    pass


def test_a_subclass_beats_its_base_and_unrelated_types_tie():
    model = nn.Sequential(nn.Linear(3, 3), MyLinear(3, 3), nn.Conv1d(3, 3, 1))
    overrides = {
        nn.Linear: {"max_norm": 1.0},
        MyLinear: {"max_norm": 2.0},
        nn.modules.conv._ConvNd: {"max_norm": 4.0},
        nn.Conv1d: {"max_norm": 5.0},
    }
    got = bounds(model, max_norm_param_groups(model, 3.0, overrides=overrides))
    assert got == {"0.weight": 1.0, "1.weight": 2.0, "2.weight": 5.0}
    model = nn.Sequential(TaggedLinear(3, 3))
    overrides = {nn.Linear: {"max_norm": 1.0}, Tagged: {"max_norm": 2.0}}
    with pytest.raises(ValueError, match=r"overrides Linear and Tagged both match '0'"):
        max_norm_param_groups(model, 3.0, overrides=overrides)
    overrides = {nn.Linear: {"max_norm": 1.0}, Tagged: {"max_norm": 1.0}}  # no conflict
    assert bounds(model, max_norm_param_groups(model, 3.0, overrides=overrides)) == {
        "0.weight": 1.0
    }


def test_tied_name_patterns_with_different_options_raise():
    model = Model()
    overrides = {"blocks.0.*": {"max_norm": 1.0}, "*.0.mlp": {"max_norm": 2.0}}  # 9 and 6
    assert (
        bounds(model, max_norm_param_groups(model, 3.0, overrides=overrides))["blocks.0.mlp.weight"]
        == 1.0
    )
    overrides = {"blocks.0.m*": {"max_norm": 1.0}, "*blocks.0.mlp": {"max_norm": 2.0}}
    got = bounds(model, max_norm_param_groups(model, 3.0, overrides=overrides))
    assert got["blocks.0.mlp.weight"] == 2.0  # 12 literal characters beat 10
    overrides = {"blocks.0.ml?": {"max_norm": 1.0}, "?locks.0.mlp": {"max_norm": 2.0}}
    with pytest.raises(
        ValueError,
        match=r"overrides 'blocks.0.ml\?' and '\?locks.0.mlp' both match 'blocks.0.mlp'",
    ):
        max_norm_param_groups(model, 3.0, overrides=overrides)


def test_an_empty_override_re_includes_a_layer_and_exclusions_ignore_min_norm():
    model = Model()
    overrides = {"blocks": {"max_norm": None}, "blocks.1.mlp": {}}
    got = bounds(model, max_norm_param_groups(model, 3.0, min_norm=1.0, overrides=overrides))
    assert got["blocks.1.mlp.weight"] == 3.0 and got["blocks.0.mlp.weight"] is None
    with pytest.raises(ValueError, match=r"overrides\['blocks'\]: min_norm=0.5 needs a max_norm"):
        max_norm_param_groups(model, 3.0, overrides={"blocks": {"max_norm": None, "min_norm": 0.5}})


def test_override_options_are_combined_with_the_keyword_arguments():
    model = Model()
    groups = max_norm_param_groups(
        model,
        3.0,
        norm_type=1.0,
        overrides={"head": {"max_norm": 0.5, "rate": 0.25}, "stem": {"norm_type": math.inf}},
    )
    stem = constrained(3.0, norm_type=math.inf)
    assert layout(groups)[0] == (stem, ids([model.stem.weight]))
    head = next(g for g in groups if id(model.head.weight) in ids(g["params"]))
    assert {k: head[k] for k in OPTIONS} == constrained(0.5, rate=0.25, norm_type=1.0)


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,error,message",
    [
        ({"head": {"lr": 0.1}}, ValueError, r"overrides\['head'\]: 'lr' is not a max-norm option"),
        ({"head": {"norm_dim": 0}}, ValueError, r"overrides\['head'\]: 'norm_dim' cannot be"),
        (
            {"head": {"max_norm": -1.0}},
            ValueError,
            r"overrides\['head'\]: max_norm must be positive.*got -1.0",
        ),
        ({"head": {"rate": 2}}, ValueError, r"overrides\['head'\]: rate must satisfy"),
        (
            {nn.Linear: {"norm_type": "2"}},
            TypeError,
            r"overrides\[Linear\]: norm_type must be a real",
        ),
        ({"head": 0.5}, TypeError, r"overrides\['head'\]: the value must be a dict"),
        ({3: {}}, TypeError, r"override keys must be module-name patterns"),
        ({"haed": {}}, ValueError, r"override 'haed' matches no module of the model"),
        (
            {"head.weight": {}},
            ValueError,
            r"'head.weight' matches no module .*not parameter names",
        ),
        ({nn.LSTM: {}}, ValueError, r"override LSTM: the model has no LSTM"),
        (
            {"blocks.0.attn.*": {}, nn.ReLU: {}},
            ValueError,
            r"override ReLU: the model has no ReLU",
        ),
    ],
)
def test_bad_overrides_raise_early(overrides, error, message):
    with pytest.raises(error, match=message):
        max_norm_param_groups(Model(), 3.0, overrides=overrides)


def test_an_override_that_constrains_nothing_raises():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.ReLU())
    with pytest.raises(ValueError, match=r"override '1' matches only modules without a weight"):
        max_norm_param_groups(model, 1.0, overrides={"1": {"max_norm": 0.5}})
    with pytest.raises(ValueError, match=r"override ReLU matches only modules without"):
        max_norm_param_groups(model, 1.0, overrides={nn.ReLU: {"max_norm": None}})


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match=r"module must be an nn\.Module"):
        max_norm_param_groups([nn.Parameter(torch.ones(2, 2))], 1.0)
    with pytest.raises(ValueError, match=r"max_norm_param_groups: max_norm must be positive"):
        max_norm_param_groups(nn.Linear(2, 2), 0.0)
    with pytest.raises(ValueError, match=r"min_norm=0\.5 needs a max_norm"):
        max_norm_param_groups(nn.Linear(2, 2), None, min_norm=0.5)
    with pytest.raises(TypeError, match="overrides must be a mapping"):
        max_norm_param_groups(nn.Linear(2, 2), 1.0, overrides=[("", {})])


# -- attention and recurrent layers ----------------------------------------------------------
@pytest.mark.parametrize("kdim", [None, 5])
def test_multihead_attention_input_projections_get_one_norm_per_row(kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, add_bias_kv=True)
    groups = max_norm_param_groups(nn.Sequential(mha), 0.5)
    if kdim is None:
        weights = [mha.in_proj_weight]
    else:
        weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    assert layout(groups) == [
        (constrained(0.5), ids([*weights, mha.out_proj.weight])),
        (UNCONSTRAINED, ids([mha.in_proj_bias, mha.bias_k, mha.bias_v, mha.out_proj.bias])),
    ]
    opt = MaxNormWrapper(torch.optim.SGD(groups, lr=0.1))
    inflate(mha)
    opt.project()
    for w in [*weights, mha.out_proj.weight]:
        norms = w.norm(dim=1)
        assert bool((norms <= 0.5).all()) and bool((norms > 0.5 * (1 - 1e-5)).all())


@pytest.mark.parametrize(
    "rnn",
    [
        lambda: nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2),
        lambda: nn.GRU(3, 5, num_layers=2, bidirectional=True),
        lambda: nn.RNN(3, 4),
    ],
    ids=["LSTM-bidirectional-proj", "GRU-bidirectional", "RNN"],
)
def test_recurrent_weights_get_one_norm_per_row(rnn):
    torch.manual_seed(0)
    layer = rnn()
    groups = max_norm_param_groups(layer, 0.5)
    params = dict(layer.named_parameters())
    weights = [n for n in params if re.fullmatch(r"weight_(ih|hh|hr)_l\d(_reverse)?", n)]
    assert len(weights) == len([n for n in params if n.startswith("weight")])
    assert layout(groups) == [
        (constrained(0.5), ids(params[n] for n in weights)),
        (UNCONSTRAINED, ids(p for n, p in params.items() if n.startswith("bias"))),
    ]
    if isinstance(layer, nn.LSTM):
        assert "weight_hr_l1_reverse" in weights
    opt = MaxNormWrapper(torch.optim.Adam(groups, lr=1e-2))
    inflate(layer)
    opt.project()
    for name in weights:
        assert params[name].norm(dim=1).max() <= 0.5
    out, _ = layer(torch.randn(4, 2, 3))
    out.sum().backward()
    opt.step()
    for name in weights:
        assert params[name].norm(dim=1).max() <= 0.5


def test_transformer_layers_are_covered():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    groups = max_norm_param_groups(layer, 1.0)
    assert layout(groups)[0][1] == ids(
        [
            layer.self_attn.in_proj_weight,
            layer.self_attn.out_proj.weight,
            layer.linear1.weight,
            layer.linear2.weight,
        ]
    )
    assert_partition(layer, groups)


# -- weight normalisation and other parametrizations -----------------------------------------
def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # legacy weight_norm is deprecated
        return fn(*args, **kwargs)


def test_weight_norm_constrains_the_magnitude_g():
    torch.manual_seed(0)
    lin = parametrizations.weight_norm(nn.Linear(6, 4))
    deconv = parametrizations.weight_norm(nn.ConvTranspose2d(3, 5, 2), dim=1)
    model = nn.Sequential(lin, deconv)
    wn = lambda m: m.parametrizations.weight  # noqa: E731
    groups = max_norm_param_groups(model, 0.5)
    assert layout(groups) == [
        (constrained(0.5), ids([wn(lin).original0])),
        (constrained(0.5, (0, 2, 3)), ids([wn(deconv).original0])),
        (
            UNCONSTRAINED,
            ids([lin.bias, wn(lin).original1, deconv.bias, wn(deconv).original1]),
        ),
    ]
    opt = MaxNormWrapper(torch.optim.SGD(groups, lr=0.1))
    with torch.no_grad():
        wn(lin).original0.mul_(10.0)
        wn(lin).original0[0] = 0.1  # one unit inside the bound
        wn(deconv).original0.mul_(10.0)
    v = wn(lin).original1.detach().clone()
    inside = lin.weight[0].detach().clone()
    opt.project()
    norms = lin.weight.norm(dim=1)  # the effective weight: g * v / |v|
    assert bool((norms <= 0.5 * (1 + 1e-6)).all())
    assert bool((norms[1:] >= 0.5 * (1 - 1e-5)).all())
    assert torch.equal(lin.weight[0], inside)
    assert torch.equal(wn(lin).original1, v)  # the direction is not touched
    per_out = deconv.weight.transpose(0, 1).flatten(1).norm(dim=1)
    assert bool((per_out <= 0.5 * (1 + 1e-6)).all())
    for _ in range(3):
        opt.zero_grad()
        (lin(torch.randn(2, 6)).sum() + deconv(torch.randn(2, 3, 4, 4)).sum()).backward()
        opt.step()
    assert bool((lin.weight.norm(dim=1) <= 0.5 * (1 + 1e-6)).all())
    per_out = deconv.weight.transpose(0, 1).flatten(1).norm(dim=1)
    assert bool((per_out <= 0.5 * (1 + 1e-6)).all())


def test_legacy_weight_norm_constrains_weight_g():
    torch.manual_seed(0)
    conv = quiet(nn.utils.weight_norm, nn.Conv1d(3, 4, 2))
    model = nn.Sequential(conv)
    groups = max_norm_param_groups(model, 0.5)
    assert layout(groups) == [
        (constrained(0.5), ids([conv.weight_g])),
        (UNCONSTRAINED, ids([conv.bias, conv.weight_v])),
    ]
    opt = MaxNormWrapper(torch.optim.Adam(groups, lr=1e-2))
    with torch.no_grad():
        conv.weight_g.mul_(10.0)
    opt.project()
    model(torch.randn(2, 3, 5))  # the legacy hook recomputes .weight in forward
    assert bool((conv.weight.flatten(1).norm(dim=1) <= 0.5 * (1 + 1e-6)).all())


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda: parametrizations.orthogonal(nn.Linear(4, 4)),
            r"Linear '0' cannot be constrained: its weight is computed by the "
            r"parametrization\(s\) _Orthogonal",
        ),
        (
            lambda: parametrizations.spectral_norm(nn.Linear(4, 4)),
            r"parametrization\(s\) _SpectralNorm",
        ),
        (
            lambda: nn.utils.spectral_norm(nn.Linear(4, 4)),
            r"its weight is not a parameter .*legacy torch.nn.utils.spectral_norm",
        ),
        (
            lambda: parametrizations.weight_norm(nn.ConvTranspose1d(3, 4, 2)),
            r"ConvTranspose1d '0' .*weight-normalised .* over dim=0, .* with dim=1",
        ),
        (
            lambda: parametrizations.weight_norm(nn.Linear(3, 4), dim=None),
            r"over the whole tensor, .* with dim=0",
        ),
        (
            lambda: quiet(nn.utils.weight_norm, nn.Linear(3, 4), dim=1),
            r"\(torch.nn.utils.weight_norm\) over dim=1",
        ),
    ],
    ids=[
        "orthogonal",
        "spectral_norm",
        "legacy-spectral_norm",
        "wn-deconv-dim0",
        "wn-whole",
        "wn-dim1",
    ],
)
def test_other_parametrizations_raise_unless_excluded(make, message):
    model = nn.Sequential(make(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=message) as err:
        max_norm_param_groups(model, 1.0)
    assert "overrides={'0': {'max_norm': None}}" in str(err.value)
    groups = max_norm_param_groups(model, 1.0, overrides={"0": {"max_norm": None}})
    assert layout(groups)[0] == (constrained(1.0), ids([model[1].weight]))
    assert_partition(model, groups)
    # Nothing to constrain: no error either.
    assert len(max_norm_param_groups(model, None)) == 1


# -- sparse embeddings -----------------------------------------------------------------------
class Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Embedding(50, 8, sparse=True)
        self.items = nn.EmbeddingBag(40, 8, mode="sum", sparse=True)
        self.tags = nn.Embedding(10, 8)  # dense
        self.mlp = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, user, items, tag):
        return self.mlp(torch.cat([self.users(user), self.items(items), self.tags(tag)], 1))


def test_sparse_embeddings_get_their_own_groups_after_the_dense_ones():
    torch.manual_seed(0)
    model = Recommender()
    groups = max_norm_param_groups(model, 1.0, overrides={"items": {"max_norm": 2.0}})
    assert layout(groups) == [
        (constrained(1.0), ids([model.tags.weight, model.mlp[0].weight, model.mlp[2].weight])),
        (UNCONSTRAINED, ids([model.mlp[0].bias, model.mlp[2].bias])),
        (constrained(1.0), ids([model.users.weight])),
        (constrained(2.0), ids([model.items.weight])),
    ]

    # The documented split: every group is all-sparse or all-dense.
    sparse = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
    }
    dense_groups = [g for g in groups if id(g["params"][0]) not in sparse]
    sparse_groups = [g for g in groups if id(g["params"][0]) in sparse]
    dense_opt = MaxNormWrapper(torch.optim.Adam(dense_groups, lr=0.05))
    sparse_opt = MaxNormWrapper(torch.optim.SparseAdam(sparse_groups, lr=0.05))
    for opt in (dense_opt, sparse_opt):
        opt.project()  # the initial N(0, 1) embedding rows exceed the bounds
    users_before = model.users.weight.detach().clone()
    user = torch.tensor([0, 1, 2, 3])
    items = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    tag = torch.tensor([0, 1, 0, 1])
    for _ in range(5):
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        model(user, items, tag).pow(2).mean().backward()
        assert model.users.weight.grad.is_sparse and model.items.weight.grad.is_sparse
        dense_opt.step()
        sparse_opt.step()
    assert model.users.weight.norm(dim=1).max() <= 1.0
    assert model.items.weight.norm(dim=1).max() <= 2.0
    assert model.tags.weight.norm(dim=1).max() <= 1.0
    assert not torch.equal(model.users.weight[:4], users_before[:4])
    assert torch.equal(model.users.weight[4:], users_before[4:])  # rows never looked up


def test_excluded_sparse_embeddings_stay_apart_from_the_dense_rest():
    model = Recommender()
    groups = max_norm_param_groups(model, None, overrides={"mlp": {"max_norm": 1.0}})
    assert layout(groups) == [
        (constrained(1.0), ids([model.mlp[0].weight, model.mlp[2].weight])),
        (UNCONSTRAINED, ids([model.tags.weight, model.mlp[0].bias, model.mlp[2].bias])),
        (UNCONSTRAINED, ids([model.users.weight, model.items.weight])),
    ]
    torch.optim.SparseAdam(groups[2:], lr=0.1)  # accepted


# -- lazy modules ----------------------------------------------------------------------------
def test_lazy_modules_must_be_initialised_first():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyConv1d(2, 1))
    with pytest.raises(ValueError, match=r"parameter '0.weight' is not initialised .*forward pass"):
        max_norm_param_groups(model, 1.0)
    model(torch.randn(3, 5, 7))  # the linear maps the last dim; the conv sees (3, 5, 4)
    groups = max_norm_param_groups(model, 1.0)
    assert layout(groups)[0] == (constrained(1.0), ids([model[0].weight, model[2].weight]))


# -- tied weights ----------------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.body = nn.Linear(6, 6)
        self.decoder = nn.Linear(6, 20)
        self.decoder.weight = self.emb.weight  # weight tying
        self.body_again = self.body  # one module under two names


def test_tied_weights_appear_once_where_first_met():
    model = TiedLM()
    groups = max_norm_param_groups(model, 1.0)
    assert layout(groups) == [
        (constrained(1.0), ids([model.emb.weight, model.body.weight])),
        (UNCONSTRAINED, ids([model.body.bias, model.decoder.bias])),
    ]
    assert_partition(model, groups)
    MaxNormWrapper(torch.optim.SGD(groups, lr=0.1))


def test_tied_weights_take_the_overrides_options_and_conflicts_raise():
    model = TiedLM()
    groups = max_norm_param_groups(model, None, overrides={"decoder": {"max_norm": 0.5}})
    assert layout(groups)[0] == (constrained(0.5), ids([model.emb.weight]))
    # The shared module under its second name:
    groups = max_norm_param_groups(model, 1.0, overrides={"body_again": {"max_norm": None}})
    assert id(model.body.weight) in layout(groups)[-1][1]
    with pytest.raises(
        ValueError,
        match=r"tied parameter is both 'emb.weight' \(override 'emb'\) and 'decoder.weight' "
        r"\(override 'decoder'\)",
    ):
        max_norm_param_groups(
            model, 1.0, overrides={"emb": {"max_norm": 2.0}, "decoder": {"max_norm": 0.5}}
        )
    with pytest.raises(ValueError, match=r"'body.weight' \(override 'body'\) and 'body_again"):
        max_norm_param_groups(model, 1.0, overrides={"body": {}, "body_again": {"max_norm": 2.0}})


# -- a property: every parameter exactly once, the expected ones constrained ------------------
# Each factory: (module, names of the parameters that must be constrained).
LAYERS = {
    "linear": lambda: (nn.Linear(4, 3), ["weight"]),
    "linear-nobias": lambda: (nn.Linear(4, 3, bias=False), ["weight"]),
    "conv2d": lambda: (nn.Conv2d(2, 3, 2), ["weight"]),
    "deconv3d": lambda: (nn.ConvTranspose3d(2, 3, 1, groups=1), ["weight"]),
    "embedding": lambda: (nn.Embedding(5, 3), ["weight"]),
    "sparse-bag": lambda: (nn.EmbeddingBag(5, 3, sparse=True), ["weight"]),
    "bilinear": lambda: (nn.Bilinear(2, 3, 4), ["weight"]),
    "layernorm": lambda: (nn.LayerNorm(3), []),
    "batchnorm": lambda: (nn.BatchNorm1d(3), []),
    "relu": lambda: (nn.ReLU(), []),
    "gru": lambda: (
        nn.GRU(3, 2, bidirectional=True),
        ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse"],
    ),
    "lstm-proj": lambda: (
        nn.LSTM(3, 4, proj_size=2),
        ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0"],
    ),
    "mha": lambda: (nn.MultiheadAttention(4, 2), ["in_proj_weight", "out_proj.weight"]),
    "weight-norm": lambda: (
        parametrizations.weight_norm(nn.Linear(3, 3)),
        ["parametrizations.weight.original0"],
    ),
    "block": lambda: (
        nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Sequential(nn.Conv1d(3, 3, 1))),
        ["0.weight", "2.0.weight"],
    ),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=6),
    excluded=st.sets(st.integers(0, 5), max_size=3),
    tie=st.booleans(),
)
def test_every_parameter_in_exactly_one_group(kinds, excluded, tie):
    model = nn.Sequential()
    expected: dict[str, float | None] = {}
    for i, kind in enumerate(kinds):
        layer, names = LAYERS[kind]()
        model.add_module(str(i), layer)
        for name in names:
            expected[f"{i}.{name}"] = None if i in excluded else 1.5
    if tie and len(kinds) > 1:
        model.add_module("again", model[0])  # a shared module
    overrides = {
        str(i): {"max_norm": None}
        for i in excluded
        if i < len(kinds) and any(k.startswith(f"{i}.") for k in expected)
    }
    groups = max_norm_param_groups(model, 1.5, overrides=overrides)
    assert_partition(model, groups)
    where = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    for name, param in params.items():
        assert where[id(param)]["max_norm"] == expected.get(name), name
    sparse_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
    }
    kinds = [{id(p) in sparse_ids for p in g["params"]} for g in groups]
    assert all(len(k) == 1 for k in kinds)  # every group all-sparse or all-dense
    assert [k.pop() for k in kinds] == sorted(id(g["params"][0]) in sparse_ids for g in groups)
    if not groups:  # e.g. only ReLUs: no parameters, no groups
        return
    opt = MaxNormWrapper(torch.optim.SGD(groups, lr=0.1))
    inflate(model, 100.0)
    opt.project()
    for g in opt.param_groups:
        if g["max_norm"] is not None:
            for p in g["params"]:
                assert slice_norms(p, g["norm_dim"]).max() <= 1.5


# -- the helper and a plain wrapper agree on simple models -----------------------------------
def test_plain_wrapper_matches_the_groups_on_plain_layers():
    """The one-liner (`max_norm=` on every parameter) constrains exactly what the helper
    does on plain layers: biases and norm-layer gains are left alone."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(  # noqa: E731
        nn.Conv1d(2, 4, 3), nn.LayerNorm(3), nn.Flatten(), nn.Linear(12, 5), nn.Embedding(5, 4)
    )
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    inflate(a, 30.0)
    inflate(b, 30.0)
    MaxNormWrapper(torch.optim.SGD(max_norm_param_groups(a, 1.0), lr=0.1)).project()
    MaxNormWrapper(torch.optim.SGD(b.parameters(), lr=0.1), max_norm=1.0).project()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.dim() <= 1:
            assert torch.equal(pa, pb), name  # left unchanged by both
        else:
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=0)

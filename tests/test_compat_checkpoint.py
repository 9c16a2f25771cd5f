"""Compatibility matrix, distributed checkpoint: ``torch.distributed.checkpoint.state_dict``
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` on a wrapper.

These functions need no process group in a single process (they only call
``torch.distributed`` collectives for sharded models), so none is started here.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from maxnorm_optim import MaxNormWrapper

from helpers import (
    assert_state_equal,
    assert_within,
    per_param_state,
    quadratic_loss,
    roundtrip,
)

COMPAT_SECTION = "Checkpointing (torch.distributed.checkpoint.state_dict)"
COMPAT_ORDER = 5
COMPAT_COLUMNS = {
    "test_get_on_fresh_wrapper_keeps_weights": "get on a fresh wrapper keeps weights",
    "test_set_get_roundtrip_keeps_max_norm_keys": "set/get round trip, resume",
}

torch.set_num_threads(1)

MAX_NORM = 1.0
MAX_NORM_KEYS = ("max_norm", "min_norm", "rate", "norm_dim", "norm_type", "error_if_nonfinite")


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # rows well outside the ball
    return model


def make_opt(model: torch.nn.Module, max_norm: float | None) -> MaxNormWrapper:
    groups = [
        {"params": [model[0].weight, model[2].weight]},
        {"params": [model[0].bias, model[2].bias], "max_norm": None},
    ]
    return MaxNormWrapper(torch.optim.Adam(groups, lr=0.05), max_norm=max_norm)


def train(model, opt, steps) -> None:
    for step in steps:
        opt.zero_grad()
        quadratic_loss(list(model.parameters()), step).backward()
        opt.step()


@pytest.mark.parametrize("call", ["get", "set"])
def test_get_on_fresh_wrapper_keeps_weights(call: str) -> None:
    model = make_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_opt(model, MAX_NORM)
    if call == "get":
        sd = get_optimizer_state_dict(model, opt)
        assert set(sd["state"]) == {name for name, _ in model.named_parameters()}
    else:
        donor = make_model(0)
        sd = get_optimizer_state_dict(donor, make_opt(donor, MAX_NORM))
        set_optimizer_state_dict(model, opt, sd)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{call} changed {key}"


def test_set_get_roundtrip_keeps_max_norm_keys() -> None:
    model = make_model(1)
    opt = make_opt(model, MAX_NORM)
    train(model, opt, range(2))
    # Through torch.save / torch.load: the returned tensors alias the optimizer's state.
    sd = roundtrip(get_optimizer_state_dict(model, opt))
    for group, want in zip(sd["param_groups"], opt.param_groups):
        for key in MAX_NORM_KEYS:
            assert group[key] == want[key], key

    other = make_model(2)
    other.load_state_dict(model.state_dict())
    resumed = make_opt(other, 5.0)  # a different default bound: the checkpoint's wins
    set_optimizer_state_dict(other, resumed, sd)
    for got, want in zip(resumed.param_groups, opt.param_groups):
        for key in MAX_NORM_KEYS:
            assert got[key] == want[key], key
    again = get_optimizer_state_dict(other, resumed)
    assert [{k: g[k] for k in MAX_NORM_KEYS} for g in again["param_groups"]] == [
        {k: g[k] for k in MAX_NORM_KEYS} for g in sd["param_groups"]
    ]

    train(model, opt, range(2, 5))
    train(other, resumed, range(2, 5))
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
    assert_state_equal(
        per_param_state(opt, list(model.parameters())),
        per_param_state(resumed, list(other.parameters())),
    )
    assert_within(other[0].weight, MAX_NORM)

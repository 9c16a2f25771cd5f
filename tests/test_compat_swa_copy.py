"""Compatibility matrix, SWA / EMA and copies: ``swa_utils.AveragedModel`` of
constrained weights, ``copy.deepcopy`` of ``(model, wrapper)`` and of a wrapper with an
LR scheduler attached.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.optim import swa_utils

from maxnorm_optim import MaxNormWrapper

from helpers import assert_state_equal, assert_within, per_param_state, quadratic_loss

COMPAT_SECTION = "SWA / EMA and deepcopy"
COMPAT_ORDER = 6
COMPAT_COLUMNS = {
    "test_averaged_model_stays_within_bound": "AveragedModel within bound",
    "test_deepcopy_model_and_wrapper": "deepcopy (model, wrapper)",
    "test_deepcopy_with_scheduler": "deepcopy with scheduler",
}

torch.set_num_threads(1)

MAX_NORM = 1.0


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.mul_(5.0)
        model[2].weight.mul_(5.0)
    return model


def make_opt(model: torch.nn.Module) -> MaxNormWrapper:
    groups = [
        {"params": [model[0].weight, model[2].weight]},
        {"params": [model[0].bias, model[2].bias], "max_norm": None},
    ]
    return MaxNormWrapper(torch.optim.SGD(groups, lr=0.2, momentum=0.9), max_norm=MAX_NORM)


def train_step(model, opt, step: int) -> None:
    opt.zero_grad()
    quadratic_loss(list(model.parameters()), step).backward()
    opt.step()


@pytest.mark.parametrize("average", ["swa", "ema"])
def test_averaged_model_stays_within_bound(average: str) -> None:
    model = make_model()
    opt = make_opt(model)
    kwargs = {} if average == "swa" else {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.9)}
    averaged = swa_utils.AveragedModel(model, **kwargs)
    for step in range(8):
        train_step(model, opt, step)
        averaged.update_parameters(model)
        for layer in (0, 2):
            assert_within(model[layer].weight, MAX_NORM)
            assert_within(averaged.module[layer].weight, MAX_NORM)
    # the average is not just the last weights (the check above is about an average)
    assert not torch.equal(averaged.module[0].weight, model[0].weight)


def test_deepcopy_model_and_wrapper() -> None:
    model = make_model()
    opt = make_opt(model)
    train_step(model, opt, 0)
    model2, opt2 = copy.deepcopy((model, opt))
    assert isinstance(opt2, MaxNormWrapper)
    params2 = list(model2.parameters())
    assert all(p is q for p, q in zip(opt2.param_groups[0]["params"], params2[0::2]))
    assert all(p not in opt.state for p in params2)
    for step in range(1, 4):
        train_step(model, opt, step)
        train_step(model2, opt2, step)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert_state_equal(
        per_param_state(opt, list(model.parameters())), per_param_state(opt2, params2)
    )
    # the copy projects its own model (and only its own)
    with torch.no_grad():
        model2[0].weight.mul_(3.0)
    train_step(model2, opt2, 4)
    assert_within(model2[0].weight, MAX_NORM)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    assert not bool((model[0].weight.norm(dim=1) <= MAX_NORM).all())


def test_deepcopy_with_scheduler() -> None:
    model = make_model()
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, opt, 0)
        sched.step()
        model2, opt2, sched2 = copy.deepcopy((model, opt, sched))
        assert sched2.optimizer is opt2
        for step in range(1, 6):
            train_step(model, opt, step)
            sched.step()
            train_step(model2, opt2, step)
            sched2.step()
            assert [g["lr"] for g in opt2.optimizer.param_groups] == [
                g["lr"] for g in opt.optimizer.param_groups
            ]
    assert opt2.param_groups[0]["lr"] == 0.2 * 0.5**3
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert_within(model2[0].weight, MAX_NORM)

"""Compatibility matrix, LR schedulers: every scheduler in ``torch.optim.lr_scheduler``
(discovered when the tests are collected) and ``swa_utils.SWALR`` on a wrapped SGD
(momentum) and Adam.

Each runs with warnings as errors (so no "lr_scheduler.step() before optimizer.step()"
warning), checks that its lr (and momentum/betas, for the cycling ones) changes reach
the base exactly as on a bare optimizer, and that a checkpoint of optimizer and
scheduler resumes bitwise.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as S
from torch.optim import swa_utils

from maxnorm_optim import MaxNormWrapper

from helpers import (
    assert_state_equal,
    assert_within,
    clone_params,
    drive,
    make_weight,
    per_param_state,
    roundtrip,
)

COMPAT_SECTION = "LR schedulers"
COMPAT_ORDER = 2
COMPAT_COLUMNS = {
    "test_scheduler_reaches_base": "lr reaches base, no warning",
    "test_scheduler_resume": "resume (optimizer + scheduler)",
}

torch.set_num_threads(1)

MAX_NORM = 1.0
STEPS = 6


def _lambda(epoch: int) -> float:
    return 0.8**epoch


def _constant(epoch: int) -> float:
    return 0.9


# Constructor arguments for each scheduler (short schedules, so that every phase runs
# in a few steps). A scheduler that torch adds later gets a row built with its defaults.
SCHEDULER_ARGS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda o: S.LambdaLR(o, _lambda),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, _constant),
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[1, 3], gamma=0.5),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=2),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.25, total_iters=3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.8),
    "SequentialLR": lambda o: S.SequentialLR(
        o,
        [S.ConstantLR(o, factor=0.5, total_iters=2), S.ExponentialLR(o, gamma=0.8)],
        milestones=[3],
    ),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=5, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=4),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, factor=0.5, total_iters=2), S.ExponentialLR(o, gamma=0.8)],
        optimizer=o,
    ),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "CyclicLR": lambda o: S.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=2, cycle_momentum=True
    ),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=10),
    "SWALR": lambda o: swa_utils.SWALR(o, swa_lr=0.01, anneal_epochs=2),
}


def scheduler_classes() -> dict[str, type]:
    found = {
        name: cls
        for name, cls in vars(S).items()
        if inspect.isclass(cls)
        and issubclass(cls, (S.LRScheduler, S.ReduceLROnPlateau))
        and cls not in (S.LRScheduler, S._LRScheduler)
    }
    found["SWALR"] = swa_utils.SWALR
    return dict(sorted(found.items()))


def build_scheduler(name: str, opt: torch.optim.Optimizer):
    make = SCHEDULER_ARGS.get(name)
    return make(opt) if make is not None else scheduler_classes()[name](opt)


BASES: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "SGD(momentum)": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9),
    "Adam": lambda g: torch.optim.Adam(g, lr=0.05),
}


def make_params() -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(make_weight(4, 3, (0.5, 1.5, 0.8, 2.0), seed=11)),
        torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4)),
    ]


def groups(params) -> list[dict[str, Any]]:
    # group 0 constrained (by the wrapper's default), group 1 not
    return [{"params": [params[0]]}, {"params": [params[1]], "max_norm": None}]


def sched_step(sched, loss_value: float) -> None:
    if isinstance(sched, S.ReduceLROnPlateau):
        sched.step(loss_value)
    else:
        sched.step()


def hyper(opt) -> list[tuple[Any, ...]]:
    return [
        (float(g["lr"]), g.get("momentum"), tuple(g["betas"]) if "betas" in g else None)
        for g in opt.param_groups
    ]


ROWS = [
    pytest.param(sched, base, id=f"{sched}-{base}")
    for sched in scheduler_classes()
    for base in BASES
]


@pytest.mark.parametrize(("sched_name", "base"), ROWS)
def test_scheduler_reaches_base(sched_name: str, base: str) -> None:
    pa = make_params()
    pb = clone_params(pa)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bare = BASES[base](groups(pa))
        bare_sched = build_scheduler(sched_name, bare)
        wrapped = MaxNormWrapper(BASES[base](groups(pb)), max_norm=MAX_NORM)
        sched = build_scheduler(sched_name, wrapped)
        assert hyper(wrapped.optimizer) == hyper(bare)
        seen = {hyper(bare)[0]}
        for step in range(STEPS):
            drive(bare, pa, step)
            drive(wrapped, pb, step)
            sched_step(bare_sched, 1.0)  # a constant metric: ReduceLROnPlateau reduces
            sched_step(sched, 1.0)
            assert hyper(wrapped.optimizer) == hyper(bare), f"step {step}"
            seen.add(hyper(bare)[0])
            # the unconstrained group moves exactly as on the bare optimizer
            assert torch.equal(pa[1], pb[1]), f"step {step}"
            assert_within(pb[0], MAX_NORM)
    assert len(seen) > 1, "the schedule never changed the lr (or momentum)"


@pytest.mark.parametrize(("sched_name", "base"), ROWS)
def test_scheduler_resume(sched_name: str, base: str) -> None:
    pa = make_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = MaxNormWrapper(BASES[base](groups(pa)), max_norm=MAX_NORM)
        first_sched = build_scheduler(sched_name, first)
        for step in range(3):
            drive(first, pa, step)
            sched_step(first_sched, 1.0)
        saved = roundtrip(first.state_dict())
        saved_sched = first_sched.state_dict()

        pb = clone_params(pa)
        resumed = MaxNormWrapper(BASES[base](groups(pb)), max_norm=MAX_NORM)
        sched = build_scheduler(sched_name, resumed)  # before load_state_dict, as torch says
        resumed.load_state_dict(saved)
        sched.load_state_dict(saved_sched)
        assert hyper(resumed) == hyper(first)
        for step in range(3, STEPS + 2):
            drive(first, pa, step)
            drive(resumed, pb, step)
            sched_step(first_sched, 1.0)
            sched_step(sched, 1.0)
            assert hyper(resumed) == hyper(first), f"step {step}"
            for a, b in zip(pa, pb):
                assert torch.equal(a, b), f"step {step}"
    assert_state_equal(per_param_state(first, pa), per_param_state(resumed, pb))
    assert_within(pb[0], MAX_NORM)


def test_every_scheduler_is_a_row() -> None:
    names = {p.values[0] for p in ROWS}
    for required in (
        "ReduceLROnPlateau",
        "OneCycleLR",
        "CyclicLR",
        "SequentialLR",
        "ChainedScheduler",
        "SWALR",
    ):
        assert required in names

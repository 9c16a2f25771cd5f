"""Compatibility matrix, AMP: ``torch.amp.GradScaler("cpu")`` driving a wrapper around a
default (for-loop), ``foreach`` and ``fused`` base, compared step by step with the same
pipeline on the bare optimizer followed by the reference projection.

A fused base reads ``grad_scale`` / ``found_inf`` that GradScaler sets on the object it
was given (the wrapper); the other bases are skipped by GradScaler itself.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from maxnorm_optim import MaxNormWrapper

from helpers import (
    assert_projected,
    assert_state_equal,
    assert_within,
    clone_params,
    make_weight,
    per_param_state,
    quadratic_loss,
)

COMPAT_SECTION = "AMP (GradScaler on CPU)"
COMPAT_ORDER = 3
COMPAT_COLUMNS = {
    "test_inf_step_is_skipped": "inf step skipped, weights untouched",
    "test_unscale_clip_step_unscales_once": "unscale_ + clip + step",
}

torch.set_num_threads(1)

MAX_NORM = 1.0
OPTIMIZERS = {
    "SGD": lambda g, **kw: torch.optim.SGD(g, lr=0.05, momentum=0.9, **kw),
    "Adam": lambda g, **kw: torch.optim.Adam(g, lr=0.05, **kw),
    "AdamW": lambda g, **kw: torch.optim.AdamW(g, lr=0.05, **kw),
    "Adagrad": lambda g, **kw: torch.optim.Adagrad(g, lr=0.05, **kw),
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
ROWS = [
    pytest.param(name, variant, id=f"{name}-{variant}")
    for name in OPTIMIZERS
    for variant in VARIANTS
]


def make_params() -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(make_weight(4, 3, (0.5, 1.5, 0.8, 2.0), seed=21)),
        torch.nn.Parameter(make_weight(5, 2, (2.0, 0.3), seed=22)),
        torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4)),
    ]


CONSTRAINED = [True, True, False]


def build(name: str, variant: str, params, wrap: bool):
    groups = [{"params": params[:2]}, {"params": params[2:], "max_norm": None}]
    base = OPTIMIZERS[name](groups, **VARIANTS[variant])
    return MaxNormWrapper(base, max_norm=MAX_NORM) if wrap else base


def amp_step(opt, scaler, params, step: int, *, inf: bool = False, clip: float | None = None):
    opt.zero_grad()
    loss = quadratic_loss(params, step)
    scaler.scale(loss).backward()
    if inf:
        with torch.no_grad():
            params[0].grad[1, 2] = float("inf")
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt)
    scaler.update()


def check_step(pa, pb) -> int:
    """The wrapper's weights are the bare ones projected; then continue from them."""
    scaled = 0
    with torch.no_grad():
        for a, b, c in zip(pa, pb, CONSTRAINED):
            if c:
                scaled += assert_projected(b, a, MAX_NORM)
                assert_within(b, MAX_NORM)
            else:
                assert torch.equal(a, b)
            a.copy_(b)
    return scaled


@pytest.mark.parametrize(("name", "variant"), ROWS)
def test_inf_step_is_skipped(name: str, variant: str) -> None:
    pa = make_params()
    pb = clone_params(pa)
    bare, wrapped = build(name, variant, pa, False), build(name, variant, pb, True)
    s_bare = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    s_wrap = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled = 0
    for step in range(2):
        amp_step(bare, s_bare, pa, step)
        amp_step(wrapped, s_wrap, pb, step)
        scaled += check_step(pa, pb)
    assert scaled > 0
    # Push a row out of the ball so that a projection on the skipped step would show.
    with torch.no_grad():
        for p in (pa[0], pb[0]):
            p[0] *= 3.0
    before = [p.detach().clone() for p in pb]
    amp_step(bare, s_bare, pa, 2, inf=True)
    amp_step(wrapped, s_wrap, pb, 2, inf=True)
    for b, p in zip(before, pb):
        assert torch.equal(b, p), "the inf step changed the weights"
    assert s_wrap.get_scale() == s_bare.get_scale() == 2.0**11  # grew twice, halved once
    assert_state_equal(per_param_state(bare, pa), per_param_state(wrapped, pb))
    for step in range(3, 5):  # and training goes on as on the bare optimizer
        amp_step(bare, s_bare, pa, step)
        amp_step(wrapped, s_wrap, pb, step)
        check_step(pa, pb)
    assert_state_equal(per_param_state(bare, pa), per_param_state(wrapped, pb))
    assert not hasattr(wrapped.optimizer, "found_inf")


@pytest.mark.parametrize(("name", "variant"), ROWS)
def test_unscale_clip_step_unscales_once(name: str, variant: str) -> None:
    pa = make_params()
    pb = clone_params(pa)
    bare, wrapped = build(name, variant, pa, False), build(name, variant, pb, True)
    s_bare = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    s_wrap = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = 0
    for step in range(3):
        amp_step(bare, s_bare, pa, step, clip=1.0)
        amp_step(wrapped, s_wrap, pb, step, clip=1.0)
        # the clipped, unscaled gradients are what a single unscale gives
        for a, b in zip(pa, pb):
            assert torch.equal(a.grad, b.grad)
        assert float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in pb]))) <= (
            1.0 + 1e-6
        )
        scaled += check_step(pa, pb)
    assert scaled > 0
    assert_state_equal(per_param_state(bare, pa), per_param_state(wrapped, pb))

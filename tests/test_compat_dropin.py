"""Drop-in: the wrapped optimizer's own step (and any patch of it) runs once per wrapper
step; stepping it directly projects too, once; nothing the wrapper caches goes stale;
every check runs before the update, and a rejected step changes nothing; wrapping
leaves the wrapped optimizer's `defaults` as they were."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.profiler import profile

from maxnorm_optim import MaxNormWrapper

from helpers import assert_state_equal, assert_within

COMPAT_SECTION = "Drop-in"
COMPAT_ORDER = 7
COMPAT_ROWS = {
    "test_an_instance_patch_of_base_step_runs_once_per_wrapper_step": "a patch of base.step runs",
    "test_a_patch_that_bypasses_the_base_hooks_still_projects_once": (
        "a patch bypassing the hooks: projected once"
    ),
    "test_global_hooks_fire_once_and_see_projected_weights": "global step hooks: once, projected",
    "test_a_base_without_step_hooks_is_projected_by_the_wrapper": (
        "base without step hooks (Lookahead)"
    ),
    "test_step_keyword_arguments_reach_the_base": "step(closure, **kwargs) forwarded",
    "test_wrapping_leaves_the_base_defaults_alone": "base.defaults unchanged",
    "test_groups_added_on_the_base_get_the_wrapper_defaults": "groups added on the base",
    "test_edited_options_take_effect_at_the_next_step": "edited options: next step",
    "test_a_tensor_bound_mutated_later_cannot_be_smuggled_in": "tensor-valued bound rejected",
    "test_a_param_appended_by_hand_that_does_not_fit_is_rejected_before_the_update": (
        "bad param appended by hand: rejected first"
    ),
    "test_a_compiled_step_enforces_every_new_bound_without_warnings": (
        "compiled step, 13 bounds: each holds"
    ),
    "test_a_warm_up_from_zero_lr_projects_the_first_step": "lr warm-up from 0: projected",
    "test_dcp_state_initialisation_leaves_weights_bitwise": "DCP state init: weights unchanged",
    "test_fsdp1_flattened_parameters_are_refused_naming_fully_shard": "FSDP1 flat params: refused",
    "test_a_weight_replaced_by_a_flat_shard_is_refused_before_the_update": (
        "flat 1-d shard: refused first"
    ),
}
COMPAT_COLUMNS = dict.fromkeys(COMPAT_ROWS, "holds")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def inflate(model: nn.Module, factor: float = 30.0) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(factor)


def backward(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    model.zero_grad()
    model(x).pow(2).mean().backward()


def projections(fn) -> int:
    """How many times the wrapper projected while `fn` ran (its profiler range)."""
    with profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "maxnorm_optim.project")


def snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    return (
        [p.detach().clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
    )


def assert_unchanged(model: nn.Module, opt: torch.optim.Optimizer, snap) -> None:
    weights, state = snap
    for a, b in zip(model.parameters(), weights):
        assert torch.equal(a, b)
    assert_state_equal(opt.state_dict(), state)


# -- the base's own step, its patches and hooks ------------------------------------------------
def test_an_instance_patch_of_base_step_runs_once_per_wrapper_step():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MaxNormWrapper(base, max_norm=0.5)
    calls = []
    real = base.step

    def patched(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    base.step = patched  # what test harnesses, profilers and schedulers do
    backward(model)
    assert projections(opt.step) == 1
    assert calls == [1]
    assert_within(model[0].weight, 0.5)


def test_a_patch_that_bypasses_the_base_hooks_still_projects_once():
    model = make_model()
    inflate(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MaxNormWrapper(base, max_norm=0.5)
    raw = type(base).step.__wrapped__  # the undecorated step: no hooks
    base.step = lambda closure=None: raw(base, closure)
    backward(model)
    assert projections(opt.step) == 1
    assert_within(model[0].weight, 0.5)


def test_global_hooks_fire_once_and_see_projected_weights():
    model = make_model()
    inflate(model)
    opt = MaxNormWrapper(torch.optim.Adam(model.parameters(), lr=1e-3), max_norm=0.5)
    seen = []
    h1 = register_optimizer_step_pre_hook(lambda o, a, k: seen.append("pre"))
    h2 = register_optimizer_step_post_hook(
        lambda o, a, k: seen.append(float(model[0].weight.norm(dim=1).max()))
    )
    try:
        backward(model)
        opt.step()
    finally:
        h1.remove()
        h2.remove()
    assert seen[0] == "pre" and len(seen) == 2 and seen[1] <= 0.5


@pytest.mark.parametrize("on", ["base", "wrapper"])
def test_a_scheduler_on_either_gives_no_warning(on):
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.StepLR(opt.optimizer if on == "base" else opt, 1, 0.5)
        for i in range(3):
            backward(model, i)
            opt.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**3


@pytest.mark.parametrize("how", ["base.step", "scaler.step(base)", "kept reference"])
def test_stepping_the_base_directly_projects_exactly_once(how):
    model = make_model()
    inflate(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MaxNormWrapper(base, max_norm=1.0)
    backward(model)
    if how == "base.step":
        count = projections(base.step)
    elif how == "scaler.step(base)":
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        model.zero_grad()
        scaler.scale(model(torch.randn(8, 6)).pow(2).mean()).backward()
        count = projections(lambda: scaler.step(base))
    else:
        factory_ref = opt.optimizer  # e.g. a training framework's own reference
        count = projections(factory_ref.step)
    assert count == 1
    assert_within(model[0].weight, 1.0)
    assert_within(model[2].weight, 1.0)


def test_a_base_without_step_hooks_is_projected_by_the_wrapper():
    """torch_optimizer.Lookahead never runs Optimizer.__init__: no step hooks fire."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    model = make_model()
    inflate(model)
    base = torch_optimizer.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    opt = MaxNormWrapper(base, max_norm=1.0)
    for i in range(3):
        backward(model, i)
        assert projections(opt.step) == 1
        assert_within(model[0].weight, 1.0)


def test_step_keyword_arguments_reach_the_base():
    class WithOptions(torch.optim.SGD):
        def step(self, closure=None, *, scale=1.0):  # like ZeroRedundancyOptimizer's kwargs
            self.seen_scale = scale
            return super().step(closure)

    model = make_model()
    opt = MaxNormWrapper(WithOptions(model.parameters(), lr=0.1), max_norm=1.0)
    backward(model)
    opt.step(scale=0.5)
    assert opt.optimizer.seen_scale == 0.5
    loss = opt.step(lambda: torch.tensor(3.0), scale=2.0)
    assert loss == 3.0 and opt.optimizer.seen_scale == 2.0


# -- wrapping leaves the base as it was --------------------------------------------------------
def test_wrapping_leaves_the_base_defaults_alone():
    model = make_model()
    base = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.1)
    before = dict(base.defaults)
    opt = MaxNormWrapper(base, max_norm=2.0, norm_type=1.0)
    assert base.defaults == before
    rebuilt = type(base)(model.parameters(), **base.defaults)  # a common way to rebuild
    assert rebuilt.defaults == before
    assert opt.max_norm_defaults["max_norm"] == 2.0
    assert opt.param_groups[0]["max_norm"] == 2.0  # the keys ride in the groups


def test_groups_added_on_the_base_get_the_wrapper_defaults():
    model = make_model()
    inflate(model)
    opt = MaxNormWrapper(torch.optim.SGD([model[0].weight], lr=0.1), max_norm=0.5)
    opt.optimizer.add_param_group({"params": [model[2].weight]})
    backward(model)
    opt.step()
    assert opt.param_groups[1]["max_norm"] == 0.5
    assert_within(model[2].weight, 0.5)


# -- nothing cached goes stale ----------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    ["prune rows", "transpose", "view", "new storage", "grow rows"],
)
def test_a_new_layout_of_a_parameter_is_seen_by_the_next_step(change):
    """`p.data = ...` at the same address (a view, a transpose) or elsewhere: the next
    step projects the parameter as it is now, without error."""
    w = nn.Parameter(torch.randn(8, 8) * 5)
    opt = MaxNormWrapper(torch.optim.SGD([w], lr=0.1), max_norm=1.0)
    w.grad = torch.randn_like(w)
    opt.step()
    if change == "prune rows":
        w.data = w.data[:5]
    elif change == "transpose":
        w.data = w.data.t()
    elif change == "view":
        w.data = w.data.view(4, 16)
    elif change == "new storage":
        w.data = torch.randn(8, 8) * 5
    else:
        w.data = torch.randn(12, 8) * 5
    with torch.no_grad():
        w.mul_(7)
    w.grad = torch.randn_like(w)
    opt.step()
    assert_within(w, 1.0)
    if change == "transpose":
        assert not w.is_contiguous()


def test_edited_options_take_effect_at_the_next_step():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    for c in (0.8, 0.6, 0.4, 0.4, 0.2):
        opt.param_groups[0]["max_norm"] = c
        backward(model)
        opt.step()
        assert_within(model[0].weight, c)
    opt.param_groups[0]["norm_dim"] = None  # now the whole tensor
    backward(model)
    opt.step()
    assert model[0].weight.norm() <= 0.2


# -- every check before the update ------------------------------------------------------------
@pytest.mark.parametrize(
    "value,exc",
    [
        (True, TypeError),
        (np.array([1.0]), TypeError),
        (torch.tensor(1.0), TypeError),
        (-1.0, ValueError),
        (10**400, ValueError),
    ],
)
def test_a_bad_hand_edit_is_rejected_before_the_update(value, exc):
    model = make_model()
    opt = MaxNormWrapper(torch.optim.Adam(model.parameters(), lr=1e-2), max_norm=1.0)
    backward(model)
    opt.step()  # some state
    opt.param_groups[0]["max_norm"] = value
    backward(model, 1)
    snap = snapshot(model, opt)
    groups = [{k: v for k, v in g.items() if k not in ("params", "max_norm")}
              for g in opt.param_groups]
    with pytest.raises(exc, match="param group 0: max_norm"):
        opt.step()
    assert_unchanged(model, opt, snap)
    assert [{k: v for k, v in g.items() if k not in ("params", "max_norm")}
            for g in opt.param_groups] == groups
    with pytest.raises(exc, match="param group 0: max_norm"):
        opt.optimizer.step()  # stepping the base is checked too
    assert_unchanged(model, opt, snap)


def test_a_tensor_bound_mutated_later_cannot_be_smuggled_in():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    bound = torch.tensor(1.0)
    opt.param_groups[0]["max_norm"] = bound
    backward(model)
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        opt.step()
    bound.fill_(-1.0)
    opt.param_groups[0]["max_norm"] = 0.5
    opt.step()
    assert_within(model[0].weight, 0.5)


def test_a_param_appended_by_hand_that_does_not_fit_is_rejected_before_the_update():
    model = make_model()
    extra = nn.Parameter(torch.randn(3))
    opt = MaxNormWrapper(torch.optim.SGD([model[0].weight], lr=0.1), max_norm=1.0, norm_dim=1)
    opt.param_groups[0]["params"].append(extra)
    extra.grad = torch.ones_like(extra)
    backward(model)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param group 0: parameter 1 \(shape \(3,\)\)"):
        opt.step()
    assert_unchanged(model, opt, snap)


# -- torch.compile ------------------------------------------------------------------------------
def test_a_compiled_step_enforces_every_new_bound_without_warnings():
    """Ten and more distinct bounds between compiled steps: each one holds, with no
    recompile per value and no warning from the library."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    w = nn.Parameter(torch.full((4, 6), 3.0))
    opt = MaxNormWrapper(torch.optim.SGD([w], lr=1e-3), max_norm=0.5)

    @torch.compile(backend="eager")
    def step():
        opt.step()

    bounds = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 0.6, 0.7, 0.8]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. Dynamo's warnings about our code
        for c in bounds:
            with torch.no_grad():
                w.fill_(3.0)
            w.grad = torch.ones_like(w)
            opt.param_groups[0]["max_norm"] = c
            step()
            norms = w.detach().norm(dim=1)
            assert bool((norms <= c).all()) and bool((norms >= c * (1 - 1e-5)).all()), (c, norms)
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["recompiles"].values()) <= 2, dict(counters["recompiles"])
    torch._dynamo.reset()


# -- zero learning rates, DCP ---------------------------------------------------------------------
def test_a_warm_up_from_zero_lr_projects_the_first_step():
    model = make_model()
    inflate(model)
    opt = MaxNormWrapper(torch.optim.AdamW(model.parameters(), lr=0.0), max_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)
    backward(model)
    opt.step()
    sched.step()
    assert_within(model[0].weight, 1.0)


def test_dcp_state_initialisation_leaves_weights_bitwise():
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = make_model()
    inflate(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt = MaxNormWrapper(torch.optim.Adam(model.parameters(), lr=1e-3), max_norm=1.0)
    osd = get_optimizer_state_dict(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    set_optimizer_state_dict(model, opt, osd)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- flattened parameters ---------------------------------------------------------------------
def test_fsdp1_flattened_parameters_are_refused_naming_fully_shard():
    """FSDP1 needs an accelerator; the attributes it sets on the parameters it hands to
    the optimizer are what the wrapper detects."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    flat = nn.Parameter(torch.randn(64))
    _set_fsdp_flattened(flat)
    with pytest.raises(ValueError, match="fully_shard"):
        MaxNormWrapper(torch.optim.SGD([flat], lr=0.1), max_norm=1.0)
    view = nn.Parameter(torch.randn(8, 8))  # use_orig_params=True: a view, flagged too
    _set_fsdp_flattened(view)
    with pytest.raises(ValueError, match="FSDP1"):
        MaxNormWrapper(torch.optim.SGD([view], lr=0.1), max_norm=1.0)


def test_a_weight_replaced_by_a_flat_shard_is_refused_before_the_update():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    backward(model)
    opt.step()
    model[0].weight.data = model[0].weight.data.flatten()[:50].clone()  # a ZeRO-style shard
    model[0].weight.grad = torch.ones(50)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"flat 1-d shard.*fully_shard"):
        opt.step()
    assert_unchanged(model, opt, snap)


def test_constraint_stats_show_what_each_group_holds():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    inflate(model)
    opt = MaxNormWrapper(
        torch.optim.SGD(model.parameters(), lr=0.0), max_norm=1.0, track_stats=True
    )
    backward_x = torch.randn(5, 4)
    model(backward_x).sum().backward()
    opt.step()
    (stats,) = opt.constraint_stats()
    assert int(stats["slices"]) == 8 + 3  # the two weights' rows; biases and gains hold none
    assert 0 < int(stats["projected"]) <= 11
    assert math.isfinite(float(stats["max_norm_before"]))

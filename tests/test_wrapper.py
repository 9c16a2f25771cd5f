"""The optimizer contract of MaxNormWrapper: options as group keys, semantics of the
projection, step / closure / project(), equivalence with the bare base, live views,
checkpoints, validation, hooks, GradScaler and copies."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from maxnorm_optim import MaxNormWrapper, max_norm_

from reference import reference_project, slice_norms

MAX_NORM_KEYS = ("max_norm", "min_norm", "rate", "norm_dim", "norm_type", "error_if_nonfinite")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(32, 6, generator=g) * 3, torch.randn(32, 4, generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
    x, y = batch(i)
    opt.zero_grad()
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    opt.step()
    return loss


def groups_for(model: nn.Module, **weight_opts):
    return [
        {"params": [model[0].weight, model[2].weight], **weight_opts},
        {"params": [model[0].bias, model[2].bias]},
    ]


# -- 1. subclass, defaults written into groups ----------------------------------------------
def test_is_optimizer_and_exposes_base():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MaxNormWrapper(base, max_norm=2.0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is base


def test_kwargs_are_defaults_written_into_groups():
    model = make_model()
    base = torch.optim.SGD(
        [
            {"params": [model[0].weight], "max_norm": 1.5, "norm_type": 1.0},
            {"params": [model[2].weight]},
            {"params": [model[0].bias, model[2].bias], "max_norm": None},
        ],
        lr=0.1,
    )
    opt = MaxNormWrapper(base, max_norm=3.0, norm_dim=1)
    g0, g1, g2 = opt.param_groups
    assert (g0["max_norm"], g0["norm_type"], g0["norm_dim"]) == (1.5, 1.0, 1)
    assert (g1["max_norm"], g1["norm_type"], g1["norm_dim"]) == (3.0, 2.0, 1)
    assert g2["max_norm"] is None
    saved = opt.state_dict()["param_groups"]
    for g in saved:
        assert set(MAX_NORM_KEYS) <= set(g)
    assert opt.max_norm_defaults["max_norm"] == 3.0
    assert "max_norm" not in base.defaults and opt.defaults is base.defaults


# -- 2./5. semantics of max_norm, norm_dim, norm_type ---------------------------------------
def test_default_norm_dim_is_one_norm_per_output_unit():
    torch.manual_seed(0)
    conv = torch.randn(5, 3, 2, 2) * 4
    lin = torch.randn(7, 9) * 4
    vec = torch.randn(11) * 4
    scalar = torch.tensor(-9.0)
    tensors = [conv, lin, vec, scalar]
    before = [t.clone() for t in tensors]
    max_norm_(tensors, 2.0)
    assert torch.allclose(conv.flatten(1).norm(dim=1).max(), torch.tensor(2.0))
    expected = reference_project(before[0], 2.0, (1, 2, 3))
    torch.testing.assert_close(conv, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(lin, reference_project(before[1], 2.0, 1), rtol=1e-5, atol=0)
    # Tensors with fewer than two dims (biases, gains, scalars) hold no unit: unchanged.
    assert torch.equal(vec, before[2]) and torch.equal(scalar, before[3])
    # norm_dim=None (or 0) bounds a vector as a whole.
    max_norm_([vec, scalar], 2.0, None)
    torch.testing.assert_close(vec, reference_project(before[2], 2.0, None), rtol=1e-5, atol=0)
    torch.testing.assert_close(scalar, torch.tensor(-2.0), rtol=1e-5, atol=0)


def test_norm_dim_none_and_negative_dims():
    torch.manual_seed(1)
    w = torch.randn(4, 5, 6) * 3
    for norm_dim in (None, -1, (0, -1), (-3, 1)):
        x = w.clone()
        max_norm_(x, 1.0, norm_dim)
        torch.testing.assert_close(x, reference_project(w, 1.0, norm_dim))


def test_inbound_rows_bitwise_unchanged_unlike_the_eps_formula():
    torch.manual_seed(2)
    w = torch.randn(100, 32)
    w[:50] *= 0.5 / w[:50].norm(dim=1, keepdim=True)  # norms 0.5, inside c = 1
    w[50:] *= 4 / w[50:].norm(dim=1, keepdim=True)  # norms 4, outside
    before = w.clone()
    max_norm_(w, 1.0)
    assert torch.equal(w[:50], before[:50])
    # The naive formula shrinks the in-bound rows too:
    naive = before.clone()
    n = naive.norm(dim=1, keepdim=True)
    naive *= n.clamp(max=1.0) / (1e-7 + n)
    assert not torch.equal(naive[:50], before[:50])
    torch.testing.assert_close(w[50:], reference_project(before[50:], 1.0), rtol=1e-5, atol=0)


def test_zero_slice_stays_zero_and_nonfinite_slices_left_alone():
    w = torch.randn(5, 4) * 10
    w[0] = 0
    w[1, 2] = float("inf")
    w[2, 0] = float("nan")
    w[3, 1] = float("-inf")
    before = w.clone()
    max_norm_(w, 1.0)
    assert torch.equal(w[0], torch.zeros(4))
    assert torch.equal(w[1], before[1])
    assert torch.equal(w[2].isnan(), before[2].isnan())
    assert torch.equal(w[2][~w[2].isnan()], before[2][~before[2].isnan()])
    assert torch.equal(w[3], before[3])
    assert w[4].norm() <= 1.0


def test_error_if_nonfinite_names_the_parameter():
    model = make_model()
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    opt = MaxNormWrapper(
        torch.optim.SGD(model.parameters(), lr=1e-3), max_norm=1.0, error_if_nonfinite=True
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match=r"parameter 2 of param group 0 \(shape \(4, 16\)\)"):
        opt.step()
    with pytest.raises(RuntimeError, match="NaN or inf"):
        max_norm_(torch.tensor([1.0, float("inf")]), 1.0, None, error_if_nonfinite=True)
    max_norm_(torch.tensor([1.0, float("inf")]), 1.0, error_if_nonfinite=True)  # no slice


def test_error_if_nonfinite_uses_param_names():
    model = make_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    base = torch.optim.SGD(model.named_parameters(), lr=1e-3)
    opt = MaxNormWrapper(base, max_norm=1.0, error_if_nonfinite=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match=r"'0\.weight'"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_in_fp32(dtype):
    torch.manual_seed(3)
    w32 = torch.randn(64, 300) * 2
    w = w32.to(dtype)
    before = w.clone()
    max_norm_(w, 1.0)
    n = slice_norms(w)
    assert bool((n <= 1.0 * (1 + 4 * torch.finfo(dtype).eps)).all())
    # A squared sum of 300 values of ~2 overflows no fp16 accumulator: norms were fp32.
    expected = reference_project(before, 1.0)
    torch.testing.assert_close(w.float(), expected.float(), rtol=2e-2, atol=1e-2)


def test_complex_parameters():
    torch.manual_seed(4)
    w = torch.randn(8, 5, dtype=torch.complex64) * 3
    before = w.clone()
    max_norm_(w, 1.0)
    torch.testing.assert_close(w, reference_project(before, 1.0), rtol=1e-5, atol=1e-7)
    assert bool((torch.linalg.vector_norm(w, dim=1) <= 1.0).all())
    assert bool((torch.linalg.vector_norm(w.to(torch.complex128), dim=1) <= 1.0).all())


def test_max_norm_inf_is_noop_and_p_inf():
    w = torch.randn(6, 7) * 5
    before = w.clone()
    max_norm_(w, math.inf)
    assert torch.equal(w, before)
    max_norm_(w, 1.0, norm_type=math.inf)
    assert bool((w.abs().amax(1) <= 1.0).all())
    torch.testing.assert_close(w, reference_project(before, 1.0, p=math.inf))


# -- 4. step, closure, project() -------------------------------------------------------------
def test_step_passes_closure_and_returns_loss_and_projects_only_params_with_grad():
    model = make_model()
    extra = nn.Parameter(torch.full((3, 4), 5.0))
    base = torch.optim.SGD(
        [{"params": [model[0].weight, model[2].weight, extra]}, {"params": [model[0].bias]}],
        lr=0.1,
    )
    opt = MaxNormWrapper(base, max_norm=0.5)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert model[0].weight.norm(dim=1).max() <= 0.5
    assert torch.equal(extra, torch.full((3, 4), 5.0))  # no grad: not projected
    opt.project()
    assert extra.norm(dim=1).max() <= 0.5


def test_project_initial_weights():
    model = make_model()
    with torch.no_grad():
        model[0].weight.mul_(10)
    opt = MaxNormWrapper(torch.optim.Adam(groups_for(model, max_norm=0.7), lr=1e-3))
    bias_before = model[0].bias.clone()
    opt.project()
    assert model[0].weight.norm(dim=1).max() <= 0.7
    assert torch.equal(model[0].bias, bias_before)


# -- 12. equivalence with the bare base ------------------------------------------------------
@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (torch.optim.SGD, {"lr": 0.2, "momentum": 0.9}),
        (torch.optim.AdamW, {"lr": 0.05}),
        (torch.optim.Adam, {"lr": 0.05, "foreach": True}),
    ],
)
@pytest.mark.parametrize("max_norm", [None, math.inf])
def test_unconstrained_wrapper_is_bit_identical_to_bare_base(opt_cls, kw, max_norm):
    m1, m2 = make_model(), make_model()
    bare = opt_cls(m1.parameters(), **kw)
    wrapped = MaxNormWrapper(opt_cls(m2.parameters(), **kw), max_norm=max_norm)
    for i in range(25):
        train_step(m1, bare, i)
        train_step(m2, wrapped, i)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = bare.state_dict(), wrapped.state_dict()
    for k in s1["state"]:
        for key, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][key]))
    for g1, g2 in zip(s1["param_groups"], s2["param_groups"]):
        assert {k: v for k, v in g2.items() if k not in MAX_NORM_KEYS} == g1


@pytest.mark.parametrize(
    "opt_cls,kw", [(torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.1})]
)
def test_constrained_wrapper_equals_bare_step_plus_reference_projection(opt_cls, kw):
    m1, m2 = make_model(), make_model()
    bare = opt_cls(groups_for(m1), **kw)
    wrapped = MaxNormWrapper(opt_cls(groups_for(m2, max_norm=0.8), **kw))
    for i in range(20):
        with torch.no_grad():  # compare single steps from the same weights
            for a, b in zip(m1.parameters(), m2.parameters()):
                a.copy_(b)
        train_step(m1, bare, i)
        with torch.no_grad():
            for w in (m1[0].weight, m1[2].weight):
                w.copy_(reference_project(w, 0.8))
        train_step(m2, wrapped, i)
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert m2[0].weight.norm(dim=1).max() <= 0.8
    assert m2[0].weight.norm(dim=1).max() >= 0.8 * (1 - 1e-5)  # the constraint was active


# -- 7. live views ----------------------------------------------------------------------------
@pytest.mark.parametrize("load_via", ["wrapper", "base"])
def test_scheduler_keeps_working_after_load_state_dict(load_via):
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(groups_for(model, max_norm=1.0), lr=1.0))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(model, opt, 0)
    checkpoint = opt.state_dict()
    (opt if load_via == "wrapper" else opt.optimizer).load_state_dict(checkpoint)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    assert opt.param_groups[0]["max_norm"] == 1.0


def test_add_param_group_reaches_base_and_is_projected():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD([model[0].weight], lr=0.1), max_norm=1.0)
    opt.add_param_group({"params": [model[2].weight], "max_norm": 0.25})
    opt.optimizer.add_param_group({"params": [model[0].bias]})
    assert len(opt.optimizer.param_groups) == 3
    assert "max_norm" not in opt.optimizer.defaults  # the base's defaults are its own
    train_step(model, opt, 0)
    assert opt.param_groups[2]["max_norm"] == 1.0  # filled from the wrapper's defaults
    assert model[2].weight.norm(dim=1).max() <= 0.25


# -- 8. checkpoints -------------------------------------------------------------------------
def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only=True by default


def test_wrapper_checkpoint_loads_into_bare_base_and_back():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.Adam(groups_for(model, max_norm=0.9, norm_type=1.0)))
    for i in range(3):
        train_step(model, opt, i)
    ckpt = _roundtrip(opt.state_dict())
    bare = torch.optim.Adam(groups_for(make_model()))
    bare.load_state_dict(ckpt)  # the max-norm keys ride along as plain data
    assert bare.param_groups[0]["max_norm"] == 0.9
    # bare checkpoint -> wrapper: the constraint the groups had is kept
    bare_ckpt = _roundtrip(torch.optim.Adam(groups_for(make_model())).state_dict())
    opt.load_state_dict(bare_ckpt)
    assert opt.param_groups[0]["max_norm"] == 0.9
    assert opt.param_groups[0]["norm_type"] == 1.0
    assert opt.param_groups[1]["max_norm"] is None
    # ... and the same through the base directly
    opt.optimizer.load_state_dict(bare_ckpt)
    assert opt.param_groups[0]["max_norm"] == 0.9


def test_checkpoint_key_wins_over_current_group():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(groups_for(model, max_norm=0.9), lr=0.1))
    ckpt = opt.state_dict()
    ckpt["param_groups"][0]["max_norm"] = 0.3
    opt.load_state_dict(ckpt)
    assert opt.param_groups[0]["max_norm"] == 0.3
    train_step(model, opt, 0)
    assert model[0].weight.norm(dim=1).max() <= 0.3


def test_resume_from_checkpoint_continues_identically():
    m1 = make_model()
    o1 = MaxNormWrapper(torch.optim.Adam(groups_for(m1, max_norm=0.8), lr=0.05))
    for i in range(5):
        train_step(m1, o1, i)
    model_ckpt = _roundtrip(m1.state_dict())
    opt_ckpt = _roundtrip(o1.state_dict())
    m2 = make_model(seed=9)
    m2.load_state_dict(model_ckpt)
    o2 = MaxNormWrapper(torch.optim.Adam(groups_for(m2), lr=0.05))
    o2.load_state_dict(opt_ckpt)
    assert o2.param_groups[0]["max_norm"] == 0.8
    for i in range(5, 10):
        train_step(m1, o1, i)
        train_step(m2, o2, i)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


# -- 3. validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        ({"max_norm": 0.0}, ValueError, r"param group 0: max_norm must be positive.*0\.0"),
        ({"max_norm": -1}, ValueError, "max_norm must be positive"),
        ({"max_norm": float("nan")}, ValueError, "max_norm must not be NaN"),
        ({"max_norm": True}, TypeError, r"max_norm must be a real number.*True"),
        ({"max_norm": "3"}, TypeError, r"max_norm must be a real number.*'3'"),
        ({"max_norm": 1.0, "norm_type": 0.5}, ValueError, r"norm_type must be >= 1.*0\.5"),
        ({"max_norm": 1.0, "norm_type": float("nan")}, ValueError, "norm_type must not be NaN"),
        ({"max_norm": 1.0, "norm_dim": 2}, ValueError, r"shape \(16, 6\).*norm_dim=2 does not fit"),
        ({"max_norm": 1.0, "norm_dim": (0, 0)}, ValueError, r"norm_dim=\(0, 0\) repeats a dim"),
        ({"max_norm": 1.0, "norm_dim": "rows"}, ValueError, "norm_dim must be"),
        ({"max_norm": 1.0, "norm_dim": 1.5}, TypeError, "norm_dim must be"),
        ({"max_norm": 1.0, "min_norm": 2.0}, ValueError, "min_norm"),
        ({"max_norm": 1.0, "rate": 0.0}, ValueError, "rate"),
        ({"max_norm": 1.0, "error_if_nonfinite": 1}, TypeError, "error_if_nonfinite"),
    ],
)
def test_bad_group_options_fail_early_and_change_nothing(kw, exc, pattern):
    model = make_model()
    base = torch.optim.SGD([{"params": [model[0].weight], **kw}], lr=0.1)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    )
    with pytest.raises(exc, match=pattern):
        MaxNormWrapper(base)
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in base.param_groups
    ] == groups_before
    assert "max_norm" not in base.defaults
    MaxNormWrapper(torch.optim.SGD([model[2].weight], lr=0.1))  # base is still wrappable


def test_bad_defaults_and_bad_base():
    model = make_model()
    with pytest.raises(ValueError, match="MaxNormWrapper: max_norm must be positive"):
        MaxNormWrapper(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=-2)
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        MaxNormWrapper(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = MaxNormWrapper(base, max_norm=1.0)
    with pytest.raises(ValueError, match="already a MaxNormWrapper"):
        MaxNormWrapper(wrapped)
    with pytest.raises(ValueError, match="already wrapped"):
        MaxNormWrapper(base)


def test_bad_add_param_group_changes_nothing():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD([model[0].weight], lr=0.1), max_norm=1.0)
    with pytest.raises(ValueError, match=r"param group 1: .*shape \(4, 16\).*norm_dim=3"):
        opt.add_param_group({"params": [model[2].weight], "norm_dim": 3})
    assert len(opt.param_groups) == 1


def test_bad_load_state_dict_changes_nothing():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.Adam(groups_for(model, max_norm=1.0)))
    train_step(model, opt, 0)
    ckpt = opt.state_dict()
    ckpt["param_groups"][0]["max_norm"] = -5.0
    before = copy.deepcopy(opt.state_dict())
    weights = [p.clone() for p in model.parameters()]
    for target in (opt, opt.optimizer):
        with pytest.raises(ValueError, match=r"param group 0: max_norm must be positive.*-5\.0"):
            target.load_state_dict(ckpt)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for key, v in st.items():
            assert torch.equal(v, after["state"][k][key])
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_group_edited_on_base_directly_is_validated_before_the_step():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD([model[0].weight], lr=0.1), max_norm=1.0)
    opt.optimizer.add_param_group({"params": [model[2].weight], "norm_dim": 5})
    model(batch(0)[0]).sum().backward()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param group 1: .*norm_dim=5 does not fit"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- 9. hooks -------------------------------------------------------------------------------
def test_step_hooks_receive_wrapper_and_post_hook_sees_projected_weights():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(groups_for(model, max_norm=0.1), lr=1.0))
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o)))
    opt.register_step_post_hook(
        lambda o, a, k: seen.append(("post", o, model[0].weight.norm(dim=1).max().item()))
    )
    train_step(model, opt, 0)
    assert seen[0] == ("pre", opt)
    assert seen[1][:2] == ("post", opt) and seen[1][2] <= 0.1


def test_base_instance_hooks_still_run():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    base.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    base.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    opt = MaxNormWrapper(base, max_norm=1.0)
    train_step(model, opt, 0)
    assert calls == [("pre", base), ("post", base)]


def test_global_step_hooks_fire_once_per_step():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.Adam(model.parameters()), max_norm=1.0)
    calls = []
    h1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o).__name__)))
    h2 = register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o).__name__)))
    try:
        train_step(model, opt, 0)
        train_step(model, opt, 1)
    finally:
        h1.remove()
        h2.remove()
    # Once per step, from the wrapped optimizer's own step (which the wrapper calls).
    assert calls == [("pre", "Adam"), ("post", "Adam")] * 2


def test_state_dict_hooks_receive_wrapper():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append(("sd_pre", o)))

    def post(o, sd):
        seen.append(("sd_post", o))
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load_pre", o)))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load_post", o)))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert seen == [("sd_pre", opt), ("sd_post", opt), ("load_pre", opt), ("load_post", opt)]


def test_wrapper_has_every_attribute_of_a_fresh_optimizer():
    model = make_model()
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MaxNormWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1))
    opt.zero_grad()
    fresh.zero_grad()
    missing = [name for name in vars(fresh) if not hasattr(opt, name)]
    assert missing == []


# -- 10. GradScaler --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"foreach": True}, {"fused": True}])
def test_grad_scaler_steps_on_unscaled_grads_and_skips_inf(variant):
    m1, m2 = make_model(), make_model()
    bare = torch.optim.Adam(m1.parameters(), lr=0.05, **variant)
    opt = MaxNormWrapper(torch.optim.Adam(m2.parameters(), lr=0.05, **variant), max_norm=math.inf)
    s1 = torch.amp.GradScaler("cpu", init_scale=1024.0)
    s2 = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for i in range(4):
        for m, o, s in ((m1, bare, s1), (m2, opt, s2)):
            x, y = batch(i)
            o.zero_grad()
            s.scale((m(x) - y).pow(2).mean()).backward()
            s.step(o)
            s.update()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert not hasattr(opt.optimizer, "grad_scale") and not hasattr(opt, "found_inf")
    # A step with an inf gradient is skipped, weights untouched (even out-of-bound ones).
    opt2 = MaxNormWrapper(torch.optim.Adam(m2.parameters(), lr=0.05, **variant), max_norm=0.01)
    before = [p.clone() for p in m2.parameters()]
    opt2.zero_grad()
    s2.scale((m2(batch(0)[0]) * float("inf")).sum()).backward()
    s2.step(opt2)
    s2.update()
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))


# -- 11. copies ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_the_wrapper_work_and_project(how):
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(groups_for(model, max_norm=0.3), lr=0.5, momentum=0.9))
    train_step(model, opt, 0)
    pair = (model, opt)
    if how == "deepcopy":
        m2, o2 = copy.deepcopy(pair)
    elif how == "pickle":
        m2, o2 = pickle.loads(pickle.dumps(pair))
    else:
        buf = io.BytesIO()
        torch.save(pair, buf)
        buf.seek(0)
        m2, o2 = torch.load(buf, weights_only=False)
    assert o2.optimizer.param_groups[0]["params"][0] is m2[0].weight
    train_step(model, opt, 1)
    train_step(m2, o2, 1)
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert m2[0].weight.norm(dim=1).max() <= 0.3
    with pytest.raises(ValueError, match="already wrapped"):
        MaxNormWrapper(o2.optimizer)


def test_a_step_at_zero_lr_projects_unless_it_initialises_state():
    """A warm-up from lr = 0 projects from the first step on; the state-initialising
    step of torch.distributed.checkpoint (no state yet, lr = 0, zero gradients) leaves
    the weights as they are."""
    model = make_model()
    with torch.no_grad():
        model[0].weight.mul_(100)
    before = [p.clone() for p in model.parameters()]
    opt = MaxNormWrapper(torch.optim.Adam(groups_for(model, max_norm=0.5), lr=0.0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    train_step(model, opt, 0)  # lr = 0 and real gradients: projected
    assert model[0].weight.norm(dim=1).max() <= 0.5


def test_dcp_get_optimizer_state_dict_keeps_weights_and_max_norm_keys():
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = make_model()
    with torch.no_grad():
        model[0].weight.mul_(100)
    before = [p.clone() for p in model.parameters()]
    opt = MaxNormWrapper(torch.optim.Adam(groups_for(model, max_norm=0.5, norm_type=1.0)))
    osd = get_optimizer_state_dict(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert osd["param_groups"][0]["max_norm"] == 0.5
    assert osd["param_groups"][0]["norm_type"] == 1.0
    opt.param_groups[0]["max_norm"] = 2.0
    set_optimizer_state_dict(model, opt, osd)
    assert opt.param_groups[0]["max_norm"] == 0.5
    train_step(model, opt, 0)
    assert model[0].weight.norm(dim=1).max() <= 0.5


def test_max_norm_function_validates_before_touching_anything():
    good = torch.full((3, 4, 2), 5.0)
    bad = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"norm_dim=2 does not fit tensor 1 of shape \(4, 2\)"):
        max_norm_([good, bad], 1.0, norm_dim=2)
    assert torch.equal(good, torch.full((3, 4, 2), 5.0))
    with pytest.raises(TypeError, match="max_norm must be a real number, but got None"):
        max_norm_(good, None)
    with pytest.raises(TypeError, match="only dense tensors"):
        max_norm_(torch.eye(3).to_sparse(), 1.0)
    with pytest.raises(ValueError, match=r"max_norm_: max_norm must be positive"):
        max_norm_(good, 0.0)


def test_options_edited_in_a_group_are_validated_before_the_next_step():
    model = make_model()
    opt = MaxNormWrapper(torch.optim.SGD(groups_for(model, max_norm=1.0), lr=0.1))
    train_step(model, opt, 0)
    opt.param_groups[0]["max_norm"] = 0.25  # e.g. a schedule on c: takes effect
    train_step(model, opt, 1)
    assert model[0].weight.norm(dim=1).max() <= 0.25
    opt.param_groups[0]["max_norm"] = -1.0
    model(batch(2)[0]).sum().backward()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param group 0: max_norm must be positive.*-1\.0"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_one_liner_constrains_exactly_the_weight_matrices():
    """`MaxNormWrapper(Adam(model.parameters()), max_norm=3.0)` on a model with LayerNorm
    and biases: the weight matrices are projected per output unit; biases and the
    LayerNorm gain and bias step exactly as under bare Adam."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(40.0).add_(5.0)  # every tensor far over the bound, as rows or as a whole
    bare = copy.deepcopy(model)
    opt = MaxNormWrapper(torch.optim.Adam(model.parameters(), lr=1e-3), max_norm=3.0)
    ref = torch.optim.Adam(bare.parameters(), lr=1e-3)
    x = torch.randn(8, 20)
    for m, o in ((model, opt), (bare, ref)):
        m(x).square().sum().backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), bare.parameters()):
        if p.dim() >= 2:
            expected = reference_project(q.detach(), 3.0, 1)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=0)
            assert bool((p.detach().norm(dim=1) <= 3.0).all()), name
        else:
            assert torch.equal(p, q), name

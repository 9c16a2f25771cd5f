"""Compatibility matrix, optimizers: every ``torch.optim`` optimizer (cases from
PyTorch's own ``optim_db``, in its default, ``foreach`` and ``fused`` variants) and
every ``torch_optimizer`` optimizer, wrapped by ``MaxNormWrapper``.

For each row:

* ``unconstrained``: a wrapper without ``max_norm`` is bit-identical to the bare
  optimizer (weights and state, every step);
* ``constrained``: each step equals the bare step followed by the reference
  projection (scaled slices to rtol 1e-5, every other slice bitwise), the bound holds
  and the optimizer state is the bare one's;
* ``resume``: ``state_dict()`` saved and loaded with ``torch.load(weights_only=True)``
  into a fresh wrapper resumes bitwise, max-norm keys included.

Optimizers and optim_db entries are discovered when the tests are collected, so a new
torch (or torch_optimizer) adds rows.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    assert_projected,
    assert_state_equal,
    assert_within,
    clone_params,
    deep,
    drive,
    make_weight,
    per_param_state,
    roundtrip,
)
from reference import same_bits

try:  # PyTorch's own optimizer test database; its module imports expecttest
    from torch.testing._internal.common_optimizers import optim_db
except ModuleNotFoundError as err:  # pragma: no cover - a missing test dependency
    raise ModuleNotFoundError(
        f"{err}: the compatibility tests use torch's optim_db, which needs the "
        "'expecttest' package (part of the test extra)"
    ) from err

from maxnorm_optim import MaxNormWrapper

COMPAT_SECTION = "Optimizers"
COMPAT_ORDER = 1
COMPAT_COLUMNS = {
    "test_unconstrained_bit_identical": "unconstrained = bare",
    "test_constrained_matches_reference": "constrained = bare + projection",
    "test_state_dict_resume": "state_dict resume",
}

MAX_NORM = 1.0
STEPS = 3
ROW_NORMS = (0.5, 1.5, 0.8, 2.0)

torch.set_num_threads(1)


@dataclass
class Case:
    """One optimizer row: how to build it and the kwargs sets to run it with."""

    label: str
    factory: Callable[..., torch.optim.Optimizer]
    inputs: list[tuple[str, dict[str, Any]]]
    layout: str = "dense"  # dense | 2d | single | sparse
    closure: bool = False
    create_graph: bool = False
    bare_may_fail: bool = False  # third-party: skip (with the error) if the bare fails
    missing: str | None = None  # an optional package that is not installed
    notes: list[str] = field(default_factory=list)

    def build(self, kwargs: dict[str, Any], groups: list[dict[str, Any]]):
        return self.factory(groups, **deep(kwargs))


# -- parameter layouts -------------------------------------------------------------------
def _sparse_loss(params, step):
    (emb,) = params
    idx = torch.tensor([step % 6, (step + 3) % 6, (step + 3) % 6, (step + 4) % 6])
    g = torch.Generator().manual_seed(step)
    target = torch.randn(len(idx), emb.shape[1], generator=g) * 2.0
    out = F.embedding(idx, emb, sparse=True)
    return ((out - target) ** 2).sum()


def make_layout(layout: str) -> tuple[list[torch.nn.Parameter], list[bool], list[int]]:
    """(params, constrained flag per param, group index per param)."""
    w1 = make_weight(4, 3, ROW_NORMS, seed=1)
    w2 = make_weight(3, 4, ROW_NORMS[::-1], seed=2)
    if layout == "dense":  # a 2-d and a 3-d constrained weight, an unconstrained bias
        ts = [w1, w2.reshape(3, 2, 2), torch.linspace(-1.0, 1.0, 4)]
        return [torch.nn.Parameter(t) for t in ts], [True, True, False], [0, 0, 1]
    if layout == "2d":  # optimizers that only take matrices (Muon)
        ts = [w1, make_weight(3, 5, ROW_NORMS, seed=3)]
        return [torch.nn.Parameter(t) for t in ts], [True, False], [0, 1]
    if layout == "single":  # one param group (LBFGS)
        ts = [w1, w2.reshape(3, 2, 2), torch.linspace(-1.0, 1.0, 4) * 0.3]
        return [torch.nn.Parameter(t) for t in ts], [True, True, True], [0, 0, 0]
    if layout == "sparse":  # an Embedding(sparse=True) weight
        return [torch.nn.Parameter(make_weight(6, 3, ROW_NORMS, seed=4))], [True], [0]
    raise AssertionError(layout)


def groups_of(params, group_index, constrained) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for p, gi, c in zip(params, group_index, constrained):
        while len(groups) <= gi:
            groups.append({"params": []})
        groups[gi]["params"].append(p)
        if not c:
            groups[gi]["max_norm"] = None
    return groups


def step_kwargs(case: Case) -> dict[str, Any]:
    kw: dict[str, Any] = {"closure": case.closure, "create_graph": case.create_graph}
    if case.layout == "sparse":
        kw["loss_fn"] = _sparse_loss
    return kw


# -- discovery ---------------------------------------------------------------------------
def torch_optim_classes() -> list[type]:
    return sorted(
        (
            c
            for c in vars(torch.optim).values()
            if inspect.isclass(c)
            and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer
        ),
        key=lambda c: c.__name__,
    )


def _takes_1d(cls) -> bool:
    try:
        cls([torch.nn.Parameter(torch.zeros(3))])
    except ValueError:
        return False
    except Exception:
        return True
    return True


def torch_optim_cases() -> list[Case]:
    infos = {info.optim_cls: info for info in optim_db}
    cases = []
    for cls in torch_optim_classes():
        info = infos.get(cls)
        name = f"torch.optim.{cls.__name__}"
        if info is None:
            cases.append(
                Case(
                    f"{name}-default",
                    cls,
                    [("defaults", {})],
                    notes=["not in optim_db: defaults only"],
                )
            )
            continue
        # PyTorch's own cases; the flag-free ones are the "default" variant. Its helper
        # _get_optim_inputs_including_global_cliquey_kwargs leaves foreach out on CPU (no
        # fast kernels there), but torch runs foreach=True on CPU, so it is a row here.
        impls = [
            f
            for f in ("foreach", "fused")
            if f in info.supported_impls and (f != "fused" or "cpu" in info.supports_fused_on)
        ]
        by_variant: dict[str, list[tuple[str, dict[str, Any]]]] = {"default": []}
        for oi in info.optim_inputs_func(device="cpu"):
            by_variant["default"].append((oi.desc, dict(oi.kwargs)))
            for flag in impls:
                by_variant.setdefault(flag, []).append(
                    (f"{oi.desc} & {flag}", {**oi.kwargs, flag: True})
                )
        if info.only_supports_sparse_grads:
            layout = "sparse"
        elif info.step_requires_closure:
            layout = "single"
        elif not _takes_1d(cls):
            layout = "2d"
        else:
            layout = "dense"
        for variant, inputs in by_variant.items():
            cases.append(
                Case(
                    f"{name}-{variant}",
                    cls,
                    inputs,
                    layout=layout,
                    closure=info.step_requires_closure,
                )
            )
        if info.supports_sparse and not info.only_supports_sparse_grads:
            # The sparse-gradient path (Embedding(sparse=True)) of SGD and Adagrad.
            sparse_inputs = [
                (desc, kw)
                for desc, kw in by_variant["default"]
                if not kw.get("weight_decay") and not kw.get("momentum")
            ]
            cases.append(Case(f"{name}-sparse", cls, sparse_inputs, layout="sparse"))
    return cases


def torch_optimizer_cases() -> list[Case]:
    try:
        import torch_optimizer
    except ImportError:
        missing = "torch-optimizer (the torch-optimizer extra) is not installed"
        return [Case("torch_optimizer-all", torch.optim.SGD, [], missing=missing)]
    cases = []
    for name in sorted(torch_optimizer.__all__):
        cls = getattr(torch_optimizer, name)
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            continue
        label = f"torch_optimizer.{name}-default"
        if name == "Lookahead":
            # A wrapper itself: wrap Adam, with k=2 so the slow-weights update runs.
            def factory(groups, **kw):
                return torch_optimizer.Lookahead(torch.optim.Adam(groups, lr=1e-2), k=2, **kw)

            cases.append(
                Case(
                    label,
                    factory,
                    [("Adam(lr=1e-2), k=2", {})],
                    bare_may_fail=True,
                )
            )
            continue
        kwargs: dict[str, Any] = {}
        if "lr" in inspect.signature(cls.__init__).parameters:
            default = inspect.signature(cls.__init__).parameters["lr"].default
            if default is None:
                kwargs["lr"] = 1e-2
        cases.append(
            Case(
                label,
                cls,
                [("defaults", kwargs)],
                create_graph=name == "Adahessian",
                bare_may_fail=True,
            )
        )
    return cases


CASES = torch_optim_cases() + torch_optimizer_cases()
CASE_IDS = [c.label for c in CASES]


@functools.cache
def bare_failure(label: str) -> str | None:
    """For third-party optimizers: the error the *bare* optimizer raises, if any.

    An optimizer that cannot take the 3-d weight of the dense layout is moved to the
    matrices-only layout first.
    """
    case = next(c for c in CASES if c.label == label)
    error = None
    for layout in ("dense", "2d"):
        case.layout = layout
        error = None
        for desc, kwargs in case.inputs:
            params, constrained, gidx = make_layout(layout)
            try:
                opt = case.build(kwargs, groups_of(params, gidx, constrained))
                drive(opt, params, 0, **step_kwargs(case))
            except Exception as err:
                error = f"{desc}: {type(err).__name__}: {err}"
                break
        if error is None:
            return None
    return error


def prepare(case: Case, request: pytest.FixtureRequest) -> None:
    if case.missing:
        pytest.skip(case.missing)
    if case.bare_may_fail:
        err = bare_failure(case.label)
        if err is not None:
            pytest.skip(f"the bare optimizer fails under torch {torch.__version__}: {err}")


# -- the tests -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unconstrained_bit_identical(case: Case, request: pytest.FixtureRequest) -> None:
    prepare(case, request)
    request.node.user_properties.append(("compat_detail", f"{len(case.inputs)} cases"))
    assert case.inputs
    for desc, kwargs in case.inputs:
        pa, constrained, gidx = make_layout(case.layout)
        pb = clone_params(pa)
        bare = case.build(kwargs, groups_of(pa, gidx, constrained))
        wrapped = MaxNormWrapper(case.build(kwargs, groups_of(pb, gidx, constrained)))
        for step in range(STEPS):
            drive(bare, pa, step, **step_kwargs(case))
            drive(wrapped, pb, step, **step_kwargs(case))
            for i, (a, b) in enumerate(zip(pa, pb)):
                assert same_bits(a, b), f"{desc}: step {step}, param {i} differs"
        assert_state_equal(per_param_state(bare, pa), per_param_state(wrapped, pb), desc)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_constrained_matches_reference(case: Case, request: pytest.FixtureRequest) -> None:
    prepare(case, request)
    request.node.user_properties.append(("compat_detail", f"{len(case.inputs)} cases"))
    for desc, kwargs in case.inputs:
        pa, constrained, gidx = make_layout(case.layout)
        pb = clone_params(pa)
        bare = case.build(kwargs, groups_of(pa, gidx, constrained))
        wrapped = MaxNormWrapper(
            case.build(kwargs, groups_of(pb, gidx, constrained)), max_norm=MAX_NORM
        )
        scaled = 0
        for step in range(STEPS):
            drive(bare, pa, step, **step_kwargs(case))
            drive(wrapped, pb, step, **step_kwargs(case))
            with torch.no_grad():
                for i, (a, b, c) in enumerate(zip(pa, pb, constrained)):
                    if c:
                        scaled += assert_projected(b, a, MAX_NORM)
                        assert_within(b, MAX_NORM)
                    else:
                        assert same_bits(a, b), f"{desc}: unconstrained param {i} changed"
                    a.copy_(b)  # continue both from the projected weights
        assert scaled > 0, f"{desc}: the projection never scaled a slice"
        assert_state_equal(per_param_state(bare, pa), per_param_state(wrapped, pb), desc)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_resume(case: Case, request: pytest.FixtureRequest) -> None:
    prepare(case, request)
    request.node.user_properties.append(("compat_detail", f"{len(case.inputs)} cases"))
    for desc, kwargs in case.inputs:
        pa, constrained, gidx = make_layout(case.layout)
        first = MaxNormWrapper(
            case.build(kwargs, groups_of(pa, gidx, constrained)), max_norm=MAX_NORM
        )
        for step in range(2):
            drive(first, pa, step, **step_kwargs(case))
        saved = roundtrip(first.state_dict())
        for group, want in zip(saved["param_groups"], first.param_groups):
            assert group["max_norm"] == want["max_norm"] and group["norm_dim"] == "per_unit"

        pb = clone_params(pa)
        # A different default bound: the checkpoint's keys must win.
        resumed = MaxNormWrapper(case.build(kwargs, groups_of(pb, gidx, constrained)), max_norm=5.0)
        resumed.load_state_dict(saved)
        for got, want in zip(resumed.param_groups, first.param_groups):
            assert got["max_norm"] == want["max_norm"], desc
        for step in range(2, 4):
            drive(first, pa, step, **step_kwargs(case))
            drive(resumed, pb, step, **step_kwargs(case))
            for i, (a, b) in enumerate(zip(pa, pb)):
                assert same_bits(a, b), f"{desc}: step {step}, param {i} differs"
        for p, c in zip(pb, constrained):
            if c:
                assert_within(p, MAX_NORM)
        assert_state_equal(per_param_state(first, pa), per_param_state(resumed, pb), desc)


def test_every_torch_optim_class_has_rows() -> None:
    """Discovery sanity: each torch.optim optimizer is in the matrix, most via optim_db."""
    labels = {c.label.split("-")[0] for c in CASES}
    for cls in torch_optim_classes():
        assert f"torch.optim.{cls.__name__}" in labels
    assert {"torch.optim.Adam-fused", "torch.optim.SGD-foreach"} <= set(CASE_IDS)

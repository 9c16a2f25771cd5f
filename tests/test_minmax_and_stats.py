"""Min-max norm, unit norm, soft projection (rate) and constraint statistics."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from maxnorm_optim import MaxNormWrapper, max_norm_

from reference import reference_project, slice_norms


def _rows_with_norms(norms, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(len(norms), dim, generator=g)
    return w * (torch.tensor(norms).unsqueeze(1) / w.norm(dim=1, keepdim=True))


def test_min_max_norm_formula_and_exactness():
    w = _rows_with_norms([0.0, 0.1, 0.5, 0.8, 1.0, 2.0, 5.0])
    w[0] = 0
    before = w.clone()
    max_norm_(w, 1.0, min_norm=0.5, rate=1.0)
    n = w.norm(dim=1)
    assert torch.equal(w[0], torch.zeros(16))  # zero stays zero, never scaled up
    assert torch.equal(w[2:5], before[2:5])  # inside [0.5, 1]: bitwise unchanged
    torch.testing.assert_close(n[1], torch.tensor(0.5))
    assert bool((n[5:] <= 1.0).all())
    torch.testing.assert_close(w, reference_project(before, 1.0, min_norm=0.5), rtol=1e-5, atol=0)


def test_rate_is_keras_soft_projection():
    w = _rows_with_norms([0.1, 0.7, 3.0])
    before = w.clone()
    max_norm_(w, 1.0, min_norm=0.5, rate=0.25)
    n0 = before.norm(dim=1)
    target = 0.25 * n0.clamp(0.5, 1.0) + 0.75 * n0
    torch.testing.assert_close(w.norm(dim=1), target, rtol=1e-5, atol=0)
    assert torch.equal(w[1], before[1])
    torch.testing.assert_close(
        w, reference_project(before, 1.0, min_norm=0.5, rate=0.25), rtol=1e-5, atol=0
    )


def test_unit_norm():
    torch.manual_seed(0)
    w = torch.randn(200, 7) * torch.rand(200, 1) * 4
    w[3] = 0
    max_norm_(w, 1.0, min_norm=1.0)
    n = slice_norms(w).squeeze(1)
    nonzero = torch.ones(200, dtype=torch.bool)
    nonzero[3] = False
    torch.testing.assert_close(n[nonzero], torch.ones(199, dtype=torch.float64), rtol=1e-5, atol=0)
    assert n[3] == 0
    once = w.clone()
    max_norm_(w, 1.0, min_norm=1.0)
    assert torch.equal(w, once)  # projecting twice equals once


def test_min_max_validation():
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"min_norm must satisfy 0 <= min_norm <= max_norm"):
        max_norm_(w, 1.0, min_norm=1.5)
    with pytest.raises(ValueError, match="min_norm"):
        max_norm_(w, 1.0, min_norm=-0.1)
    with pytest.raises(ValueError, match=r"rate must satisfy 0 < rate <= 1, but got 1\.5"):
        max_norm_(w, 1.0, rate=1.5)
    with pytest.raises(ValueError, match="needs a max_norm"):
        MaxNormWrapper(torch.optim.SGD([nn.Parameter(w)], lr=0.1), min_norm=0.5)


# -- Keras ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras is loaded with another backend")
    return keras


@pytest.mark.parametrize(
    "make,ours",
    [
        (lambda k: k.constraints.MaxNorm(max_value=1.5, axis=0), {"max_norm": 1.5}),
        (
            lambda k: k.constraints.MinMaxNorm(min_value=0.5, max_value=1.5, rate=1.0, axis=0),
            {"max_norm": 1.5, "min_norm": 0.5},
        ),
        (
            lambda k: k.constraints.MinMaxNorm(min_value=0.5, max_value=1.5, rate=0.3, axis=0),
            {"max_norm": 1.5, "min_norm": 0.5, "rate": 0.3},
        ),
        (lambda k: k.constraints.UnitNorm(axis=0), {"max_norm": 1.0, "min_norm": 1.0}),
    ],
)
def test_matches_keras_constraints(keras, make, ours):
    """Keras kernels are (in, out) with axis=0: our (out, in) weight with per-unit norms."""
    torch.manual_seed(5)
    kernel = torch.randn(24, 300) * torch.linspace(0.01, 0.7, 300)  # norms ~0.05 .. 3.4
    expected = make(keras)(kernel.clone())
    w = kernel.T.contiguous()
    before = w.clone()
    max_norm_(w, **ours)
    n = before.norm(dim=1, keepdim=True)
    lo, hi = ours.get("min_norm", 0.0), ours["max_norm"]
    outside = ((n > hi) | (n < lo)).squeeze(1)
    inside = ~outside
    # Scaled slices agree once Keras' division by (norm + 1e-7) instead of norm is undone.
    keras_undone = expected.T * ((n + 1e-7) / n)
    torch.testing.assert_close(w[outside], keras_undone[outside], rtol=1e-5, atol=1e-8)
    # Documented difference: Keras also shrinks in-bound slices by norm / (norm + 1e-7).
    assert torch.equal(w[inside], before[inside])
    torch.testing.assert_close(
        expected.T[inside], before[inside] * (n / (n + 1e-7))[inside], rtol=1e-5, atol=0
    )
    assert outside.any()
    assert inside.any() == (lo < hi)  # unit norm: every nonzero slice is rescaled


# -- constraint_stats ----------------------------------------------------------------------
def test_constraint_stats_report_the_last_step():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = MaxNormWrapper(
        torch.optim.SGD(
            [
                {"params": [model[0].weight, model[2].weight], "max_norm": 0.58},
                {"params": [model[0].bias, model[2].bias]},
            ],
            lr=0.01,
        ),
        track_stats=True,
    )
    assert opt.constraint_stats() == [None, None]
    x = torch.randn(64, 8)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    # What the projection will see: the weights right after the bare SGD update.
    after_sgd = [(p - 0.01 * p.grad).detach() for p in (model[0].weight, model[2].weight)]
    opt.step()
    stats, none = opt.constraint_stats()
    assert none is None
    norms = torch.cat([w.norm(dim=1) for w in after_sgd])
    assert all(isinstance(v, torch.Tensor) and v.device == x.device for v in stats.values())
    assert stats["slices"].item() == 35
    assert stats["projected"].item() == int((norms > 0.58).sum())
    assert 0 < stats["projected"].item() < 35
    torch.testing.assert_close(stats["max_norm_before"], norms.max())
    torch.testing.assert_close(stats["share_projected"], (norms > 0.58).float().mean())


def test_constraint_stats_needs_track_stats():
    opt = MaxNormWrapper(torch.optim.SGD([nn.Parameter(torch.ones(2, 2))], lr=1.0), max_norm=1.0)
    with pytest.raises(RuntimeError, match="track_stats=True"):
        opt.constraint_stats()


def test_stats_do_not_change_the_result():
    torch.manual_seed(2)
    m1 = nn.Linear(10, 20)
    m2 = nn.Linear(10, 20)
    m2.load_state_dict(m1.state_dict())
    o1 = MaxNormWrapper(torch.optim.Adam(m1.parameters(), lr=0.1), max_norm=0.5)
    o2 = MaxNormWrapper(torch.optim.Adam(m2.parameters(), lr=0.1), max_norm=0.5, track_stats=True)
    for _ in range(5):
        x = torch.randn(16, 10)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    assert torch.equal(m1.weight, m2.weight)
    assert math.isfinite(o2.constraint_stats()[0]["max_norm_before"].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 100), (600, 4096)])
def test_stats_report_the_norms_before_the_projection(dtype, shape):
    """`max_norm_before` is the largest slice norm before scaling, whichever route the
    rows take (many or few over, float32 or float64)."""
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.01).to(dtype))
    with torch.no_grad():
        w[::3] *= 1000.0  # a third of the rows over the bound
        w[1] = 0.0
    before = torch.linalg.vector_norm(w.detach(), dim=1)
    opt = MaxNormWrapper(torch.optim.SGD([w], lr=0.0), max_norm=1.0, track_stats=True)
    opt.project()
    (stats,) = opt.constraint_stats()
    assert stats is not None
    assert int(stats["projected"]) == int((before > 1.0).sum())
    torch.testing.assert_close(
        stats["max_norm_before"].double(), before.max().double(), rtol=1e-6, atol=0
    )

"""Properties of the projection (issue 2, point 16), checked with hypothesis."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxnorm_optim import max_norm_

from reference import bound, reference_dims, reference_project, slice_norms

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
NORM_TYPES = [1.0, 1.5, 2.0, 3.0, math.inf]


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    choice = draw(st.sampled_from(["per_unit", "none", "dims"]))
    if choice == "per_unit" or ndim == 0:
        norm_dim = "per_unit" if choice != "none" else None
    elif choice == "none":
        norm_dim = None
    else:
        dims = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        negate = draw(st.booleans())
        norm_dim = tuple(d - ndim if negate else d for d in dims)
        if len(norm_dim) == 1 and draw(st.booleans()):
            norm_dim = norm_dim[0]
    dtype = draw(st.sampled_from(DTYPES))
    p = draw(st.sampled_from(NORM_TYPES))
    c = draw(st.floats(0.05, 20.0))
    scale = draw(st.floats(0.01, 30.0))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if dtype.is_complex:
        w = torch.complex(
            torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale
        )
    # Some slices exactly zero, some far inside the bound.
    if ndim and draw(st.booleans()):
        w[0] = 0
    return w, c, norm_dim, p


def _rel_inside(dtype):
    # Slices whose float64 norm is this far inside the bound are inside for the kernel too.
    return (
        1
        - 64 * (torch.finfo(torch.float32).eps if dtype != torch.float64 else 1e-15)
        - (0.01 if dtype in (torch.float16, torch.bfloat16) else 0)
    )


SETTINGS = settings(
    max_examples=int(os.environ.get("MAXNORM_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(cases())
def test_bound_holds_inbound_unchanged_direction_kept(case):
    w, c, norm_dim, p = case
    before = w.clone()
    n_before = slice_norms(before, norm_dim, p)
    max_norm_(w, c, norm_dim, p)
    n_after = slice_norms(w, norm_dim, p)
    # 1. Every slice is within the bound (recomputed in float64).
    assert bool((n_after <= bound(c, w.dtype)).all()), (n_after.max().item(), c)
    # 2. Slices inside the bound are bitwise unchanged.
    inside = (n_before <= c * _rel_inside(w.dtype)).expand_as(w)
    assert torch.equal(w[inside], before[inside])
    # 3. Direction kept: the result is a non-negative multiple of the original slice.
    wide = torch.complex128 if w.is_complex() else torch.float64
    ratio = (n_after / n_before.clamp(min=1e-300)).to(wide)
    expected = before.to(wide) * ratio
    tol = 2e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
    torch.testing.assert_close(w.to(wide), expected, rtol=tol, atol=tol * c)
    assert bool((n_after <= n_before * (1 + 1e-12)).all())


@SETTINGS
@given(cases())
def test_projecting_twice_equals_once(case):
    w, c, norm_dim, p = case
    max_norm_(w, c, norm_dim, p)
    once = w.clone()
    max_norm_(w, c, norm_dim, p)
    assert torch.equal(w, once)


@SETTINGS
@given(cases())
def test_matches_reference(case):
    w, c, norm_dim, p = case
    expected = reference_project(w, c, norm_dim, p)
    n_before = slice_norms(w, norm_dim, p)
    before = w.clone()
    max_norm_(w, c, norm_dim, p)
    low = w.dtype in (torch.float16, torch.bfloat16)
    tol = 1e-2 if low else 1e-6
    clearly_out = (n_before > c * (1 + 1e-4)).expand_as(w)
    torch.testing.assert_close(w[clearly_out], expected[clearly_out], rtol=tol, atol=tol * c)
    clearly_in = (n_before <= c * _rel_inside(w.dtype)).expand_as(w)
    assert torch.equal(w[clearly_in], before[clearly_in])


@SETTINGS
@given(cases())
def test_user_check_in_same_dtype_passes(case):
    """Issue 4.6: the bound holds as users check it, `w.norm(dim) <= c` in fp32/fp64."""
    w, c, norm_dim, p = case
    if w.dtype not in (torch.float32, torch.float64):
        return
    max_norm_(w, c, norm_dim, p)
    dims = reference_dims(norm_dim, w.dim())
    assert bool((torch.linalg.vector_norm(w, p, dim=dims) <= c).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recomputed_norm_never_above_bound_many_rows(dtype):
    """Without the safety margin 15-30% of scaled rows come out 1 ulp above c."""
    g = torch.Generator().manual_seed(0)
    for rowlen in (3, 64, 1000):
        w = torch.randn(2000, rowlen, generator=g, dtype=dtype) * 5
        max_norm_(w, 3.0)
        assert bool((w.norm(dim=1) <= 3.0).all())
        assert bool((w.norm(dim=1) >= 3.0 * (1 - 1e-6)).any())


@pytest.mark.parametrize("norm_dim", ["per_unit", None, -1])
def test_many_tensors_batched_match_reference(norm_dim):
    """Small tensors share one norm computation; results are per tensor as if alone."""
    g = torch.Generator().manual_seed(7)
    shapes = [(64, 64)] * 90 + [(32, 3, 3, 3)] * 20 + [(5, 7), (1, 7), (300, 7)] * 5 + [(9,)] * 4
    tensors = []
    for k, shape in enumerate(shapes):
        w = torch.randn(shape, generator=g)
        scale = 0.01 if k % 3 == 0 else 1.0  # a third of the tensors entirely in bound
        tensors.append(w * scale)
    before = [t.clone() for t in tensors]
    max_norm_(tensors, 2.5, norm_dim)
    for t, b in zip(tensors, before):
        expected = reference_project(b, 2.5, norm_dim)
        n = slice_norms(b, norm_dim)
        inside = (n <= 2.5 * (1 - 1e-5)).expand_as(b)
        assert torch.equal(t[inside], b[inside])
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)
        assert bool(
            (torch.linalg.vector_norm(t, dim=reference_dims(norm_dim, t.dim())) <= 2.5).all()
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("share", [0.01, 0.5, 0.95])
def test_large_tensor_writes_only_rows_over_the_bound(dtype, share):
    """Large tensors take the partial-write path on CPU (index_reduce_ / index_copy_)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(2048, 64, generator=g, dtype=torch.float64)
    norms = torch.where(torch.rand(2048, 1, generator=g) < share, 3.0, 0.5)
    w = (w * norms / w.norm(dim=1, keepdim=True)).to(dtype)
    before = w.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no beta warning of index_reduce_ leaks out
        max_norm_(w, 1.0)
    inside = (norms <= 1.0).expand_as(w)
    assert torch.equal(w[inside], before[inside])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(w, reference_project(before, 1.0), rtol=tol, atol=tol)
    assert bool((slice_norms(w) <= bound(1.0, dtype)).all())

"""The guarantees of the projection, as properties over dtypes, p, slice lengths,
magnitudes and layouts, on every path (CPU eager and the sync-free kernels of
accelerators, run here on CPU; the compiled path in test_compat_compile.py).

1. in-bound, zero and NaN/inf slices are bitwise unchanged (-0.0 and NaN payloads too);
2. every scaled finite slice passes the user's check (same dtype, fp32 for fp16/bf16)
   and the float64 one;
3. finite slices whose norm overflows are projected;
4. with min_norm > 0 nothing becomes non-finite and tiny slices are scaled up;
5. unit norm lands in [max_norm (1 - max(1e-5, 2 eps)), max_norm], stably;
6. projecting twice equals projecting once;
7. a tensor given twice is projected once;
8. error_if_nonfinite is all-or-nothing;
9. every check runs before anything is written.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from maxnorm_optim import MaxNormWrapper, max_norm_
from maxnorm_optim._plans import forced_strategy

from reference import (
    SKIP,
    bits,
    check_norms,
    eps,
    landing_gap,
    power_fits,
    reference_dims,
    reference_project,
    robust_norms,
    same_bits,
    slice_length,
    slice_norms,
    wide,
)

PATHS = ["cpu", "sync_free"]
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
]
NORM_TYPES = [1.0, 1.5, 2.0, 3.0, 4.0, 10.0, 50.0, math.inf]
HALF = (torch.float16, torch.bfloat16)

SETTINGS = settings(
    max_examples=int(os.environ.get("MAXNORM_HYPOTHESIS_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def project(path: str, tensors, *args, **kwargs) -> None:
    with forced_strategy(path):
        max_norm_(tensors, *args, **kwargs)


def _range(dtype: torch.dtype) -> tuple[float, float]:
    """log10 range of element magnitudes and bounds for `dtype` (fp16: 1e-3 .. 6e4)."""
    return (-3.0, 4.6) if dtype == torch.float16 else (-30.0, 30.0)


@st.composite
def cases(draw, min_norm: bool = False):
    """A tensor, a bound, a norm_dim and p: slices with norms spread around the bound,
    in any layout, with zero, NaN (random payload), inf and -0.0 entries mixed in."""
    dtype = draw(st.sampled_from(DTYPES))
    p = draw(st.sampled_from(NORM_TYPES))
    lo, hi = _range(dtype)
    log_c = draw(st.floats(lo + 1, hi - 1))
    c = 10.0**log_c
    layout = draw(st.sampled_from(["rows", "rows3d", "dim0", "middle", "whole", "transposed"]))
    rows = draw(st.integers(1, 12))
    length = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 64, 100, 257, 1000]))
    if layout == "rows":
        shape, norm_dim = (rows, length), "per_unit"
    elif layout == "rows3d":
        shape, norm_dim = (rows, 3, max(1, length // 3)), "per_unit"
    elif layout == "dim0":
        shape, norm_dim = (length, rows), 0
    elif layout == "middle":
        shape, norm_dim = (rows, max(1, length // 4), 4), (0, -1)
    elif layout == "whole":
        shape, norm_dim = (draw(st.integers(1, 4)), length), None
    else:
        shape, norm_dim = (length, rows), "per_unit"  # transposed below
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(shape, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        x = torch.complex(real, torch.randn(shape, generator=g, dtype=torch.float64))
    else:
        x = real
    if draw(st.booleans()):
        x = x.sgn()  # equal magnitudes: the worst case for sums
    # Each slice gets a norm of c * 10^u, u in [-1.5, 1.5] (tiny ones when min_norm).
    dims = reference_dims(norm_dim, len(shape))
    n = torch.linalg.vector_norm(x, p, dim=dims, keepdim=True)
    spread = torch.rand(n.shape, generator=g, dtype=torch.float64) * 3 - 1.5
    if min_norm:
        spread = spread - 4 * torch.rand(n.shape, generator=g, dtype=torch.float64)
    x = x / n.clamp(min=1e-300) * c * 10.0**spread
    top = 10.0 ** (hi + 0.5)
    bottom = 10.0 ** (lo - 0.5)
    mag = x.abs().clamp(min=bottom, max=top)
    x = torch.where(x.abs() > 0, x / x.abs().clamp(min=1e-300) * mag, x)
    w = x.to(dtype)
    if layout == "transposed":
        w = w.t()  # a non-contiguous (rows, length) view
    specials = draw(st.sets(st.sampled_from(["zero", "nan", "inf", "negzero"]), max_size=3))
    if w.dim() >= 1 and w.shape[0] > 1:
        flat = w.select(0, 0) if norm_dim == "per_unit" else None
        if flat is not None and "zero" in specials:
            flat.zero_()
        if flat is not None and "negzero" in specials:
            flat.copy_(-flat.abs() * 0)
        if flat is not None and "nan" in specials and flat.numel() and not dtype.is_complex:
            flat.reshape(-1)[:1].copy_(_nan_with_payload(dtype, draw(st.integers(1, 2**10))))
        if "inf" in specials and w.shape[0] > 2 and norm_dim == "per_unit":
            w.select(0, w.shape[0] - 1).reshape(-1)[:1].fill_(math.inf)
    return w, c, norm_dim, p


def _nan_with_payload(dtype: torch.dtype, payload: int) -> torch.Tensor:
    """A NaN of `dtype` with low payload bits `payload` (quiet bit set)."""
    int_dtype, quiet = {
        torch.float32: (torch.int32, 0x7FC00000),
        torch.float64: (torch.int64, 0x7FF8000000000000),
        torch.float16: (torch.int16, 0x7E00),
        torch.bfloat16: (torch.int16, 0x7FC0),
    }[dtype]
    limit = {torch.float16: 0x1FF, torch.bfloat16: 0x3F}.get(dtype, 0xFFFFF)
    return torch.tensor(quiet | (payload & limit), dtype=torch.int64).to(int_dtype).view(dtype)


def rounding_bound(length: int, p: float, w: torch.Tensor, c: float) -> float:
    """A bound on the relative rounding error of `vector_norm` over `length` elements of
    norm about `c`, in any order (Higham, ch. 4: a sum of n terms errs by at most
    (n - 1) u of their total; p other than 1, 2, inf evaluates exp(p log|x|), whose
    error grows with |p log|x||)."""
    u = eps(torch.float32 if w.dtype in HALF else w.dtype) / 2
    n = 2 * length if w.is_complex() else length
    if p == math.inf:
        return 4 * u
    if p in (1.0, 2.0):
        return 1.02 * (n + 4) * u / p + 2 * u
    logs = abs(math.log(c))
    return 1.02 * ((n + 4 + p * (logs + math.log(n) / p + 1) + 2) / p + 5 + logs) * u


def _mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.expand(like.shape)


def assert_bound(after: torch.Tensor, changed, c: float, norm_dim, p: float) -> None:
    """Point 2: the user's check in the tensor's dtype and the float64 check, on every
    scaled finite slice (where c^p overflows a check's dtype, the rescaled float64 norm
    judges instead)."""
    acc = torch.float32 if after.dtype in HALF else after.real.dtype
    length = slice_length(after, norm_dim)
    robust = robust_norms(after, norm_dim, p)
    assert bool((robust[changed] <= c).all()), "a scaled slice is out of bound in float64"
    if power_fits(c, p, acc, length):
        same = check_norms(after, norm_dim, p).to(torch.float64)
        assert bool((same[changed] <= c).all()), (
            f"a scaled slice fails the {after.dtype} check: {same[changed].max().item()} > {c}"
        )
    double = after.dtype in (torch.float64, torch.complex128)
    if power_fits(c, p, torch.float64, length) and not double:
        plain = slice_norms(after, norm_dim, p)
        assert bool((plain[changed] <= c).all()), "a scaled slice fails the float64 check"


def _slice_changed(before: torch.Tensor, after: torch.Tensor, norm_dim) -> torch.Tensor:
    """Per slice (keepdim), whether any bit of it changed."""
    a, b = bits(before), bits(after)
    changed = (a != b).any(dim=-1) if before.is_complex() else a != b
    dims = reference_dims(norm_dim, before.dim())
    if dims == SKIP:
        return changed.any().reshape([1] * before.dim())
    return changed.amax(dim=dims, keepdim=True) if before.dim() else changed


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(case=cases())
# fp16, one element, p = 50: the check norm is finite, the fp16 rounding of the scaled
# value lands above c (found by a long hypothesis run).
@example(case=(torch.tensor([[192.75]], dtype=torch.float16), 1000**0.5, "per_unit", 50.0))
def test_inbound_slices_unchanged_and_scaled_slices_in_bound(path, case):
    """Points 1 and 2, and the direction of every scaled slice."""
    w, c, norm_dim, p = case
    w = w.clone()  # an explicit example is shared by the parametrized paths
    before = w.clone()
    check = check_norms(before, norm_dim, p).to(torch.float64)
    robust = robust_norms(before, norm_dim, p)
    finite = torch.isfinite(robust)
    project(path, w, c, norm_dim, p)
    changed = _slice_changed(before, w, norm_dim)
    # 1. in bound by both measures, zero, or holding NaN/inf: not a bit changed
    untouched = (check <= c) & (robust <= c) | ~finite | (robust == 0)
    assert not bool((changed & untouched).any()), "an in-bound, zero or NaN/inf slice changed"
    # over by both measures: scaled, and in bound now
    over = (robust > c) & ((check > c) | ~torch.isfinite(check)) & finite
    assert bool(changed[over].all()), "a slice over the bound was left alone"
    assert_bound(w, changed & finite, c, norm_dim, p)
    # direction: a positive multiple of the slice, close to the bound
    if bool(changed.any()):
        ratio = robust_norms(w, norm_dim, p) / robust.clamp(min=1e-300)
        expected = wide(before) * ratio
        tol = 4 * eps(w.dtype) if w.dtype in HALF else 1e-5
        mask = _mask(changed, w)
        torch.testing.assert_close(
            wide(w)[mask], expected[mask], rtol=tol, atol=tol * 10.0 ** _range(w.dtype)[0]
        )
        low = robust_norms(w, norm_dim, p)[changed] / c
        assert bool((low >= 1 - 2e-3 - 4 * eps(w.dtype)).all()), low.min()


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(case=cases())
# c^p within a factor 4 of the fp32 maximum: the check cannot judge at the bound, and
# the unit-norm slice it reads just over c is decided by its float64 norm (found by a
# long hypothesis run).
@example(
    case=(
        torch.tensor([[4.237920567296e12, -8.06963970048e11]]),
        5623413251903.491,
        "per_unit",
        3.0,
    )
)
def test_projecting_twice_equals_once(path, case):
    """Point 6, with rate = 1 and each option set (min_norm below and at max_norm)."""
    w, c, norm_dim, p = case
    for kw in ({}, {"min_norm": c / 3}, {"min_norm": c}):
        x = w.clone()
        project(path, x, c, norm_dim, p, **kw)
        once = x.clone()
        project(path, x, c, norm_dim, p, **kw)
        assert same_bits(x, once), kw


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(case=cases(min_norm=True))
def test_min_norm_scales_tiny_slices_up_and_nothing_becomes_nonfinite(path, case):
    """Point 4: every nonzero finite slice below min_norm, however tiny, ends in
    [min_norm (1 - 1e-5), max_norm] (float64); no slice becomes non-finite."""
    w, c, norm_dim, p = case
    lo = c / 2
    before = w.clone()
    robust = robust_norms(before, norm_dim, p)
    project(path, w, c, norm_dim, p, min_norm=lo)
    finite_before = _mask(torch.isfinite(robust), w)
    assert bool(torch.isfinite(w[finite_before]).all()), "a finite slice became non-finite"
    after = robust_norms(w, norm_dim, p)
    below = torch.isfinite(robust) & (robust > 0) & (robust < lo)
    tol = 1e-5 if w.dtype not in HALF else 4 * eps(w.dtype)
    assert bool((after[below] >= lo * (1 - tol)).all()), (after[below] / lo).min()
    assert bool((after[below] <= c).all())


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(case=cases())
# Equal magnitudes, p = 1: the fp32 check rounds unevenly from one scale to the next.
@example(
    case=(
        (torch.randint(0, 2, (1, 3, 333), generator=torch.Generator().manual_seed(0)) * 2 - 1)
        * 645.7134,
        22072.871764407646,
        "per_unit",
        1.0,
    )
)
def test_unit_norm_lands_in_the_band_and_stays(path, case):
    """Point 5: min_norm == max_norm: every nonzero finite slice ends with a same-dtype
    norm in [max_norm (1 - band), max_norm], band = max(1e-5, 2 eps, twice the check's
    own rounding bound on the slice), and a second projection changes nothing."""
    w, c, norm_dim, p = case
    w = w.clone()  # an explicit example is shared by the parametrized paths
    acc = torch.float32 if w.dtype in HALF else w.real.dtype
    if not power_fits(c, p, acc, slice_length(w, norm_dim)):
        return  # the same-dtype norm cannot judge at this c (point 2's exception)
    robust = robust_norms(w, norm_dim, p)
    project(path, w, c, norm_dim, p, min_norm=c)
    once = w.clone()
    same = check_norms(w, norm_dim, p).to(torch.float64)
    live = torch.isfinite(robust) & (robust > 0)
    band = max(1e-5, 2 * eps(w.dtype), 2 * rounding_bound(slice_length(w, norm_dim), p, w, c))
    assert bool((same[live] <= c).all())
    assert bool((same[live] >= c * (1 - band)).all()), (same[live] / c).min()
    project(path, w, c, norm_dim, p, min_norm=c)
    assert same_bits(w, once)


def test_same_tensor_twice_is_projected_once():
    """Point 7, also through a wrapper group listing a tied weight twice."""
    w = torch.full((4, 9), 3.0)
    max_norm_([w, w, w.view(4, 9)], 1.0)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(4), rtol=1e-5, atol=0)
    p = torch.nn.Parameter(torch.full((4, 9), 3.0))
    p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        base = torch.optim.SGD([{"params": [p, p]}], lr=0.0)
    opt = MaxNormWrapper(base, max_norm=1.0)
    opt.step()
    torch.testing.assert_close(p.detach().norm(dim=1), torch.ones(4), rtol=1e-5, atol=0)


def test_overlapping_views_are_refused_before_any_write():
    w = torch.full((4, 9), 3.0)
    before = w.clone()
    with pytest.raises(ValueError, match="overlap"):
        max_norm_([w, w[1:3]], 1.0)
    assert torch.equal(w, before)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "dtype,p,value",
    [
        (torch.float32, 2.0, 1e20),  # squares overflow fp32
        (torch.float32, 50.0, 3.0),
        (torch.float32, 100.0, 2.5),
        (torch.bfloat16, 2.0, 1e25),
        (torch.float64, 2.0, 1e200),
        (torch.float64, 10.0, 1e40),
        (torch.complex64, 2.0, 1e20),
    ],
)
def test_finite_slices_whose_norm_overflows_are_projected(path, dtype, p, value):
    """Point 3; error_if_nonfinite does not take them for NaN/inf."""
    w = torch.full((3, 17), value, dtype=dtype)
    w[1] = value * 1e-30 if dtype != torch.float32 or p == 2 else 0.1
    before = w.clone()
    c = 1.0
    project(path, w, c, "per_unit", p, error_if_nonfinite=True)
    changed = _slice_changed(before, w, "per_unit")
    assert bool(changed[0].all()) and bool(changed[2].all())
    assert_bound(w, changed, c, "per_unit", p)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tiny_and_subnormal_slices_are_scaled_up(path, p, dtype):
    """Point 4 at the edge: a slice holding one subnormal, and one of elements ~1e-25."""
    info = torch.finfo(dtype)
    w = torch.zeros(3, 8, dtype=dtype)
    w[0, 0] = info.tiny * info.eps * 4  # a subnormal
    w[1] = 1e-25 if dtype not in (torch.float16,) else 1e-6
    w[2, 3] = -0.0
    before = w.clone()
    project(path, w, 1.0, "per_unit", p, min_norm=0.5)
    assert bool(torch.isfinite(w).all())
    after = robust_norms(w, "per_unit", p).flatten()
    tol = 1e-5 if dtype not in HALF else 4 * eps(dtype)
    assert bool((after[:2] >= 0.5 * (1 - tol)).all()) and bool((after[:2] <= 1.0).all()), after
    assert same_bits(w[2], before[2])  # a zero slice (with -0.0) stays as it is


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "dtype,c", [(torch.float16, 1e-3), (torch.bfloat16, 1e-30), (torch.float32, 1e-30)]
)
def test_small_bounds_in_low_precision(path, dtype, c):
    g = torch.Generator().manual_seed(0)
    scale = 1e-2 if dtype == torch.float16 else c * 100
    w = (torch.randn(40, 300, generator=g, dtype=torch.float64) * scale).to(dtype)
    before = w.clone()
    project(path, w, c)
    changed = _slice_changed(before, w, "per_unit")
    assert bool(changed.any())
    assert_bound(w, changed, c, "per_unit", 2.0)


LONG = [1, 3, 64, 1000, 4096, 65536, 1 << 20]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf])
def test_long_slices_pass_both_checks(path, dtype, p):
    """Point 2 over slice lengths 1 .. 2^20 (fp16/bf16 up to 2^16), random and equal
    elements (the worst case for a rounded sum), rows and whole-tensor norms."""
    g = torch.Generator().manual_seed(NORM_TYPES.index(p) * 10 + DTYPES.index(dtype))
    for length in LONG:
        if dtype in HALF and length > 1 << 16:
            continue
        if dtype.is_complex and length > 1 << 16 and p != 2.0:
            continue
        rows = max(1, min(8, (1 << 21) // length))
        for equal in (False, True):
            x = torch.randn(rows, length, generator=g, dtype=torch.float64)
            if equal:
                x = torch.ones_like(x)
            if dtype.is_complex:
                x = torch.complex(x, torch.randn(rows, length, generator=g, dtype=torch.float64))
            n = torch.linalg.vector_norm(x, p, dim=1, keepdim=True)
            c = 3.0
            x = x / n * c * (1 + torch.rand(rows, 1, generator=g, dtype=torch.float64))
            for norm_dim in ("per_unit", None):
                w = x.to(dtype, copy=True)
                before = w.clone()
                project(path, w, c, norm_dim, p)
                changed = _slice_changed(before, w, norm_dim)
                assert bool(changed.any()), (length, equal, norm_dim)
                assert_bound(w, changed, c, norm_dim, p)


def test_whole_weight_norm_holds_every_time():
    """norm_dim=None on a 1024 x 1024 fp32 weight, ten draws."""
    g = torch.Generator().manual_seed(3)
    for i in range(10):
        w = torch.randn(1024, 1024, generator=g) * 3
        c = 100.0 + i
        max_norm_(w, c, None)
        assert w.norm() <= c and torch.linalg.vector_norm(w.double()) <= c


@pytest.mark.parametrize("path", PATHS)
def test_bits_of_untouched_slices_survive_scaling_of_others(path):
    """Point 1 for every dtype: complex inf and -0.0, fp16/bf16/fp32/fp64 NaN payloads and
    -0.0 survive while other slices of the same tensor are scaled."""
    for dtype in DTYPES:
        w = torch.ones(4, 5, dtype=dtype) * 10  # rows 0, 3: scaled
        w[1] = 0.1
        w[1, 2] = -0.0
        if dtype.is_complex:
            w[2, 0] = complex(math.inf, 0.0)
            w[2, 1] = complex(-0.0, -0.0)
        else:
            w[2, 0] = _nan_with_payload(dtype, 5)
            w[2, 1] = -0.0
        before = w.clone()
        project(path, w, 1.0)
        assert same_bits(w[1:3], before[1:3]), dtype
        assert not same_bits(w[0], before[0])


@pytest.mark.parametrize("path", PATHS)
def test_matches_the_float64_reference(path):
    """Fast paths (batched small tensors, rows, generic layouts) agree with the float64
    reference: slices it leaves alone bitwise, scaled ones up to the aim under the bound
    (`landing_gap`) and the rounding of the scaled values."""
    g = torch.Generator().manual_seed(7)
    shapes = [(64, 64)] * 40 + [(32, 3, 3, 3)] * 10 + [(5, 7), (1, 7), (300, 7), (9,), ()]
    shapes += [(3000, 40)]
    for norm_dim in ("per_unit", None, -1, 0):
        scale = [0.01 if k % 3 else 1.0 for k in range(len(shapes))]
        tensors = [torch.randn(s, generator=g) * f for s, f in zip(shapes, scale)]
        before = [t.clone() for t in tensors]
        project(path, tensors, 2.5, norm_dim)
        for t, b in zip(tensors, before):
            expected = reference_project(b, 2.5, norm_dim)
            if reference_dims(norm_dim, t.dim()) == SKIP:
                assert same_bits(t, b)  # per_unit leaves tensors of < 2 dims alone
                continue
            length = slice_length(b, norm_dim)
            err = (check_norms(b, norm_dim).double() / robust_norms(b, norm_dim) - 1).abs()
            aim = landing_gap(length, t.dtype)
            rtol = (aim + 3 * err + 4 * math.sqrt(length) * eps(t.dtype)).expand(t.shape)
            diff = (wide(t) - wide(expected)).abs()
            assert bool((diff <= rtol * wide(expected).abs() + 1e-30).all()), norm_dim
            left = ~_mask(_slice_changed(b, expected, norm_dim), t)
            assert same_bits(t[left], b[left])


def test_paths_agree():
    """The CPU and the sync-free kernels take the same decisions and land within their
    landing gap of each other."""
    g = torch.Generator().manual_seed(11)
    for dtype in DTYPES:
        for length in (3, 64, 4096):
            base = torch.randn(64, length, generator=g, dtype=torch.float64) * 2
            w = (base if not dtype.is_complex else torch.complex(base, base.flip(0))).to(dtype)
            c = float(torch.linalg.vector_norm(wide(w), dim=1).median())
            a, b = w.clone(), w.clone()
            project("cpu", a, c)
            project("sync_free", b, c)
            ca, cb = _slice_changed(w, a, "per_unit"), _slice_changed(w, b, "per_unit")
            assert torch.equal(ca, cb), (dtype, length)
            tol = 4 * eps(dtype) if dtype in HALF else landing_gap(length, dtype) + 1e-5
            torch.testing.assert_close(wide(a), wide(b), rtol=tol, atol=0)


def test_error_if_nonfinite_is_all_or_nothing():
    """Point 8: max_norm_ over several tensors, and a wrapper over several groups."""
    a = torch.full((3, 4), 5.0)
    b = torch.full((3, 4), 5.0)
    b[2, 1] = math.nan
    before = [a.clone(), b.clone()]
    with pytest.raises(RuntimeError, match=r"tensor 1.*NaN or inf"):
        max_norm_([a, b], 1.0, error_if_nonfinite=True)
    assert same_bits(a, before[0]) and same_bits(b, before[1])
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    for p in (pa, pb):
        p.grad = torch.ones_like(p)
    opt = MaxNormWrapper(
        torch.optim.SGD([{"params": [pa]}, {"params": [pb]}], lr=0.0),
        max_norm=1.0,
        error_if_nonfinite=True,
    )
    with pytest.raises(RuntimeError, match="param group 1"):
        opt.step()
    assert same_bits(pa, before[0]) and same_bits(pb, before[1])


def test_every_check_before_any_write():
    """Point 9: a bad tensor, a norm_dim that does not fit, out-of-range numbers; the
    messages name the argument and show at most ~200 characters of a value."""
    w = torch.full((4, 4), 3.0)
    before = w.clone()
    with pytest.raises(TypeError, match=r"tensor 1 has dtype torch\.int64"):
        max_norm_([w, torch.ones(3, dtype=torch.int64)], 1.0)
    with pytest.raises(TypeError, match="layout"):
        max_norm_([w, torch.eye(3).to_sparse()], 1.0)
    with pytest.raises(ValueError, match="does not fit tensor 1 of shape \\(3,\\)"):
        max_norm_([w, torch.ones(3)], 1.0, norm_dim=1)
    with pytest.raises(ValueError, match=r"max_norm=.*not representable"):
        max_norm_(w, 10**400)
    with pytest.raises(ValueError, match="norm_type"):
        max_norm_(w, 1.0, norm_type=0.5)
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        max_norm_(w, torch.tensor(1.0))
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        max_norm_(w, True)
    with pytest.raises(ValueError) as err:
        max_norm_(w, 1.0, norm_dim=list(range(5, 100_000)))
    assert len(str(err.value)) < 400
    with pytest.raises(TypeError) as err:
        max_norm_(w, "x" * 10**6)
    assert len(str(err.value)) < 400
    assert same_bits(w, before)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("dtype", "p", "length"),
    [
        (torch.float32, 1.0, 100),
        (torch.float32, 1.0, 10),
        (torch.float32, math.inf, 100),
        (torch.float64, 1.0, 100),
        (torch.float64, math.inf, 100),
    ],
)
def test_bounds_among_the_subnormals_hold(path, dtype, p, length):
    """Point 2 where the scaled values are subnormal (their rounding is absolute, not
    relative) and where a check norm's reciprocal would overflow."""
    unit = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal
    c = (length if p == 1.0 else 1) * 1.6 * unit
    w = torch.full((4, length), 10 * unit, dtype=dtype)
    project(path, w, c, "per_unit", p)
    assert bool(torch.isfinite(w).all())
    assert bool((torch.linalg.vector_norm(w, p, dim=1) <= c).all())
    assert bool((torch.linalg.vector_norm(w.double(), p, dim=1) <= c).all())
    tiny = torch.full((3, 1), 1e-309, dtype=torch.float64)
    project(path, tiny, 1e-310, "per_unit", math.inf)
    assert bool(torch.isfinite(tiny).all()) and bool((tiny.abs() <= 1e-310).all())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("length", [200, 1000, 2000])
def test_a_check_that_reads_high_still_lands_within_the_gap(path, length):
    """p = 1 adds one element after another: a row of one large and many small elements
    reads about `length u` high; the scaled row still lands within `landing_gap`."""
    h = 1.0001 * 2.0**-24
    w = torch.full((1, length), h)
    w[0, 0] = 1.0
    c = 0.5
    project(path, w, c, "per_unit", 1.0)
    n = float(torch.linalg.vector_norm(w.double(), 1))
    assert n <= c
    assert n >= c * (1 - landing_gap(length, w.dtype)), (1 - n / c, landing_gap(length, w.dtype))

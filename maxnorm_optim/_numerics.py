r"""Numerics shared by every projection path (dense CPU, sync-free, compiled, DTensor).

A leaf module: it imports only `torch` and the options. Each function has one job:

* `check_norms`: the norm a user checks, `torch.linalg.vector_norm` of the tensor in
  its own dtype (fp32 for fp16/bf16). A slice is *over* the bound when this norm
  exceeds `max_norm`; the projection makes it hold for every slice it scales.
* `accurate_norms`: slice norms with a proven relative error bound, from which the
  scale factors are computed, so that the float64 norm of every scaled slice is
  `<= max_norm` by construction (no reliance on the rounding of any one reduction).
* `error_bound`: a bound on the relative error of `check_norms` for any summation
  order, used for the last, sync-free settling step.
* `targets`, `quotient`, `split_factors`: per-slice targets and factors, kept as a
  mantissa and a power of two and applied in at most two steps, so that no factor
  over- or underflows (a float64 subnormal slice scaled up to 1 needs 2^1070).

The constants follow the standard error analysis of floating-point sums (Higham,
*Accuracy and Stability of Numerical Algorithms*, ch. 4): a sum of `n` non-negative
terms computed in any order has relative error at most `gamma(n - 1)`,
$\gamma_k = k u / (1 - k u)$, with `u` the unit roundoff.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
from torch import Tensor

from ._options import MaxNormOptions

__all__ = [
    "Bounds",
    "Factors",
    "accurate_norms",
    "blocked_bound",
    "blocked_norms",
    "check_dtype",
    "check_norms",
    "error_bound",
    "factors_of",
    "floor_to",
    "gamma",
    "low_zone",
    "make_bounds",
    "pow2",
    "quotient",
    "real_dtype",
    "reliable",
    "rescaled_bound",
    "rescaled_norms",
    "split_factors",
    "targets",
    "unit_roundoff",
    "work_dtype",
]

_HALF = (torch.float16, torch.bfloat16)
# Slice length of the blocks whose fp32 norms are combined in float64 by
# accurate_norms: short enough that each block's norm is accurate to ~17 ulps.
BLOCK = 32
# Error of one |x|^p or x^(1/p) evaluation, in units of u, for p other than 1, 2, inf
# (vectorised pow is accurate to about 1 ulp; 4 leaves room).
_POW_ULPS = 4.0


def check_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The `dtype=` argument of the check norm: fp32 for fp16/bf16, else `None`."""
    return torch.float32 if dtype in _HALF else None


_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_ROUNDOFF = {
    d: torch.finfo(d).eps / 2 for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of `dtype` (itself for real dtypes)."""
    return _REAL.get(dtype, dtype)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype scaled values are computed in: fp32 for fp16/bf16, else the real
    dtype of `dtype` (complex values are scaled through `torch.view_as_real`)."""
    if dtype in _HALF:
        return torch.float32
    return real_dtype(dtype)


def unit_roundoff(dtype: torch.dtype) -> float:
    """`u = eps / 2` of the real dtype of `dtype`."""
    real = real_dtype(dtype)
    found = _ROUNDOFF.get(real)
    return found if found is not None else torch.finfo(real).eps / 2


def gamma(n: float, u: float) -> float:
    """$\\gamma_n = n u / (1 - n u)$ (`inf` when `n u >= 1`)."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


def floor_to(x: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` that is `<= x`: for `n` of that dtype, `n > x`
    (exactly) is `n > floor_to(x, dtype)` computed in the dtype, with no rounding of
    `x` in the comparison."""
    if not math.isfinite(x) or dtype == torch.float64:
        return x
    if dtype != torch.float32:
        t = torch.tensor(x, dtype=dtype)
        if float(t) > x:
            t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
        return float(t)
    # fp32 through its bits: no tensor, no device
    if abs(x) >= 3.4028234663852886e38:
        return math.copysign(3.4028234663852886e38, x) if x > 0 else -math.inf
    (bits,) = struct.unpack("<I", struct.pack("<f", x))
    (near,) = struct.unpack("<f", struct.pack("<I", bits))
    if near > x:  # rounded up: step one fp32 value down
        bits = bits - 1 if near > 0 else bits + 1
        if near == 0.0:  # +0.0 rounded up from a negative x below the smallest subnormal
            bits = 0x80000001
        (near,) = struct.unpack("<f", struct.pack("<I", bits))
    return near


def check_norms(x: Tensor, p: float, dim: int | tuple[int, ...] | None, keepdim: bool = False):
    """The norms a user checks: `vector_norm(x, p, dim)`, fp32 for fp16/bf16."""
    return torch.linalg.vector_norm(x, p, dim=dim, keepdim=keepdim, dtype=check_dtype(x.dtype))


def error_bound(
    length: int, p: float, dtype: torch.dtype, complex_: bool = False, scale: float = 1.0
) -> float:
    """Relative error bound of `check_norms` over a slice of `length` elements whose
    norm is about `scale`, for any summation order (first order in u, times 1.01).

    `p = inf` is exact; for `p = 1` only the sum rounds; for `p = 2` each square and
    the square root round once. Other `p` are computed as `exp(p log|x|)`, whose error
    grows with `|p log|x||`: each power is allowed `4 + p (|ln scale| + ln(length) / p + 1)`
    ulps and the root `5 + |ln scale|` (measured errors are a fraction of that).
    """
    u = unit_roundoff(check_dtype(dtype) or dtype)
    n = 2 * length if complex_ else length
    if p == math.inf and not complex_:
        return 0.0
    if p == 1.0 and not complex_:
        return 1.01 * gamma(max(n - 1, 0), u)
    if p == 1.0:  # complex: |z| rounds, then the sum of `length` terms
        return 1.01 * gamma(max(length - 1, 0) + 3, u)
    if p == 2.0 or p == math.inf:
        term, root = 1.0, 1.0
    else:
        logs = abs(math.log(scale)) if 0 < scale < math.inf else 1000.0
        term = _POW_ULPS + p * (logs + math.log(max(n, 1)) / p + 1)
        root = _POW_ULPS + 1 + logs
    if complex_:
        term += 2.0  # |z| = hypot(re, im) rounds too
    if p == math.inf:
        return 1.01 * term * u
    return 1.01 * (gamma(max(n - 1, 0) + term, u) / p + root * u)


class Bounds(NamedTuple):
    """The numbers of one projection, as Python floats.

    Args:
        hi: the upper bound (`inf` when unbounded above).
        lo: `min_norm`.
        rate: the Keras `MinMaxNorm` rate.
        p: the norm type.
    """

    hi: float
    lo: float
    rate: float
    p: float


def make_bounds(options: MaxNormOptions, dtype: torch.dtype) -> Bounds:
    del dtype
    return Bounds(options.upper, options.min_norm, options.rate, options.norm_type)


def low_zone(length: int, p: float, acc: torch.dtype) -> float:
    """Norms computed in `acc` below this may have lost terms to underflow: `|x|^p`
    under the smallest normal number. 0 for `p` in `{1, inf}`, which do not power."""
    if p in (1.0, math.inf) or length == 0:
        return 0.0
    info = torch.finfo(acc)
    return (length * info.tiny / info.eps) ** (1.0 / p)


def reliable(check: Tensor, length: int, p: float, acc: torch.dtype) -> Tensor:
    """Where `check` norms (computed in `acc`) neither over- nor underflowed."""
    low = low_zone(length, p, acc)
    ok = torch.isfinite(check)
    return ok & (check >= low) if low > 0 else ok


def accurate_norms(
    x: Tensor, p: float, check: Tensor | None = None, dtype: torch.dtype | None = None
) -> tuple[Tensor, float]:
    """Norms of the rows of a 2-d `x` in float64, with a proven relative error bound.

    * When `check` (the rows' check norms) is given and its own error bound is below
      2.5e-6 (fp32 rows of up to 64 elements, any fp64 row): the check norms themselves.
    * fp32/fp16/bf16 and `p = 2` (long rows, the hot path): fp32 norms of blocks of
      `BLOCK` elements, combined in float64; the bound is that of a `BLOCK`-term sum.
    * `p = inf`: exact.
    * anything else: float64 on a copy rescaled per row by a power of two (exact),
      so that no `|x|^p` over- or underflows.

    Rows whose `check` norm over- or underflowed take the rescaled float64 path.

    Args:
        x: `(rows, length)`, real or complex.
        p: the norm type.
        check: the rows' check norms, when known (spares work on the hot path).
        dtype: the dtype the rows are stored in (default `x.dtype`).

    Returns:
        `(norms, eps)`: float64 norms (`inf` only for rows holding inf, NaN for NaN)
        and the relative error bound `eps`.
    """
    rows, length = x.shape
    dtype = dtype or x.dtype
    if p == math.inf and not x.is_complex():
        if length == 0:
            return x.new_zeros(rows, dtype=torch.float64), 0.0
        return x.abs().amax(dim=1).to(torch.float64), 0.0
    acc = check_dtype(dtype) or real_dtype(dtype)
    general = p not in (1.0, 2.0, math.inf)  # only their error depends on magnitudes
    own = error_bound(length, p, dtype, x.is_complex(), _scale(check) if general else 1.0)
    top = torch.finfo(acc).max  # an inf check norm (overflow) is re-measured below
    if check is not None and own <= 2.5e-6:
        norms, eps = check.to(torch.float64), own
    elif check is not None and p == 2.0 and x.dtype in (torch.float32, *_HALF):
        norms, eps = blocked_norms(x), blocked_bound()
        top = 2.0**62  # squares of blocks stay in range where the row's norm is below it
    else:
        return rescaled_norms(x, p), rescaled_bound(length, p, x.is_complex())
    # Rows whose check norm over- or underflowed (or is too large for the blocks).
    low = low_zone(length, p, acc)
    odd = ~((check >= low) & (check <= top)) if low > 0 else ~(check <= top)
    if bool(odd.any()):
        idx = odd.nonzero().squeeze(1)
        norms[idx] = rescaled_norms(x.index_select(0, idx), p)
        eps = max(eps, rescaled_bound(length, p, x.is_complex()))
    return norms, eps


def _scale(check: Tensor | None) -> float:
    """A magnitude for `error_bound` from check norms (1 when unknown or not positive):
    the one of largest |log| among them, so that the bound covers every row."""
    if check is None or check.numel() == 0:
        return 1.0
    finite = check[torch.isfinite(check) & (check > 0)]
    if finite.numel() == 0:
        return 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return lo if abs(math.log(lo)) > abs(math.log(hi)) else hi


def rescaled_bound(length: int, p: float, complex_: bool) -> float:
    n = 2 * length if complex_ else length
    u64 = unit_roundoff(torch.float64)
    extra = 3.0 if complex_ else 0.0
    if p == 1.0 and not complex_:
        eps = gamma(n, u64)
    elif p == 2.0:
        eps = gamma(n + 1 + extra, u64) / 2 + u64
    else:  # values rescaled to at most 1; allow generously for float64 pow
        eps = gamma(n + 64 * _POW_ULPS + extra, u64) / min(p, 1e6) + 64 * _POW_ULPS * u64
    return 1.01 * eps + 4 * u64


def blocked_bound() -> float:
    """Relative error bound of `blocked_norms` (p = 2): a `BLOCK`-term fp32 sum, its
    square root, and the float64 combination."""
    u = unit_roundoff(torch.float32)
    return 1.01 * (gamma(BLOCK, u) / 2 + 2 * u)


def blocked_norms(x: Tensor) -> Tensor:
    """float64 norms of the rows of a 2-d fp32/fp16/bf16 `x` from fp32 block norms."""
    rows, length = x.shape
    acc = check_dtype(x.dtype)
    for block in (BLOCK, BLOCK // 2, BLOCK // 4):  # a block that divides the row: no tail
        if length % block == 0 and x.is_contiguous():
            head = x.view(rows, length // block, block)
            parts64 = torch.linalg.vector_norm(head, dim=2, dtype=acc).to(torch.float64)
            return torch.linalg.vector_norm(parts64, dim=1)
    full = length - length % BLOCK
    parts = []
    if full:
        head = x[:, :full].reshape(rows, full // BLOCK, BLOCK)
        parts.append(torch.linalg.vector_norm(head, dim=2, dtype=acc).to(torch.float64))
    if full < length:
        tail = torch.linalg.vector_norm(x[:, full:], dim=1, dtype=acc, keepdim=True)
        parts.append(tail.to(torch.float64))
    if not parts:
        return x.new_zeros(rows, dtype=torch.float64)
    blocks = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return torch.linalg.vector_norm(blocks, dim=1)


def rescaled_norms(x: Tensor, p: float) -> Tensor:
    """float64 p-norms of the rows of `x`, computed on `|x| / m` with `m` the row's
    largest magnitude, so that no power over- or underflows (the largest term is 1,
    whatever p; a division rounds by at most one float64 ulp); the result is `m` times
    that (`inf` only where a row holds inf)."""
    wide = x.to(torch.complex128 if x.is_complex() else torch.float64)
    mags = wide.abs()
    if mags.shape[1] == 0:
        return mags.new_zeros(mags.shape[0])
    top = mags.amax(dim=1)
    finite = torch.isfinite(top) & (top > 0)
    safe = torch.where(finite, top, torch.ones_like(top))
    norms = torch.linalg.vector_norm(mags / safe.unsqueeze(1), p, dim=1) * safe
    # Zero rows stay 0; rows holding inf or NaN give their own norm (inf or NaN).
    return torch.where(finite, norms, torch.linalg.vector_norm(mags, p, dim=1))


def pow2(k: Tensor) -> Tensor:
    """`2.0 ** k` for an integer-valued float64 tensor `k`, exact (`exp2` of an integer
    is exact in float64 from 2^-1074 to 2^1023)."""
    return torch.exp2(k)


def targets(
    norms: Tensor, over: Tensor, under: Tensor, b: Bounds, margin_hi: float, margin_lo: float
) -> Tensor:
    """Per-slice target norms in float64: slices over the bound aim at
    `hi (1 - margin_hi)`, slices under the acceptance bound at `lo (1 + margin_lo)` but never
    above `hi (1 - margin_hi)`; `rate` moves only that share of the way. Other slices
    get their own norm (factor 1)."""
    top = b.hi * (1.0 - margin_hi)
    goal = torch.where(over, torch.full_like(norms, top), norms)
    if b.lo > 0:
        up = min(b.lo * (1.0 + margin_lo), top)
        goal = torch.where(under, torch.full_like(norms, up), goal)
    if b.rate != 1.0:
        goal = b.rate * goal + (1.0 - b.rate) * norms
    return goal


class Factors(NamedTuple):
    """Per-slice factors as `mant * 2^exp` (float64; `exp` integral), so that factors
    beyond the float64 range (a float64 subnormal slice scaled up) are represented."""

    mant: Tensor
    exp: Tensor


def factors_of(f: Tensor) -> Factors:
    """`f` (float64, finite) as `Factors`."""
    mant, exp = torch.frexp(f)
    return Factors(mant, exp.to(torch.float64))


def quotient(goal: Tensor, norms: Tensor) -> Factors:
    """`goal / norms` as `Factors`, without over- or underflow (both positive)."""
    gm, ge = torch.frexp(goal)
    nm, ne = torch.frexp(norms)
    return Factors(gm / nm, (ge - ne).to(torch.float64))


def split_factors(factors: Factors, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`factors` as `(a, b)` in `dtype`, both within its normal range, with
    `a * b == factors` up to the rounding of the mantissa, so that `(x * a) * b`
    neither over- nor underflows where `x * factors` fits (`b` is 1 unless the factor
    is beyond the range of one normal number)."""
    info = torch.finfo(dtype)
    limit = math.floor(math.log2(info.max)) - 2
    first = factors.exp.clamp(-limit, limit)
    second = (factors.exp - first).clamp(-limit, limit)
    a = factors.mant * pow2(first)
    return a.to(dtype), pow2(second).to(dtype)

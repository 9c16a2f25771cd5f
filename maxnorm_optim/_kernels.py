r"""Kernels of the max-norm projection for dense tensors: one per-slice pipeline and
the strategies that run it.

The pipeline (`Pipeline` and the functions around it), written once:

1. *check norms* of every slice, on the tensor's own layout (the norm a user checks);
2. *classify*: over, under, non-finite (slices whose check norm over- or underflowed
   while their elements are finite are re-measured on a rescaled float64 copy);
3. *stats* (tensors, no host sync);
4. *factors* from norms with a proven error bound
   ([`accurate_norms`][maxnorm_optim._numerics.accurate_norms]), aimed far enough
   inside the bound that the float64 norm of every scaled slice holds by construction;
5. *apply* to the scaled slices only, then *verify* them with the user's own check and
   shrink the few that still exceed it until they pass.

Strategies: `cpu_*` (the host reads which slices to scale, free on CPU; only those
are gathered, scaled and written back) and `sync_free_*` (accelerators and
`torch.compile`: every slice gets a factor, applied with `torch.where` so that slices
left alone keep their exact bits; one verification, then a provably sufficient
shrink of the slices that fail it). Under `torch.compile` the check norms go through
an opaque custom op, so that they are the eager kernels' (bitwise what a user computes).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _numerics as num
from ._options import MaxNormOptions

__all__ = [
    "GATHER_NUMEL",
    "SCRATCH_NUMEL",
    "SMALL_NUMEL",
    "Batch",
    "Generic",
    "Pipeline",
    "ProjectionStats",
    "Rows",
    "Selected",
    "Stats",
    "cpu_batch",
    "cpu_generic",
    "cpu_rows",
    "nonfinite_error",
    "pipeline",
    "sync_free_batch",
    "sync_free_generic",
    "sync_free_rows",
    "user_check",
    "where_scale_",
]

# Elements of the buffer the CPU strategy gathers the slices it scales into (per
# thread, dtype and device; larger selections go through it in chunks).
GATHER_NUMEL = 1 << 22
# Tensors of at most this many elements are batched with others of the same slice
# shape: their norms are computed in one call over a copy in a scratch buffer.
SMALL_NUMEL = 1 << 16
# Rows gathered per block on the plain route (2 MiB of fp32: within a core's L2).
PLAIN_NUMEL = 1 << 19
# Up to this many values, one multiply of the whole tensor (by exactly 1 where in bound)
# costs less than the few operations that list, gather and scatter a few rows (CPU).
IN_PLACE_NUMEL = 1 << 20
# Elements of each scratch buffer (per thread, dtype and device): bounds the extra
# memory of a projection, whatever the size of the weights.
SCRATCH_NUMEL = 1 << 20
# Slices whose check norm's error bound (plus that of the norms the factors come from)
# is below this are aimed by that bound and need no verification: rows of up to ~64
# fp32 elements, and fp64 rows of any length, end at most ~5e-6 under the bound.
_PROVEN = 4.5e-6
# Settling steps before the last, provably sufficient one (each shrinks the slices
# that still fail the check by a growing number of ulps).
_SETTLE_STEPS = 24
# Rows whose check norm's proven relative error is at most this take their factors from
# the check norm on the plain route, landing at most about three times this under the
# bound (fp32 p = 2: rows up to about 4096 elements; fp64: any row).
_CHECK_ROUTE = 1.25e-4


class ProjectionStats(NamedTuple):
    """What one projection did, as tensors on the parameters' device (no host sync).

    Args:
        projected: slices scaled.
        slices: slices looked at.
        max_norm_before: the largest check norm before projection (`-inf` if none).
    """

    projected: Tensor
    slices: Tensor
    max_norm_before: Tensor


# -- scratch buffers -------------------------------------------------------------------
class _Pool(threading.local):
    """Reusable scratch buffers, one per (slot, dtype, device) and thread.

    Fresh large CPU allocations are page-faulted on first touch, which costs more than
    the projection itself; keeping a bounded buffer avoids it.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, slot: str, dtype: torch.dtype, device: torch.device, numel: int) -> Tensor:
        key = (slot, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            if numel <= 4 * GATHER_NUMEL:
                self.buffers[key] = buf
        return buf[:numel]


_POOL = _Pool()


# -- check norms under torch.compile ----------------------------------------------------
@torch.library.custom_op("maxnorm_optim::check_norms", mutates_args=())
def _check_norms_op(x: Tensor, p: float, dim: list[int], keepdim: bool) -> Tensor:
    return num.check_norms(x, p, tuple(dim), keepdim)


@_check_norms_op.register_fake
def _(x: Tensor, p: float, dim: list[int], keepdim: bool) -> Tensor:
    return num.check_norms(x, p, tuple(dim), keepdim)


def user_check(x: Tensor, p: float, dim: tuple[int, ...], keepdim: bool = False) -> Tensor:
    """The user's check norms; under `torch.compile` through the opaque op, so that the
    compiled projection judges by the same eager kernels the user checks with."""
    if torch.compiler.is_compiling():
        return _check_norms_op(x, p, list(dim), keepdim)
    return num.check_norms(x, p, dim, keepdim)


# -- sources of rows ----------------------------------------------------------------------
@dataclass
class Rows:
    """A contiguous tensor whose norms run over its trailing dims, as `(slices, length)`."""

    tensor: Tensor
    rows: Tensor
    name: str


@dataclass
class Batch:
    """Small tensors of one dtype, device and slice shape: normed together over their
    concatenation (`slices` rows of `length`)."""

    tensors: list[Tensor]
    names: list[str]
    sizes: list[int]  # slices of each tensor
    length: int
    owner: Tensor  # index of the tensor each row belongs to


@dataclass
class Generic:
    """Any other layout: norms over `dims` of `tensor` as it is laid out."""

    tensor: Tensor
    dims: tuple[int, ...]
    name: str


@dataclass
class Selected:
    """Only the rows given per call (the touched rows of a sparse step) of a 2-d view."""

    tensor: Tensor
    name: str


# -- the per-slice pipeline -----------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, Tensor, int]] = []

    def add(self, selected: Tensor, norms: Tensor) -> None:
        if norms.numel():
            self.parts.append((selected.sum(), norms.max().to(torch.float32), norms.numel()))

    def add_counts(self, projected: int, norms: Tensor) -> None:
        if norms.numel():
            count = torch.tensor(projected, device=norms.device)
            self.parts.append((count, norms.max().to(torch.float32), norms.numel()))

    def result(self, device: torch.device | None) -> ProjectionStats:
        if not self.parts:
            zero = torch.zeros((), dtype=torch.int64, device=device)
            return ProjectionStats(zero, zero.clone(), torch.full((), -math.inf, device=device))
        dev = self.parts[0][0].device
        projected = torch.stack([p[0].to(dev) for p in self.parts]).sum()
        top = torch.stack([p[1].to(dev) for p in self.parts]).max()
        # a fill, not a copy from the host: no sync on an accelerator
        slices = torch.full((), sum(p[2] for p in self.parts), dtype=torch.int64, device=dev)
        return ProjectionStats(projected, slices, top)


def nonfinite_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"max-norm projection of {name}: a slice holds NaN or inf. Set "
        "error_if_nonfinite=False to leave such slices unchanged."
    )


class Pipeline:
    """The per-slice pipeline for one option set and one tensor dtype."""

    def __init__(self, options: MaxNormOptions, dtype: torch.dtype, complex_: bool) -> None:
        self.p = options.norm_type
        self.bounds = num.make_bounds(options, dtype)
        self.dtype = dtype
        self.complex = complex_
        self.half = dtype in (torch.float16, torch.bfloat16)
        self.work = num.work_dtype(dtype)
        self.u_work = num.unit_roundoff(self.work)
        self.u_store = num.unit_roundoff(dtype)
        self.acc = num.check_dtype(dtype) or self.work
        self.rate_one = options.rate == 1.0
        hi = self.bounds.hi
        self._fits = math.isfinite(hi) and _power_fits(hi, self.p, self.acc)
        self._bounds: dict[int, float] = {}
        self._plain: dict[int, _Plain] = {}
        self._over: dict[int, float | None] = {}
        # The common case, with a shorter path on CPU: an upper bound only, exact, on
        # real fp32/fp64 values.
        self.plain = (
            self.bounds.lo == 0
            and self.rate_one
            and not complex_
            and dtype in (torch.float32, torch.float64)
        )

    def plain_route(self, length: int, top: float) -> _Plain | None:
        """The fewest-operation route for rows of `length` all over the bound whose
        largest check norm is `top` (`pipe.plain` only), or `None` where the general
        steps are needed: p other than 1, 2 and inf on long fp32 rows, check norms
        whose blocked squares could overflow, or factors beyond one normal multiply."""
        if not self.plain:
            return None
        route = self._plain.get(length)
        if route is None:
            route = self._plain[length] = _plain_route(self, length)
        if route.kind == "" or not top <= route.top or route.aim / (top * 1.01) < route.tiny:
            return None
        return route

    def over_threshold(self, length: int) -> float | None:
        """Where `pipe.plain` and slices of `length` are selected by one comparison
        (`_cpu_select`'s common case): the check norms over the bound are those `>` this
        value; else `None`."""
        if length not in self._over:
            fits = self.plain and self.judges(length)
            self._over[length] = num.floor_to(self.bounds.hi, self.acc) if fits else None
        return self._over[length]

    def absolute(self, length: int) -> float:
        """A bound on the p-norm of the absolute rounding errors of scaling a slice of
        `length`: values that land below the dtype's smallest normal round by up to
        half a subnormal spacing, not by a relative amount (it matters only for
        bounds near the subnormals)."""
        info = torch.finfo(self.work if self.complex else self.dtype)
        terms = 2 * length if self.complex else length
        # (the smallest subnormal first: half of it alone rounds to 0 in float64)
        return info.tiny * info.eps * (0.5 * float(terms) ** (1.0 / min(self.p, 1e6)))

    def check_bound(self, length: int) -> float:
        """`error_bound` of the check norm of slices of `length` near the bound."""
        cached = self._bounds.get(length)
        if cached is None:
            b = self.bounds
            scale = b.hi if math.isfinite(b.hi) else max(b.lo, 1e-300)
            cached = self._bounds[length] = num.error_bound(
                length, self.p, self.dtype, self.complex, scale
            )
        return cached

    def judges(self, length: int) -> bool:
        """Whether the same-dtype check can judge slices of `length` at the bound: where
        `hi^p` overflows the check dtype, or lies where its terms underflow, it cannot,
        and the float64 check (proven by construction) is the judge."""
        return self._fits and self.bounds.hi > 2 * num.low_zone(length, self.p, self.acc)

    # -- classification ---------------------------------------------------------
    def suspects(self, check: Tensor, length: int) -> Tensor:
        """Slices whose check norm over- (inf) or, where it matters, underflowed: they
        are re-measured on a rescaled float64 copy before they are classified."""
        out = torch.isinf(check)
        low = num.low_zone(length, self.p, self.acc)
        if low > 0 and (self.bounds.lo > 0 or self.bounds.hi <= 2 * low):
            out = out | (check < low)
        if not self.judges(length):
            # The check cannot judge at the bound: slices it reads near a threshold are
            # decided by float64 norms (else a projected slice could read over again).
            beta = 4 * self.check_bound(length) + 1e-6
            for edge in (self.bounds.hi, self.accept(length)):
                if 0 < edge < math.inf:
                    out = out | ((check >= edge * (1 - beta)) & (check <= edge * (1 + beta)))
        return out

    def accept(self, length: int) -> float:
        """Slices of `length` whose norm is `0 < n < accept` are scaled up: `lo`, or, where
        `[lo, hi]` is narrower than the check can resolve (unit norm), `hi (1 - tau)` with
        `tau = max(1e-5, 2 eps, twice the check's error bound)`, so that a scaled slice is
        not chased below the resolution of the dtype or of the check (twice: a slice aimed
        one bound under `hi` may read one more bound lower)."""
        b = self.bounds
        if b.lo <= 0:
            return 0.0
        own = self.check_bound(length) if self.judges(length) else 0.0
        tau = max(1e-5, 4 * self.u_store, 2 * own + 8 * self.u_work)
        return min(b.lo, b.hi * (1 - tau))

    def classify(
        self, decision: Tensor, skip: Tensor | None, length: int = 1
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(over, under, nonfinite, selected)` from float64 decision norms."""
        b = self.bounds
        nonfinite = ~torch.isfinite(decision)
        over = decision > b.hi
        under = (decision > 0) & (decision < self.accept(length))
        selected = (over | under) & ~nonfinite
        if skip is not None:
            selected = selected & (skip.to(decision.device) == 0)
        return over, under, nonfinite, selected

    # -- factors ----------------------------------------------------------------------
    def verifies(self, length: int, eps: float, prove: bool) -> tuple[bool, bool]:
        """Which checks the scaled slices are verified with afterwards: `(same-dtype
        check, float64 check)`. A check that holds by construction is not verified."""
        if not self.rate_one:
            return False, False
        same = self.judges(length) and not prove and not self._proven(length, eps)
        return same, self.half and not prove

    def _proven(self, length: int, eps: float) -> bool:
        # Short slices: the check norm's own error bound costs under ~2e-6 of margin.
        own = self.check_bound(length)
        return not self.half and own + eps <= _PROVEN

    def margins(self, length: int, eps: float, prove: bool) -> tuple[float, float]:
        """How far inside `[lo, hi]` scaled slices aim (relative), `(below hi, above lo)`.

        Covers the error of the norms the factors come from (`eps`), the rounding of the
        factor and of the scaled values and the float64 check's own rounding, so that
        the float64 norm holds by construction for fp32, fp64 and complex; where the
        same-dtype check is not verified afterwards, its error bound too.
        """
        u64 = num.unit_roundoff(torch.float64)
        base = eps + 3 * self.u_work + num.gamma(2 * length + 4, u64)
        hi = base + (0.0 if self.half and not prove else self.u_store)
        own = self.check_bound(length)
        if self.judges(length) and (prove or self._proven(length, eps)):
            hi += own
        # Scaled-up slices aim far enough above lo that the check, too, reads >= lo.
        lo = base + self.u_store + (own if self.judges(length) else 0.0)
        return hi, lo

    def factors(
        self,
        norms: Tensor,
        over: Tensor,
        under: Tensor,
        selected: Tensor,
        margins: tuple[float, float],
        check: Tensor | None = None,
        length: int = 0,
    ) -> num.Factors:
        """Per-slice factors, exactly 1 where not `selected`.

        `check`: the slices' check norms, given where the scaled slices will be verified
        with them. A rounded sum of `n` terms typically errs by about `sqrt(n) u`, and
        the check of a scaled slice by about as much as the check of the slice did:
        aiming lower by twice the larger of the two (at most 1e-3) lets the verification
        pass at once nearly always. The bound itself never rests on this aim.
        """
        goal = num.targets(norms, over, under, self.bounds, *margins)
        if length:  # the absolute rounding of subnormal results, under the bound too
            goal = torch.where(over, (goal - self.absolute(length)).clamp_(min=0.0), goal)
        safe = torch.where(selected, norms, torch.ones_like(norms))
        if check is not None:
            terms = 2 * length if self.complex else length
            typical = math.sqrt(terms) * num.unit_roundoff(self.acc)
            ratio = (check.to(torch.float64) / safe).nan_to_num(nan=1.0, posinf=1.0)
            cap = 1e-3
            if self.bounds.lo > 0:  # stay above the lower acceptance bound
                cap = min(cap, (1 - self.accept(length) / self.bounds.hi) / 4)
            slack = (2 * (ratio - 1).abs()).clamp(min=min(2 * typical, cap), max=cap)
            # Slices aimed at the top of the band (over it, or scaled up into a narrow
            # band) aim lower by the slack.
            top = self.bounds.hi * (1.0 - margins[0])
            goal = torch.where(over | (under & (goal >= top)), goal / (1 + slack), goal)
        one = torch.ones_like(norms)
        return num.quotient(torch.where(selected, goal, one), torch.where(selected, safe, one))

    def safe_grow(self, checked: Tensor, length: int) -> Tensor:
        """Factors that bring slices whose check norm reads `checked` (below the lower
        acceptance bound) up to it, capped where the check could then exceed the upper
        bound (for any summation order); 1 where no growth is provably safe."""
        beta = self.check_bound(length)
        safe = checked.clamp(min=torch.finfo(torch.float64).tiny)
        want = self.accept(length) / safe * (1 + 8 * self.u_work)
        room = (1 + beta) * (1 + self.u_store) * (1 + self.u_work) ** 2
        most = self.bounds.hi * (1 - beta) / (room * safe)
        return torch.where(want <= most, want, torch.ones_like(want))

    def safe_shrink(self, checked: Tensor, length: int) -> Tensor:
        """Factors that provably bring slices whose check norms (or float64 upper
        bounds) are `checked` within the bound, for any summation order: the last
        settling step, which needs no host sync."""
        u64 = num.unit_roundoff(torch.float64)
        beta = max(
            self.check_bound(length),
            num.gamma(2 * length + 4, u64),
        )
        info = torch.finfo(self.work if self.complex or self.half else self.dtype)
        store = torch.finfo(self.dtype if not self.complex else self.work)
        # (the smallest subnormal first: half of it alone rounds to 0 in float64)
        absolute = store.tiny * store.eps * (0.5 * (2 * length) ** (1.0 / min(self.p, 1e6)))
        room = self.bounds.hi / (1 + beta) - absolute
        scale = (1 - beta) / ((1 + self.u_store) * (1 + info.eps) ** 2)
        g = room * scale / checked.clamp(min=torch.finfo(torch.float64).tiny)
        return g.clamp(min=0.0, max=1.0)


_PIPELINES: dict[tuple[MaxNormOptions, torch.dtype], Pipeline] = {}


def pipeline(options: MaxNormOptions, dtype: torch.dtype) -> Pipeline:
    """The `Pipeline` of `options` and `dtype` (kept for the most recent few: it holds
    only numbers)."""
    key = (options, dtype)
    found = _PIPELINES.get(key)
    if found is None:
        if len(_PIPELINES) >= 64:
            _PIPELINES.clear()  # (one call: safe while other threads read or add)
        found = _PIPELINES[key] = Pipeline(options, dtype, dtype.is_complex)
    return found


class _Plain(NamedTuple):
    """Constants of the plain route for one row length: which norms the factors come
    from (`kind`: "check" where the check norm is accurate enough, "blocked" for fp32
    p = 2, "" where the route does not apply), the target over each norm (`aim`),
    whether the scaled rows are verified with the check (`same`), and the largest
    check norm (`top`) and smallest factor (`tiny`) the route takes."""

    kind: str
    aim: float
    same: bool
    top: float
    tiny: float


def _plain_route(pipe: Pipeline, length: int) -> _Plain:
    p, dtype = pipe.p, pipe.dtype
    own = pipe.check_bound(length)
    tiny = 2.0 ** (-100 if dtype == torch.float32 else -1000)
    prove = False
    if own <= 2.5e-6 and p in (1.0, 2.0, math.inf):
        kind, eps, top = "check", own, math.inf  # short rows: the check is accurate
    elif own <= _CHECK_ROUTE and p in (1.0, 2.0, math.inf):
        # Medium rows: factors from the check norm too, aimed under the bound by its
        # proven error (twice: for the factor and for the check of the scaled row), so
        # that both checks hold by construction: one norm and one multiply, nothing to
        # verify, at the price of landing up to about `3 own` under the bound (the
        # check the factor comes from may read high by `own` once more).
        kind, eps, top, prove = "check", own, math.inf, True
    elif p == 2.0 and dtype == torch.float32:
        kind, eps, top = "blocked", num.blocked_bound(), 2.0**62
    else:
        return _Plain("", 0.0, False, 0.0, 0.0)
    margin = pipe.margins(length, eps, prove)[0]
    same = pipe.verifies(length, eps, prove)[0]
    aim = pipe.bounds.hi * (1.0 - margin) - pipe.absolute(length)
    if not aim > 0:
        return _Plain("", 0.0, False, 0.0, 0.0)
    if same:
        # Aim under by a typical rounding error of the check (a sum of `length` terms
        # errs by about sqrt(length) u), so that the verification passes at once nearly
        # always; the bound itself rests on the verification, not on this aim.
        aim /= 1 + min(2 * math.sqrt(length) * num.unit_roundoff(pipe.acc), 1e-3)
    return _Plain(kind, aim, same, top, tiny)


def _power_fits(x: float, p: float, dtype: torch.dtype) -> bool:
    if p == math.inf:
        return True
    try:
        return x**p * 4 < torch.finfo(dtype).max
    except OverflowError:
        return False


# -- CPU strategy ----------------------------------------------------------------------
def _work_view(x: Tensor) -> Tensor:
    """A real view to scale in place (complex through `view_as_real`)."""
    return torch.view_as_real(x) if x.is_complex() else x


def _scale_rows_(x: Tensor, factors: Tensor | num.Factors, work: torch.dtype) -> None:
    """`x *= factors[:, None]` in the work dtype (CPU: a host-side check spares the
    second multiply of extreme factors when there is none)."""
    view = _work_view(x)
    shape = (-1,) + (1,) * (view.dim() - 1)
    if isinstance(factors, Tensor):
        factors = num.factors_of(factors)
    first, second = num.split_factors(factors, work)
    view.mul_(first.view(shape))
    if bool((second != 1).any()):
        view.mul_(second.view(shape))


class _Gathered:
    """Rows gathered into a scratch buffer: stored in the tensor's dtype (`store`), and
    for fp16/bf16 also in fp32 (`work`), where they are scaled."""

    def __init__(self, store: Tensor) -> None:
        self.store = store
        if store.dtype in (torch.float16, torch.bfloat16):
            k, length = store.shape
            self.work = _POOL.get("work", torch.float32, store.device, k * length).view(k, length)
            self.work.copy_(store)
        else:
            self.work = store

    def scale(self, idx: Tensor | None, factors: Tensor | num.Factors, work: torch.dtype) -> None:
        if idx is None:
            _scale_rows_(self.work, factors, work)
            if self.work is not self.store:
                self.store.copy_(self.work)
            return
        rows = self.work.index_select(0, idx)
        _scale_rows_(rows, factors, work)  # factors of the rows idx
        self.work.index_copy_(0, idx, rows)
        if self.work is not self.store:
            self.store.index_copy_(0, idx, rows.to(self.store.dtype))


def _upper(pipe: Pipeline, store: Tensor, same: bool, wide: bool) -> Tensor:
    """Per row, a float64 value that is above the bound whenever a verified check may
    be: the same-dtype check norm, and for fp16/bf16 a proven upper bound of the
    float64 norm of the stored values."""
    k, length = store.shape
    upper = torch.full((k,), -math.inf, dtype=torch.float64, device=store.device)
    check = user_check(store, pipe.p, (1,)) if (same or wide) else None
    if same:
        assert check is not None
        upper = check.to(torch.float64)
    if wide:
        norms, eps = num.accurate_norms(store, pipe.p, check)
        u64 = num.unit_roundoff(torch.float64)
        upper = torch.maximum(upper, norms / (1 - eps) * (1 + num.gamma(length + 4, u64)))
    return upper


def _settle_cpu(pipe: Pipeline, rows: _Gathered, same: bool, wide: bool) -> None:
    """Shrink the rows that fail a verified check by a growing number of ulps, then by
    a provably sufficient factor and halving: ends with every check passing."""
    if not (same or wide):
        return
    length = rows.store.shape[1]
    hi = pipe.bounds.hi
    for step in range(_SETTLE_STEPS + 64):
        upper = _upper(pipe, rows.store, same, wide)
        fail = upper > hi
        if not bool(fail.any()):
            return
        idx = fail.nonzero().squeeze(1)
        bad = upper.index_select(0, idx)
        shrink = _shrink(pipe, bad, length, step)
        rows.scale(idx, shrink, pipe.work)
    raise AssertionError("max-norm projection: settling did not converge")  # unreachable


def _shrink(pipe: Pipeline, checked: Tensor, length: int, step: int) -> Tensor:
    """Settling step `step` for slices whose check reads `checked` above the bound:
    a growing number of ulps under `hi / checked`, then once the provably sufficient
    factor, then (never needed where the bound's premises hold) halving."""
    hi = pipe.bounds.hi
    if step < _SETTLE_STEPS:
        return ((hi / checked) * (1 - 4 * pipe.u_work * 2.0**step)).clamp(min=0.5, max=1.0)
    if step == _SETTLE_STEPS:
        return pipe.safe_shrink(checked, length)
    return torch.full_like(checked, 0.5)


def _lift_cpu(pipe: Pipeline, rows: _Gathered, under: Tensor, same: bool, wide: bool) -> None:
    """Scaled rows whose check norm reads below the lower acceptance bound get one more
    push up, kept only where the upper checks still hold (so that a second projection
    leaves them alone)."""
    b = pipe.bounds
    length = rows.store.shape[1]
    if not pipe.judges(length):
        return  # the scaled-up rows aimed at lo by float64 norms; no same-dtype judge here
    check = user_check(rows.store, pipe.p, (1,)).to(torch.float64)
    accept = pipe.accept(length)
    low = under & (check < accept) & (check > 0)
    if not bool(low.any()):
        return
    idx = low.nonzero().squeeze(1)
    work = rows.work.index_select(0, idx)
    grow = (accept / check.index_select(0, idx)) * (1 + 8 * pipe.u_work)
    _scale_rows_(work, grow, pipe.work)
    stored = work.to(rows.store.dtype)
    ok = ~(_upper(pipe, stored, True, wide) > b.hi)
    if bool(ok.any()):
        keep = idx[ok]
        rows.work.index_copy_(0, keep, work[ok])
        if rows.work is not rows.store:
            rows.store.index_copy_(0, keep, stored[ok])


def _cpu_scale_over(pipe: Pipeline, store: Tensor, check: Tensor) -> None:
    """`_cpu_scale` for the common case (`pipe.plain`: every row over an upper bound,
    real fp32/fp64) where the plain route does not apply: the same steps with fewer
    operations."""
    k, length = store.shape
    p = pipe.p
    own = pipe.check_bound(length)
    if own <= 2.5e-6 and p in (1.0, 2.0, math.inf):
        norms, eps = check.to(torch.float64), own  # short rows: the check is accurate
    elif p != 2.0 and p <= 4 and store.dtype == torch.float32 and k * length <= 1 << 16:
        # few values: float64 accumulation (no power of fp32 values over/underflows it)
        norms = torch.linalg.vector_norm(store, p, dim=1, dtype=torch.float64)
        eps = 1.01 * (num.gamma(length + 1024, num.unit_roundoff(torch.float64)) / p)
    else:  # p = 2: blocked fp32 norms combined in float64 (as fast as one norm)
        norms, eps = num.accurate_norms(store, p, check)
    margin = pipe.margins(length, eps, False)[0]
    same = pipe.verifies(length, eps, False)[0]
    factors = _aim_over(max(pipe.bounds.hi * (1.0 - margin) - pipe.absolute(length), 0.0), norms)
    if same:  # aim under by the check's observed (or typical) error: see Pipeline.factors
        cap = 1e-3
        slack = (check.to(torch.float64) / norms - 1).abs_().mul_(2)
        typical = min(2 * math.sqrt(length) * num.unit_roundoff(pipe.acc), cap)
        factors /= slack.clamp_(min=typical, max=cap).add_(1)
    tiny = 2.0 ** (-100 if store.dtype == torch.float32 else -1000)
    if float(factors.min()) < tiny:  # extreme factors: in two steps
        _scale_rows_(store, factors, pipe.work)
    else:
        store.mul_(factors.to(store.dtype).unsqueeze(1))
    if same:
        rows = _Gathered(store)
        hi = num.floor_to(pipe.bounds.hi, pipe.acc)
        if bool((num.check_norms(store, p, 1) > hi).any()):
            _settle_cpu(pipe, rows, True, False)


def _cpu_scale_plain(
    pipe: Pipeline, store: Tensor, check: Tensor, route: _Plain
) -> tuple[Tensor, bool]:
    """`_cpu_scale` on the plain route (every row over the bound, `pipe.plain_route`):
    one norm, one multiply, and where the check is not proven, one verification.
    Returns the per-row factors (in the rows' dtype) and whether any row then needed
    settling (its values are no longer the rows times those factors)."""
    if route.kind == "check":
        norms = check.to(torch.float64, copy=True)
    else:
        norms = num.blocked_norms(store)
    factors = _aim_over(route.aim, norms).to(store.dtype)
    store.mul_(factors.unsqueeze(1))
    if route.same and float(num.check_norms(store, pipe.p, 1).max()) > pipe.bounds.hi:
        _settle_cpu(pipe, _Gathered(store), True, False)
        return factors, True
    return factors, False


def _aim_over(aim: float, norms: Tensor) -> Tensor:
    """`aim / norms` in float64, one rounding (not `aim * (1 / norms)`: the reciprocal
    of a subnormal norm overflows)."""
    return torch.full_like(norms, aim, dtype=torch.float64).div_(norms)


# A float32 subnormal: `x * 1` flushes it to zero only where the CPU flushes subnormals
# (`torch.set_flush_denormal(True)`).
_SUBNORMAL = torch.full((1,), 2.0**-140, dtype=torch.float32)


def _multiply_by_one_is_exact(check: Tensor) -> bool:
    """Whether multiplying rows whose check norms are `check` by exactly 1 leaves every
    bit of them alone: true unless a row holds NaN (a signaling NaN would be quieted)
    or subnormals are flushed."""
    return math.isfinite(float(check.sum())) and float(_SUBNORMAL.mul(1.0)) != 0.0


def _in_place_factors(n: int, chosen: _Selection, route: _Plain, dtype: torch.dtype) -> Tensor:
    """Per-row factors in `dtype` for the plain route's proven "check" kind: those of
    `_cpu_scale_plain` on the selected rows, exactly 1 elsewhere."""
    f = torch.ones(n, dtype=torch.float64, device=chosen.check.device)
    f.index_copy_(0, chosen.rows, _aim_over(route.aim, chosen.check.to(torch.float64)))
    return f.to(dtype)


def _cpu_scale(
    pipe: Pipeline,
    store: Tensor,
    check: Tensor,
    over: Tensor | None,
    under: Tensor | None,
    prove: bool,
) -> None:
    """Scale gathered rows (`(k, length)`, all selected) in place, then verify them with
    the checks that do not hold by construction and settle the ones out of bound."""
    if over is None:  # every row over, finite check norms
        if pipe.plain:  # real fp32/fp64: the short path
            _cpu_scale_over(pipe, store, check)
            return
        # fp16/bf16 and complex: the general steps (the float64 check is verified too)
        over = torch.ones(store.shape[0], dtype=torch.bool, device=store.device)
        under = ~over
    assert under is not None
    k, length = store.shape
    norms, eps = num.accurate_norms(store, pipe.p, check)
    every = torch.ones(k, dtype=torch.bool, device=store.device)
    margins = pipe.margins(length, eps, prove)
    aim = check if pipe.verifies(length, eps, prove)[0] else None
    factors = pipe.factors(norms, over, under, every, margins, aim, length)
    rows = _Gathered(store)
    rows.scale(None, factors, pipe.work)
    same, wide = pipe.verifies(length, eps, prove)
    _settle_cpu(pipe, rows, same, wide)
    if pipe.bounds.lo > 0 and pipe.rate_one:
        _lift_cpu(pipe, rows, every, same, wide)


class _Selection(NamedTuple):
    """The slices the CPU strategy scales: their indices and, for each, its check norm
    and whether it is over the bound (else under the lower one); `over` is `None` when
    all are over and their check norms are finite (the common case)."""

    rows: Tensor
    check: Tensor
    over: Tensor | None
    under: Tensor | None
    top: float  # the largest check norm when all are over and finite


def _cpu_select(
    pipe: Pipeline,
    check: Tensor,
    length: int,
    gather: Any,
    skip: Tensor | None,
    stats: Stats | None,
) -> _Selection | None:
    """Which slices to scale, from their check norms (re-measured on a rescaled float64
    copy where they over- or underflowed); `None` when none.

    Without a lower bound this is one comparison over all slices (NaN compares False:
    a slice holding NaN is left alone; inf is re-measured: overflow or an inf value);
    everything else touches the selected slices only.
    """
    if skip is not None and bool(skip):  # a skipped step (the host reads it: CPU)
        if stats is not None:
            stats.add(torch.zeros(1, dtype=torch.bool), check)
        return None
    b = pipe.bounds
    if b.lo == 0 and pipe.judges(length):  # one comparison decides
        idx = (check > num.floor_to(b.hi, check.dtype)).nonzero().squeeze(1)
        over, top = None, 0.0
        if idx.numel():
            picked = check.index_select(0, idx)
            top = float(picked.max())
            if top == math.inf:
                inf = torch.isinf(picked)
                again = num.rescaled_norms(gather(idx[inf]), pipe.p)
                keep = torch.ones_like(inf)
                keep[inf] = torch.isfinite(again) & (again > b.hi)
                idx, picked = idx[keep], picked[keep]
                over = torch.ones(idx.numel(), dtype=torch.bool)  # general path: inf checks
        if stats is not None:
            stats.add_counts(idx.numel(), check)
        if idx.numel() == 0:
            return None
        return _Selection(idx, picked, over, None if over is None else ~over, top)
    decision = check.to(torch.float64)
    suspect = pipe.suspects(check, length)
    if bool(suspect.any()):
        sus = suspect.nonzero().squeeze(1)
        decision[sus] = num.rescaled_norms(gather(sus), pipe.p)
    over, under, _, selected = pipe.classify(decision, None, length)
    if stats is not None:
        stats.add(selected, decision)
    idx = selected.nonzero().squeeze(1)
    if idx.numel() == 0:
        return None
    return _Selection(idx, check.index_select(0, idx), over[idx], under[idx], math.inf)


def _rows_in_place(
    pipe: Pipeline, rows: Tensor, check: Tensor, stats: Stats | None, whole: bool
) -> bool | None:
    """The plain route's proven "check" kind with many rows over (or none, or a tensor
    of at most `IN_PLACE_NUMEL` values, where one multiply costs less than listing the
    rows over, gathering and scattering them; `whole`: `rows` is the tensor itself,
    not a copy of some of its rows that is then written back): factors
    for every row straight from the check norms (exactly 1 where in bound) and one
    multiply of `rows`, without listing the rows over. Returns whether `rows` were
    written, or `None`, having written nothing, where this does not apply."""
    n, length = rows.shape
    hi = pipe.over_threshold(length)
    if hi is None:
        return None
    # As `_cpu_select` decides: over the bound (inf: re-measured there, NaN: left alone).
    over = check > hi
    count = int(over.sum())
    if count == 0:
        if stats is not None:
            stats.add_counts(0, check)
        return False
    if 4 * count < n and (rows.numel() > IN_PLACE_NUMEL or not whole):  # listing costs less
        return None
    top = float(check.max())  # NaN where a row holds NaN, inf where one holds inf
    if not math.isfinite(top) or float(_SUBNORMAL.mul(1.0)) == 0.0:
        return None  # multiplying by 1 would not be exact (`_multiply_by_one_is_exact`)
    route = pipe.plain_route(length, top)
    if route is None or route.kind != "check" or route.same:
        return None
    scaled = _aim_over(route.aim, check.to(torch.float64))  # as `_in_place_factors`
    factors = torch.where(over, scaled, 1.0).to(rows.dtype)
    if stats is not None:
        stats.add_counts(count, check)
    rows.mul_(factors.unsqueeze(1))
    return True


def cpu_rows(
    pipe: Pipeline,
    rows: Tensor,
    name: str,
    check_nonfinite: bool,
    stats: Stats | None,
    skip: Tensor | None,
    index: Tensor | None = None,
) -> None:
    """The CPU strategy on a `(slices, length)` view (or on its rows `index`): one
    norm over every row; the rows out of bound are gathered into a bounded scratch
    buffer (in chunks), scaled, verified and written back. Nothing is written when no
    row is out of bound."""
    del name, check_nonfinite  # checked before anything is written (raise_if_nonfinite)
    source = rows if index is None else rows.index_select(0, index)
    length = source.shape[1]
    check = num.check_norms(source, pipe.p, 1)
    # (a skipped step, which the host reads on CPU, is `_cpu_select`'s to record)
    live = skip is None or not bool(skip)
    done = _rows_in_place(pipe, source, check, stats, index is None) if live else None
    if done is not None:
        if done and index is not None:  # `source` is a copy of the rows `index`
            rows.index_copy_(0, index, source)
        return
    chosen = _cpu_select(pipe, check, length, lambda i: source.index_select(0, i), skip, stats)
    if chosen is None:
        return
    route = None if chosen.over is not None else pipe.plain_route(length, chosen.top)
    # (the proven "check" route with many rows over was taken by `_rows_in_place`)
    # Many rows over on the plain route: the gathered rows are scaled and verified,
    # but written back by one multiply of every row (by the same factors, so with the
    # same bits; exactly 1 where not selected) instead of a scatter, which costs more
    # than that multiply from about a quarter of the rows on.
    in_place = (
        route is not None
        and index is None
        and 4 * chosen.rows.numel() >= source.shape[0]
        and _multiply_by_one_is_exact(check)
    )
    every = None
    if in_place:
        every = torch.ones(source.shape[0], dtype=source.dtype, device=source.device)
    # The plain route gathers blocks that stay in a core's cache for its three passes.
    step = max(1, (PLAIN_NUMEL if route is not None else GATHER_NUMEL) // max(length, 1))
    for start in range(0, chosen.rows.numel(), step):
        part = slice(start, start + step)
        idx = chosen.rows[part]
        k = idx.numel()
        if k * length > 4 * GATHER_NUMEL:  # a single slice larger than the scratch
            buf = torch.empty((k, length), dtype=source.dtype, device=source.device)
        else:
            buf = _POOL.get("gather", source.dtype, source.device, k * length).view(k, length)
        torch.index_select(source, 0, idx, out=buf)
        over = None if chosen.over is None else chosen.over[part]
        under = None if chosen.under is None else chosen.under[part]
        if route is not None:
            factors, settled = _cpu_scale_plain(pipe, buf, chosen.check[part], route)
            if every is not None and not settled:  # written by the multiply below
                every.index_copy_(0, idx, factors)
                continue
        else:
            _cpu_scale(pipe, buf, chosen.check[part], over, under, False)
        # (rows settled here keep factor 1 in `every`: the multiply leaves them alone)
        rows.index_copy_(0, idx if index is None else index.index_select(0, idx), buf)
    if every is not None:
        rows.mul_(every.unsqueeze(1))


def cpu_batch(
    pipe: Pipeline, batch: Batch, check_nonfinite: bool, stats: Stats | None, skip
) -> None:
    """The CPU strategy on small tensors: one norm over their concatenation (a copy in
    a scratch buffer), the rows out of bound scaled there, and the tensors holding any
    of them copied back."""
    del check_nonfinite  # checked before anything is written (raise_if_nonfinite)
    first = batch.tensors[0]
    total = sum(batch.sizes)
    cat = _POOL.get("batch", first.dtype, first.device, total * batch.length).view(total, -1)
    shaped = cat.view(total, *first.shape[1:])  # the members' own trailing shape
    torch.cat(batch.tensors, out=shaped)
    check = num.check_norms(cat, pipe.p, 1)
    chosen = _cpu_select(
        pipe, check, batch.length, lambda i: cat.index_select(0, i), skip, stats
    )
    if chosen is None:
        return
    route = None if chosen.over is not None else pipe.plain_route(batch.length, chosen.top)
    if (
        route is not None
        and route.kind == "check"
        and not route.same
        and _multiply_by_one_is_exact(check)
    ):
        # Short rows, the bound proven without verification: the tensors holding a
        # selected row are multiplied in place (by exactly 1 where not selected), in one
        # foreach call; nothing is gathered or copied back.
        factors = _in_place_factors(total, chosen, route, first.dtype)
        parts = factors.view((-1,) + (1,) * (first.dim() - 1)).split(batch.sizes)
        counts = torch.bincount(batch.owner.index_select(0, chosen.rows), minlength=len(parts))
        touched = [j for j, k in enumerate(counts.tolist()) if k]
        torch._foreach_mul_([batch.tensors[j] for j in touched], [parts[j] for j in touched])
        return
    idx = chosen.rows
    buf = _POOL.get("gather", first.dtype, first.device, idx.numel() * batch.length)
    buf = buf.view(idx.numel(), batch.length)
    torch.index_select(cat, 0, idx, out=buf)
    if route is not None:
        _cpu_scale_plain(pipe, buf, chosen.check, route)
    else:
        _cpu_scale(pipe, buf, chosen.check, chosen.over, chosen.under, False)
    cat.index_copy_(0, idx, buf)
    touched = batch.owner.index_select(0, idx).unique().tolist()
    if len(touched) * 4 >= len(batch.tensors):
        # Most tensors changed: one call copies every tensor back (rows left alone are
        # copied with their exact bits).
        torch.split_with_sizes_copy(shaped, batch.sizes, dim=0, out=batch.tensors)
    else:
        starts = [0]
        for size in batch.sizes:
            starts.append(starts[-1] + size)
        for j in touched:
            batch.tensors[j].copy_(shaped[starts[j] : starts[j + 1]])


def cpu_generic(
    pipe: Pipeline, item: Generic, check_nonfinite: bool, stats: Stats | None, skip
) -> None:
    """Any layout: slices gathered through a permuted view, written back with
    `index_put_`; the check is verified on the tensor's own layout."""
    t, dims = item.tensor, item.dims
    keep = tuple(d for d in range(t.dim()) if d not in dims)
    keep_shape = tuple(t.shape[d] for d in keep)
    norm_shape = tuple(t.shape[d] for d in dims)
    length = math.prod(norm_shape)
    moved = t.permute(*keep, *dims)

    def layout_check() -> Tensor:
        return user_check(t, pipe.p, dims, keepdim=True).permute(*keep, *dims).reshape(-1)

    def at(idx: Tensor) -> tuple[Tensor, ...]:
        return torch.unravel_index(idx, keep_shape) if keep else ()

    def gather(idx: Tensor) -> Tensor:
        if not keep:
            return moved.reshape(1, length).clone()
        return moved[at(idx)].reshape(idx.numel(), length)

    def write(idx: Tensor, values: Tensor) -> None:
        values = values.reshape(values.shape[0], *norm_shape)
        if keep:
            moved.index_put_(at(idx), values)
        else:
            moved.copy_(values[0])

    del check_nonfinite  # checked before anything is written (raise_if_nonfinite)
    chosen = _cpu_select(pipe, layout_check(), length, gather, skip, stats)
    if chosen is None:
        return
    idx = chosen.rows
    buf = gather(idx).contiguous()
    _cpu_scale(pipe, buf, chosen.check, chosen.over, chosen.under, prove=False)
    write(idx, buf)
    same, _ = pipe.verifies(length, 0.0, prove=False)
    lift = pipe.bounds.lo > 0 and pipe.rate_one and pipe.judges(length)
    if not (same or lift):
        return
    # The check on this layout may round differently from the gathered copy: verify on
    # the layout itself; shrink the slices that fail there and, with a lower bound, push
    # up the ones it reads below the acceptance bound (the upper bound wins in the end).
    hi, accept = pipe.bounds.hi, pipe.accept(length)
    for step in range(_SETTLE_STEPS + 64):
        now = layout_check().index_select(0, idx).to(torch.float64)
        high = now > hi
        low = (now < accept) & (now > 0) & ~high if lift and step < _SETTLE_STEPS else None
        if not bool(high.any()) and (low is None or not bool(low.any())):
            return
        change = torch.where(high, _shrink(pipe, now, length, step), torch.ones_like(now))
        if low is not None:
            change = torch.where(low, (accept / now) * (1 + 4 * pipe.u_work), change)
            high = high | low
        pick = high.nonzero().squeeze(1)
        bad = idx.index_select(0, pick)
        rows = _Gathered(gather(bad).contiguous())
        rows.scale(None, change.index_select(0, pick), pipe.work)
        write(bad, rows.store)
    raise AssertionError("max-norm projection: settling did not converge")  # unreachable


# -- sync-free strategy (accelerators, torch.compile) ------------------------------------------
def _accurate_all(pipe: Pipeline, rows: Tensor) -> tuple[Tensor, float]:
    """float64 norms of every row with a proven error bound, without host syncs, in
    chunks of bounded size (eager) or whole (compiled, where Inductor fuses)."""
    s, length = rows.shape
    if pipe.p == math.inf and not rows.is_complex():
        if length == 0:
            return rows.new_zeros(s, dtype=torch.float64), 0.0
        return rows.abs().amax(dim=1).to(torch.float64), 0.0
    # fp32 values to a power p <= 4 neither over- nor underflow float64.
    fast = not rows.is_complex() and rows.dtype != torch.float64 and pipe.p <= 4
    if fast:
        u64 = num.unit_roundoff(torch.float64)
        eps = 1.01 * (num.gamma(length + 1024, u64) / pipe.p + 1024 * u64)
    else:
        eps = num.rescaled_bound(length, pipe.p, rows.is_complex())

    def one(block: Tensor) -> Tensor:
        if fast:
            return torch.linalg.vector_norm(block, pipe.p, dim=1, dtype=torch.float64)
        return num.rescaled_norms(block, pipe.p)

    if torch.compiler.is_compiling() or s * length <= SCRATCH_NUMEL or s == 1:
        return one(rows), eps
    step = max(1, SCRATCH_NUMEL // max(length, 1))
    return torch.cat([one(rows[i : i + step]) for i in range(0, s, step)]), eps


def where_scale_(
    rows: Tensor, selected: Tensor, factors: Tensor | num.Factors, pipe: Pipeline
) -> None:
    """Scale the selected rows by `factors`, leaving every other row's bits as they
    are (`torch.where`, never a multiplication by 1), without host syncs."""
    if isinstance(factors, Tensor):
        factors = num.factors_of(factors)
    first, second = num.split_factors(factors, pipe.work)

    def apply(block: Tensor, sel: Tensor, a: Tensor, b: Tensor) -> None:
        view = _work_view(block)
        shape = (-1,) + (1,) * (view.dim() - 1)
        scaled = (view.to(pipe.work) * a.view(shape)) * b.view(shape)
        view.copy_(torch.where(sel.view(shape), scaled.to(view.dtype), view))

    s, length = rows.shape
    if torch.compiler.is_compiling() or s * length <= SCRATCH_NUMEL:
        apply(rows, selected, first, second)
        return
    step = max(1, SCRATCH_NUMEL // max(length, 1))
    for i in range(0, s, step):
        apply(rows[i : i + step], selected[i : i + step], first[i : i + step], second[i : i + step])


def sync_free_rows(
    pipe: Pipeline,
    rows: Tensor,
    name: str,
    check_nonfinite: bool,
    stats: Stats | None,
    skip: Tensor | None,
    prove: bool = False,
) -> None:
    """The sync-free strategy on a `(slices, length)` tensor (or a copy of one).

    `prove`: aim with margins that make every check hold by construction, without
    verifying (for rows that are a copy of another layout, where the user's check
    would run on that layout)."""
    length = rows.shape[1]
    check = user_check(rows, pipe.p, (1,))
    accurate, eps = _accurate_all(pipe, rows)
    decision = torch.where(pipe.suspects(check, length), accurate, check.to(torch.float64))
    over, under, nonfinite, selected = pipe.classify(decision, skip, length)
    if check_nonfinite and bool(nonfinite.any()):  # a sync, as error_if_nonfinite asks
        raise nonfinite_error(name)
    if stats is not None:
        stats.add(selected, decision)
    margins = pipe.margins(length, eps, prove)
    aim = check if pipe.verifies(length, eps, prove)[0] else None
    factors = pipe.factors(accurate, over, under, selected, margins, aim, length)
    where_scale_(rows, selected, factors, pipe)
    same, wide = pipe.verifies(length, eps, prove)
    lift = pipe.bounds.lo > 0 and pipe.rate_one and pipe.judges(length) and not prove
    if not (same or wide or lift):
        return
    # Verification with the user's check (no host sync, so a fixed number of rounds):
    # slices that fail it shrink, and scaled slices it reads below the lower acceptance
    # bound are pushed up where provably safe. With a lower bound, three rounds aim
    # (a few ulps) and the last is provably sufficient; without, only the last.
    terms = 2 * length if pipe.complex else length
    typical = max(8 * pipe.u_work, math.sqrt(terms) * num.unit_roundoff(pipe.acc))
    cap = (1 - pipe.accept(length) / pipe.bounds.hi) / 4 if pipe.bounds.lo > 0 else 1e-3
    for round_, last in enumerate((False, False, False, True) if lift else (True,)):
        now = user_check(rows, pipe.p, (1,)).to(torch.float64) if (same or lift) else None
        upper = torch.full_like(decision, -math.inf)
        if same:
            assert now is not None
            upper = now
        if wide:
            again, eps64 = _accurate_all(pipe, rows)
            upper = torch.maximum(upper, again * (1 + 2 * eps64))
        fail = selected & (upper > pipe.bounds.hi)
        if last:
            shrink = pipe.safe_shrink(upper, length)
        else:
            # a growing share of the check's typical rounding under the bound, so that
            # a slice whose check rounds unevenly from one scale to the next settles
            # within the band before the provable (and coarser) last round
            under_by = min(typical * 4.0**round_, cap)
            shrink = (pipe.bounds.hi / upper.clamp(min=1e-300)) * (1 - under_by)
        change = torch.where(fail, shrink.clamp(min=0.0, max=1.0), torch.ones_like(upper))
        if lift:
            assert now is not None
            grow = pipe.safe_grow(now, length)
            low = selected & ~fail & (now > 0) & (now < pipe.accept(length)) & (grow > 1)
            change = torch.where(low, grow, change)
            fail = fail | low
        where_scale_(rows, fail, change, pipe)


def sync_free_batch(
    pipe: Pipeline, batch: Batch, check_nonfinite: bool, stats: Stats | None, skip
) -> None:
    cat = torch.cat(batch.tensors)
    sync_free_rows(pipe, cat.view(cat.shape[0], -1), batch.names[0], check_nonfinite, stats, skip)
    # Rows left alone are copied back with their exact bits.
    torch._foreach_copy_(batch.tensors, list(cat.split(batch.sizes)))


def sync_free_generic(
    pipe: Pipeline, item: Generic, check_nonfinite: bool, stats: Stats | None, skip
) -> None:
    """Any layout, on accelerators: a row-major copy, projected with margins that hold
    by construction (the user's check runs on the original layout), copied back."""
    t, dims = item.tensor, item.dims
    keep = tuple(d for d in range(t.dim()) if d not in dims)
    length = math.prod(t.shape[d] for d in dims)
    moved = t.permute(*keep, *dims)
    rows = moved.reshape(-1, length).clone()
    sync_free_rows(pipe, rows, item.name, check_nonfinite, stats, skip, prove=True)
    moved.copy_(rows.view(moved.shape))



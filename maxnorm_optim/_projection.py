r"""The max-norm projection's entry points.

[`project_`][maxnorm_optim._projection.project_] projects validated tensors: the
dense ones through their [`Plan`][maxnorm_optim._plans.Plan], `DTensor`s through
[`_dtensor`][maxnorm_optim._dtensor]. [`max_norm_`][maxnorm_optim.max_norm_] is the
public function: every check first (tensors, options, `norm_dim` fit, overlaps),
then the projection.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _kernels as kn
from ._kernels import ProjectionStats
from ._options import PER_UNIT, MaxNormOptions, NormDim, parse_arguments
from ._plans import Plan, is_dtensor, make_plan, plan_key, project_dense_

__all__ = [
    "ProjectionStats",
    "check_tensor",
    "max_norm_",
    "project_",
    "raise_if_nonfinite",
]


@torch.no_grad()
def project_(
    tensors: Sequence[Tensor],
    options: MaxNormOptions,
    *,
    names: Sequence[str] | None = None,
    rows: dict[int, Tensor] | None = None,
    track_stats: bool = False,
    skip: Tensor | None = None,
    plan: Plan | None = None,
) -> ProjectionStats | None:
    """Project `tensors` in place with validated `options`.

    Args:
        tensors: distinct dense tensors or DTensors; `norm_dim` must fit each.
        options: the group's options.
        names: names for error messages, one per tensor.
        rows: `{index into tensors: 1-d index tensor}`; those tensors are projected only
            on the listed rows of their `(slices, length)` view (sparse steps).
        track_stats: return a [`ProjectionStats`][maxnorm_optim._kernels.ProjectionStats].
        skip: 0-d tensor; where nonzero, nothing is changed (a step that
            `torch.amp.GradScaler` skipped for inf gradients; no host sync).
        plan: a [`make_plan`][maxnorm_optim._plans.make_plan] of the same tensors.
    """
    stats = kn.Stats() if track_stats else None
    device = tensors[0].device if tensors else None
    if not options.active:
        return stats.result(device) if stats else None
    if plan is None:
        plan = make_plan(tensors, options.norm_dim, names, rows or ())
    if plan.dtensors:
        from ._dtensor import project_dtensors_

        dts = [tensors[i] for i in plan.dtensors]
        names_dt = [plan.names[i] for i in plan.dtensors]
        project_dtensors_(dts, options, names_dt, stats, skip)  # type: ignore[arg-type]
    project_dense_(plan, tensors, options, rows=rows, stats=stats, skip=skip)
    return stats.result(device) if stats else None


def _distinct(tensors: list[Tensor]) -> list[int]:
    """The positions of `tensors` to project: repeats of the same view dropped; raises
    on distinct views that overlap in memory (projecting them one after the other
    would scale shared elements twice)."""
    out: list[int] = []
    seen: set[tuple[Any, ...]] = set()
    spans: dict[int, list[tuple[int, int, int]]] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t):
            key: tuple[Any, ...] = ("dtensor", id(t))
        else:
            key = (t.data_ptr(), t.dtype, t.shape, t.stride(), t.device)
        if key in seen:
            continue
        seen.add(key)
        out.append(i)
        # Only contiguous views have exact memory spans (strided ones may interleave).
        if not is_dtensor(t) and t.numel() and t.is_contiguous():
            size = t.element_size()
            start = t.data_ptr()
            extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            spans.setdefault(t.untyped_storage().data_ptr(), []).append(
                (start, start + (extent + 1) * size, i)
            )
    for group in spans.values():
        group.sort()
        for (_, end, j), (begin, _, i) in itertools.pairwise(group):
            if begin < end:
                raise ValueError(
                    f"max_norm_: tensors {min(i, j)} and {max(i, j)} overlap in memory without "
                    "being the same view; pass each weight once"
                )
    return out


class _PlanCache(threading.local):
    """The plans of the last few `max_norm_` calls (with the positions kept after
    dropping repeats), by `plan_key`. A plan holds no tensor (layout only), so the cache
    keeps no weight alive, and a plan found by key is right for whatever tensors have
    that layout."""

    size = 8

    def __init__(self) -> None:
        self.entries: dict[Any, tuple[Plan, list[int]]] = {}

    def get(self, key: Any) -> tuple[Plan, list[int]] | None:
        plan = self.entries.pop(key, None)
        if plan is not None:
            self.entries[key] = plan  # most recent last
        return plan

    def put(self, key: Any, entry: tuple[Plan, list[int]]) -> None:
        while len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = entry


_PLANS = _PlanCache()
_PLAIN = (float, int, bool, str, type(None), tuple)
_OPTIONS: dict[tuple[Any, ...], MaxNormOptions] = {}


def max_norm_(
    tensors: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_dim: NormDim = PER_UNIT,
    norm_type: float = 2.0,
    *,
    min_norm: float = 0.0,
    rate: float = 1.0,
    error_if_nonfinite: bool = False,
) -> None:
    r"""Project each slice of `tensors` in place onto the p-norm ball of radius `max_norm`.

    A slice $v$ with $\|v\|_p > c$ is scaled to a norm just inside $c$ (no
    $c / (\epsilon + n)$ shrinkage); every other slice is left bitwise unchanged.
    After the call, `torch.linalg.vector_norm(t, norm_type, dim=...)` of every scaled
    slice is `<= max_norm`, in the tensor's dtype (fp32 for fp16/bf16) and in float64.

    Args:
        tensors: a tensor or an iterable of tensors, projected in place; a tensor given
            twice is projected once.
        max_norm: the bound $c > 0$; `math.inf` with `min_norm=0` is a no-op.
        norm_dim: the dims each norm runs over, as `dim` of
            `torch.linalg.vector_norm` (int or tuple, negatives allowed); `None` for
            the whole tensor; default `"per_unit"`: every dim but dim 0 of tensors with
            two or more dims (tensors with fewer are left unchanged).
        norm_type: $p$ of the p-norm, `>= 1` or `math.inf`. Default: 2.
        min_norm: lower bound; slices with $0 < n < c_{\min}$ are scaled up. Default: 0.
        rate: move only this share of the way to the bound (Keras `MinMaxNorm`),
            `0 < rate <= 1`. Default: 1.
        error_if_nonfinite: raise if a slice holds NaN or inf, before anything is
            written (else such slices are left as they are). Default: `False`.

    Raises:
        TypeError: a non-tensor, a sparse or integer tensor, or an option of the wrong type.
        ValueError: an option out of range or a `norm_dim` that does not fit a tensor.
            Every check runs before anything is written.

    Examples:
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> max_norm_(w, 1.0)
        >>> torch.linalg.vector_norm(w, dim=1)
        tensor([1.0000, 0.5000])
    """
    items = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    raw = (max_norm, min_norm, rate, norm_dim, norm_type, error_if_nonfinite)
    # Options already validated, keyed by value *and* type (1 and True hash alike);
    # only plain Python values are kept (never an array or a tensor).
    typed = tuple((type(v), v) for v in raw)
    cacheable = all(type(v) in _PLAIN for v in raw) and (
        type(norm_dim) is not tuple or all(type(d) is int for d in norm_dim)
    )
    options = _OPTIONS.get(typed) if cacheable else None
    if options is None:
        options = parse_arguments(
            "max_norm_",
            max_norm=max_norm,
            norm_dim=norm_dim,
            norm_type=norm_type,
            min_norm=min_norm,
            rate=rate,
            error_if_nonfinite=error_if_nonfinite,
        )
        if cacheable:
            if len(_OPTIONS) >= 32:
                _OPTIONS.clear()  # (one call: safe while other threads read or add)
            _OPTIONS[typed] = options
    if options.max_norm is None:
        raise TypeError("max_norm_: max_norm must be a real number, but got None")
    compiling = torch.compiler.is_compiling()
    try:
        dense = not compiling and not any(map(is_dtensor, items))
        key = plan_key(items, options.norm_dim) if dense else None
    except (AttributeError, RuntimeError, TypeError):
        key = None  # not all dense tensors: the checks below say which
    cached = _PLANS.get(key) if key is not None else None
    if cached is None:
        # Every check before anything is written; a cached plan passed them already
        # (same layouts, so the same checks and overlaps).
        for i, t in enumerate(items):
            check_tensor(t, f"max_norm_: tensor {i}")
        kept = _distinct(items)
        plan = make_plan([items[i] for i in kept], options.norm_dim)  # raises if no fit
        if key is not None:
            _PLANS.put(key, (plan, kept))
    else:
        plan, kept = cached
    if len(kept) != len(items):
        items = [items[i] for i in kept]
    if options.error_if_nonfinite:
        raise_if_nonfinite(plan, items, options)
    project_(items, options, plan=plan)


def check_tensor(t: Any, where: str) -> None:
    """Raise `TypeError` unless `t` is a dense (or DTensor) floating or complex tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{where} is {type(t).__name__}, not a tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{where} has layout {t.layout}; only dense tensors can be projected")
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{where} has dtype {t.dtype}; only floating and complex tensors")


def raise_if_nonfinite(
    plan: Plan,
    tensors: Sequence[Tensor],
    options: MaxNormOptions,
    rows: dict[int, Tensor] | None = None,
) -> None:
    """The all-or-nothing check of `error_if_nonfinite`: every slice first (for tensors
    with selected rows, those rows), so that nothing is written when a slice holds NaN
    or inf; for `DTensor`s every rank takes the same decision."""
    p = options.norm_type
    bound = plan.bind(tensors)
    for item in bound.rows:
        if not bool(_finite_slices(item.rows, p, (1,)).all()):
            raise kn.nonfinite_error(item.name)
    for gen in bound.generic:
        if not bool(_finite_slices(gen.tensor, p, gen.dims).all()):
            raise kn.nonfinite_error(gen.name)
    for batch in bound.batches:
        for t, name in zip(batch.tensors, batch.names):
            if not bool(_finite_slices(t, p, (1,)).all()):
                raise kn.nonfinite_error(name)
    for i, sel in bound.selected.items():
        view = sel.tensor.view(sel.tensor.shape[0], -1)
        touched = view if rows is None else view.index_select(0, rows[i])
        if not bool(_finite_slices(touched, p, (1,)).all()):
            raise kn.nonfinite_error(sel.name)
    if bound.dtensors:  # agreed on by every rank (one all-reduce per mesh)
        from ._dtensor import raise_if_nonfinite as raise_if_nonfinite_dtensors

        raise_if_nonfinite_dtensors(bound.dtensors)  # type: ignore[arg-type]


def _finite_slices(t: Tensor, p: float, dims: tuple[int, ...]) -> Tensor:
    """Whether each slice holds only finite values (NaN/inf propagate through amax)."""
    del p
    return torch.isfinite(t.abs().amax(dim=dims) if t.numel() else t.new_zeros(()))

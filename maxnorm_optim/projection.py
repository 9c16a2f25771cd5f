r"""Max-norm projection kernels.

For every slice :math:`v` of a tensor (the elements that share an index outside
``norm_dim``) with p-norm :math:`n = \|v\|_p`, the projection is

.. math::
    v \leftarrow v \cdot \frac{t(n)}{n}, \qquad
    t(n) = r \cdot \mathrm{clamp}(n, c_{min}, c_{max}) + (1 - r)\, n

applied only to slices with :math:`n` outside :math:`[c_{min}, c_{max}]`; every
other slice is left bitwise unchanged. Zero slices and slices holding NaN or inf
are never touched.

The fast paths, chosen per tensor:

* *rows*: when the norm runs over trailing dims of a contiguous tensor, the tensor
  is viewed as ``(slices, slice_len)``. Small tensors with the same device, dtype and
  slice shape have their norms computed in one call, over a scratch buffer of at most
  ``_SCRATCH_NUMEL`` elements per dtype and device (kept by the wrapper's cached plan).
* on CPU only the slices that exceed the bound are written (a host sync is free
  there); on accelerators and under ``torch.compile`` every slice is multiplied by
  its factor (1 for in-bound slices, which is exact) so that no sync is needed.
* *generic*: any other ``norm_dim`` uses ``vector_norm(..., keepdim=True)`` and one
  broadcast multiply.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .validation import PER_UNIT, NormDim, normalize_options, resolve_norm_dim

__all__ = ["ProjectionStats", "max_norm_", "project_"]

# Tensors up to this many elements are batched with others of the same slice length.
_SMALL_NUMEL = 1 << 16
# Largest scratch buffer (in elements) used to batch the norms of small tensors.
_SCRATCH_NUMEL = 1 << 18
# Scaled slices aim this many ulps (of the norm's dtype) inside the bound, so that the
# norm recomputed by the user in the same dtype does not come out above it. For p = 2
# and inf this covers the rounding of the norm; for other p the projection is repeated
# with wider margins (_EXTRA_PASS_ULPS) to settle slices that still come out above.
_SAFETY_ULPS = 4
_EXTRA_PASS_ULPS = (16, 128)


class ProjectionStats(NamedTuple):
    """Counters of one projection, as tensors on the parameters' device (no sync).

    Args:
        projected: number of slices that were scaled.
        slices: number of slices looked at.
        max_norm_before: the largest slice norm before projection (``-inf`` when no
            slice was looked at).
    """

    projected: Tensor
    slices: Tensor
    max_norm_before: Tensor


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """fp16/bf16 norms are accumulated and returned in fp32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def _sync_free(t: Tensor) -> bool:
    return torch.compiler.is_compiling() or t.device.type != "cpu"


def scale_factors(
    norms: Tensor,
    options: dict[str, Any],
    skip: Tensor | None = None,
    value_dtype: torch.dtype | None = None,
    lazy: bool = False,
) -> Tensor | None:
    r"""Per-slice factors :math:`t(n)/n`, exactly 1 for slices left alone.

    Args:
        norms: slice norms (real floating point).
        options: canonical max-norm options (see :func:`normalize_options`).
        skip: optional 0-d tensor; where nonzero every factor is 1 (a step that
            :class:`torch.amp.GradScaler` skipped for inf gradients).
        value_dtype: dtype of the tensor the factors will scale; for fp16/bf16 the
            target also leaves room for rounding the scaled values to that dtype.
        lazy: return ``None`` when no slice is to be scaled (asks the host, so only
            where a sync costs nothing, i.e. on CPU outside ``torch.compile``).
    """
    hi, lo, rate = options["max_norm"], options["min_norm"], options["rate"]
    eps = torch.finfo(norms.dtype).eps
    margin = eps * options.get("_ulps", _SAFETY_ULPS)
    if value_dtype in (torch.float16, torch.bfloat16):
        margin += torch.finfo(value_dtype).eps / 2
    # Slices holding NaN or inf are left alone: their norm compares as 0 here.
    over = (norms.nan_to_num(posinf=0.0) if math.isfinite(hi) else norms) > hi
    if lo == 0.0 and rate == 1.0:
        target = norms.new_full((), hi * (1.0 - margin))
    else:
        target = norms.clamp(max=hi) * (1.0 - margin)
    if lo > 0:
        # Scaled-up slices land on min_norm within rounding; the band below min_norm
        # keeps them from being scaled again (projecting twice equals once). NaN and
        # inf norms compare False.
        under = (norms < lo * (1.0 - margin - 2 * eps)) & (norms > 0)
        target = torch.where(under, norms.clamp(min=lo), target)
        over |= under
    if skip is not None:
        over &= skip.to(norms.device) == 0
    if lazy and not bool(over.any()):
        return None
    if rate != 1.0:
        target = rate * target + (1.0 - rate) * norms
    return torch.where(over, target / norms, _one(norms.dtype, norms.device))


@functools.cache
def _one(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.ones((), dtype=dtype, device=device)


def _check_finite(norms: Tensor, name: str) -> None:
    if not bool(torch.isfinite(norms).all()):
        raise RuntimeError(
            f"max-norm projection of {name}: a slice norm is non-finite (the slice holds "
            f"NaN or inf). Set error_if_nonfinite=False to leave such slices unchanged."
        )


def _scale_rows_(rows: Tensor, factors: Tensor, small: bool) -> None:
    """Multiply rows of a 2-d view by ``factors``, writing only changed rows on CPU."""
    if _sync_free(rows):
        rows.mul_(factors.unsqueeze(1))
        return
    changed = (factors != 1).nonzero().squeeze(1)
    count = changed.numel()
    if count == 0:
        return
    if small or count * 8 >= rows.shape[0] * 7:
        rows.mul_(factors.unsqueeze(1))
    elif rows.dtype in (torch.float32, torch.float64):
        src = factors.index_select(0, changed).unsqueeze(1).expand(-1, rows.shape[1])
        _quiet_index_reduce_beta_warning()
        rows.index_reduce_(0, changed, src, "prod")
    else:
        sub = rows.index_select(0, changed)
        sub.mul_(factors.index_select(0, changed).unsqueeze(1))
        rows.index_copy_(0, changed, sub)


@functools.cache
def _quiet_index_reduce_beta_warning() -> None:
    """torch warns once per process that ``index_reduce_`` is in beta: let that one
    warning happen here, silenced, rather than in the user's step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.zeros(1).index_reduce_(0, torch.zeros(1, dtype=torch.long), torch.ones(1), "prod")


class _Stats:
    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, Tensor, int]] = []

    def add(self, norms: Tensor, factors: Tensor | None) -> None:
        if norms.numel():
            projected = 0 if factors is None else (factors != 1).sum()
            self.parts.append((projected, norms.max(), norms.numel()))

    def result(self, device: torch.device | None) -> ProjectionStats:
        if not self.parts:
            zero = torch.zeros((), dtype=torch.int64, device=device)
            return ProjectionStats(zero, zero.clone(), torch.full((), -math.inf, device=device))
        dev = self.parts[0][1].device
        projected = torch.as_tensor(sum(p[0] for p in self.parts), device=dev)
        max_before = torch.stack([p[1].to(dev, torch.float32) for p in self.parts]).max()
        slices = torch.tensor(sum(p[2] for p in self.parts), device=dev)
        return ProjectionStats(projected, slices, max_before)


class _Batch(NamedTuple):
    """Tensors whose slice norms are computed in one call (over their concatenation)."""

    tensors: list[Tensor]  # same device and dtype, same trailing (norm) shape
    names: list[str]
    sizes: list[int]  # slices per tensor
    norm_dims: tuple[int, ...]  # dims of each tensor (and of the concatenation) normed over
    rows: Tensor | None  # for a single tensor: its (slices, slice_len) view
    small: bool
    owner: Tensor | None  # for several tensors: index of the tensor each slice is in
    scratch: Tensor | None  # for several tensors: reused buffer their slices are copied to
    factors: Tensor | None  # for several tensors: reused buffer of the slices' factors
    factor_views: list[Tensor]  # its per-tensor views, shaped to broadcast


class Plan(NamedTuple):
    """How a list of tensors is projected; reusable while the tensors stay the same."""

    batches: list[_Batch]
    generic: list[tuple[Tensor, tuple[int, ...] | None, str]]
    selected: dict[int, tuple[Tensor, str]]
    dtensors: list[tuple[Tensor, str]]  # FSDP2 / tensor parallel: see .distributed


def make_plan(
    tensors: Sequence[Tensor],
    norm_dim: NormDim,
    names: Sequence[str] | None = None,
    selected: Iterable[int] = (),
) -> Plan:
    """Group ``tensors`` for :func:`run_plan` (bookkeeping; no tensor math).

    Args:
        tensors: dense tensors or DTensors.
        norm_dim: as for :func:`max_norm_`.
        names: names for error messages, one per tensor (default ``"tensor i"``).
        selected: indices of tensors whose slices are given per call (sparse rows).

    Raises:
        ValueError: if ``norm_dim`` does not fit a tensor (naming it and its shape).
    """
    label = names.__getitem__ if names is not None else "tensor {}".format
    selected = set(selected)
    batchable: dict[tuple[Any, ...], list[tuple[Tensor, str, int]]] = {}
    batches: list[_Batch] = []
    generic: list[tuple[Tensor, tuple[int, ...] | None, str]] = []
    chosen: dict[int, tuple[Tensor, str]] = {}
    dtensors: list[tuple[Tensor, str]] = []
    compiling = torch.compiler.is_compiling()
    layouts: dict[int, tuple[tuple[int, ...] | None, int | None]] = {}
    for i, t in enumerate(tensors):
        ndim = t.dim()
        layout = layouts.get(ndim)
        if layout is None:
            try:
                dims = resolve_norm_dim(norm_dim, ndim)
            except IndexError as err:
                raise ValueError(
                    f"norm_dim={norm_dim!r} does not fit {label(i)} of shape "
                    f"{tuple(t.shape)} ({err})"
                ) from None
            # Slices over trailing dims from `lead` on can be viewed as rows.
            lead = 0 if dims is None else dims[0]
            trailing = dims is None or dims == tuple(range(lead, ndim))
            layout = layouts[ndim] = (dims, lead if trailing and not compiling else None)
        dims, lead = layout
        numel = t.numel()
        if selected and i in selected:
            chosen[i] = (t, label(i))
        elif _is_dtensor(t):
            dtensors.append((t, label(i)))
        elif numel == 0:
            continue
        elif lead is None or not t.is_contiguous():
            generic.append((t, dims, label(i)))
        else:
            if lead != 1:
                t = t.view(-1, *t.shape[lead:]) if lead else t.view(1, -1)
            if numel <= _SMALL_NUMEL:
                key = (t.dtype, t.shape[1:], t.device)
                batchable.setdefault(key, []).append((t, label(i), numel))
            else:
                batches.append(_single(t, label(i), small=False))
    chunks: list[tuple[list[tuple[Tensor, str]], int]] = []
    for members in batchable.values():
        chunk: list[tuple[Tensor, str]] = []
        size = 0
        for t, name, numel in members:
            if chunk and size + numel > _SCRATCH_NUMEL:
                chunks.append((chunk, size))
                chunk, size = [], 0
            chunk.append((t, name))
            size += numel
        chunks.append((chunk, size))
    # Batches run one after another: those of a dtype and device share one scratch buffer.
    need: dict[tuple[torch.dtype, torch.device], int] = {}
    for chunk, size in chunks:
        if len(chunk) > 1:
            key = (chunk[0][0].dtype, chunk[0][0].device)
            need[key] = max(need.get(key, 0), size)
    scratch = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in need.items()}
    for chunk, _ in chunks:
        first = chunk[0][0]
        batches.append(_batch(chunk, scratch.get((first.dtype, first.device))))
    return Plan(batches, generic, chosen, dtensors)


def _single(t: Tensor, name: str, small: bool) -> _Batch:
    dims = tuple(range(1, t.dim()))
    rows = t.view(t.shape[0], -1)
    return _Batch([t], [name], [t.shape[0]], dims, rows, small, None, None, None, [])


def _batch(members: list[tuple[Tensor, str]], flat: Tensor | None) -> _Batch:
    if len(members) == 1 or flat is None:
        return _single(*members[0], small=True)
    tensors = [t for t, _ in members]
    first = tensors[0]
    dims = tuple(range(1, first.dim()))
    sizes = [t.shape[0] for t in tensors]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    device = first.device
    scratch = flat[: sum(t.numel() for t in tensors)].view(-1, *first.shape[1:])
    real = _norm_dtype(first.dtype) or scratch.real.dtype
    factors = torch.empty((sum(sizes), *[1] * len(dims)), dtype=real, device=device)
    return _Batch(
        tensors, [n for _, n in members], sizes, dims, None, True, owner.to(device),
        scratch, factors, list(factors.split(sizes)),
    )  # fmt: skip


@torch.no_grad()
def project_(
    tensors: Sequence[Tensor],
    options: dict[str, Any],
    *,
    names: Sequence[str] | None = None,
    rows: dict[int, Tensor] | None = None,
    track_stats: bool = False,
    skip: Tensor | None = None,
    plan: Plan | None = None,
) -> ProjectionStats | None:
    """Project ``tensors`` in place with already-validated ``options``.

    Args:
        tensors: dense tensors or DTensors; ``norm_dim`` must fit each of them.
        options: canonical max-norm options (see :func:`normalize_options`).
        names: names for error messages, one per tensor.
        rows: optional ``{index in tensors: 1-d index tensor}``; for those tensors only
            the listed slices (rows of a per-unit 2-d view) are projected.
        track_stats: return a :class:`ProjectionStats`.
        skip: optional 0-d tensor; where nonzero nothing is changed (see
            :func:`scale_factors`).
        plan: a :func:`make_plan` of the same tensors (and ``rows`` keys), to reuse.
    """
    stats = _Stats() if track_stats else None
    device = tensors[0].device if tensors else None
    if options["max_norm"] == math.inf and options["min_norm"] == 0.0:
        return stats.result(device) if stats else None
    if plan is None:
        plan = make_plan(tensors, options["norm_dim"], names, rows or ())
    if plan.dtensors:
        from .distributed import project_dtensors_

        dts = plan.dtensors
        project_dtensors_([t for t, _ in dts], options, [n for _, n in dts], stats, skip)
    run_plan(plan, options, rows, stats, skip)
    if options["norm_type"] not in (2.0, math.inf) and options["rate"] == 1.0:
        # Norms other than 2 and inf round less tightly: settle slices that came out a
        # few ulps above the bound (in-bound slices are untouched by these passes).
        for ulps in _EXTRA_PASS_ULPS:
            run_plan(plan, {**options, "_ulps": ulps}, rows, None, skip)
    return stats.result(device) if stats else None


def run_plan(
    plan: Plan,
    options: dict[str, Any],
    rows: dict[int, Tensor] | None = None,
    stats: _Stats | None = None,
    skip: Tensor | None = None,
) -> None:
    """One projection pass over a :class:`Plan`."""
    p = options["norm_type"]
    check = options["error_if_nonfinite"]
    for t, dims, name in plan.generic:
        norms = torch.linalg.vector_norm(t, p, dim=dims, keepdim=True, dtype=_norm_dtype(t.dtype))
        if check:
            _check_finite(norms, name)
        factors = scale_factors(norms, options, skip, t.dtype, lazy=not _sync_free(t))
        if stats is not None:
            stats.add(norms, factors)
        if factors is not None:
            t.mul_(factors)
    for i, (t, name) in plan.selected.items():
        assert rows is not None
        _project_selected_rows(t, rows[i], options, _norm_dtype(t.dtype), name, stats, skip)
    for batch in plan.batches:
        _run_batch(batch, options, check, stats, skip)


def _run_batch(
    batch: _Batch,
    options: dict[str, Any],
    check: bool,
    stats: _Stats | None,
    skip: Tensor | None,
) -> None:
    tensors = batch.tensors
    dtype = tensors[0].dtype
    src = tensors[0] if batch.scratch is None else torch.cat(tensors, out=batch.scratch)
    norms = torch.linalg.vector_norm(
        src, options["norm_type"], dim=batch.norm_dims, dtype=_norm_dtype(dtype)
    )
    if check and not bool(torch.isfinite(norms).all()):
        for name, n in zip(batch.names, norms.split(batch.sizes)):
            _check_finite(n, name)
    factors = scale_factors(norms, options, skip, dtype, lazy=not _sync_free(src))
    if stats is not None:
        stats.add(norms, factors)
    if factors is None:
        return
    if batch.rows is not None:
        _scale_rows_(batch.rows, factors, small=batch.small)
        return
    assert batch.factors is not None and batch.owner is not None
    views = batch.factor_views
    batch.factors.view(-1).copy_(factors)
    if _sync_free(tensors[0]):
        torch._foreach_mul_(tensors, views)
        return
    # CPU: multiply only the tensors with at least one slice to scale.
    todo = batch.owner[factors != 1].unique().tolist()
    if todo:
        torch._foreach_mul_([tensors[k] for k in todo], [views[k] for k in todo])


def _project_selected_rows(
    t: Tensor,
    index: Tensor,
    options: dict[str, Any],
    acc: torch.dtype | None,
    name: str,
    stats: _Stats | None,
    skip: Tensor | None,
) -> None:
    view = t.view(t.shape[0], -1)
    sub = view.index_select(0, index)
    norms = torch.linalg.vector_norm(sub, options["norm_type"], dim=1, dtype=acc)
    if options["error_if_nonfinite"]:
        _check_finite(norms, name)
    factors = scale_factors(norms, options, skip, t.dtype, lazy=not _sync_free(t))
    if stats is not None:
        stats.add(norms, factors)
    if factors is None:
        return
    if _sync_free(t):
        sub.mul_(factors.unsqueeze(1))
        view.index_copy_(0, index, sub)
        return
    changed = (factors != 1).nonzero().squeeze(1)
    if changed.numel():
        scaled = sub.index_select(0, changed).mul_(factors.index_select(0, changed).unsqueeze(1))
        view.index_copy_(0, index.index_select(0, changed), scaled)


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
    r"""Project each slice of ``tensors`` in place onto the p-norm ball of radius ``max_norm``.

    A slice :math:`v` with :math:`\|v\|_p > c` becomes :math:`v \cdot c / \|v\|_p`;
    every other slice is left bitwise unchanged (no ``c / (eps + n)`` shrinkage).

    Args:
        tensors: a tensor or an iterable of tensors, projected in place.
        max_norm: the bound :math:`c > 0`; ``math.inf`` is a no-op.
        norm_dim: the dims each norm runs over, as ``dim`` of
            :func:`torch.linalg.vector_norm` (int or tuple, negatives allowed);
            ``None`` for the whole tensor; default ``"per_unit"``: every dim but dim 0
            (a 0-d or 1-d tensor is one vector).
        norm_type: p of the p-norm, ``>= 1`` or ``math.inf``. Default: 2.
        min_norm: lower bound; slices with ``0 < n < min_norm`` are scaled up. Default: 0.
        rate: move only this fraction of the way to the bound (Keras' ``MinMaxNorm``
            ``rate``), ``0 < rate <= 1``. Default: 1.
        error_if_nonfinite: raise if a slice norm is NaN or inf (else such slices are
            left as they are). Default: ``False``.
    """
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if max_norm is None:
        raise TypeError("max_norm_: max_norm must be a real number, but got None")
    options = normalize_options(
        "max_norm_",
        {
            "max_norm": max_norm,
            "min_norm": min_norm,
            "rate": rate,
            "norm_dim": norm_dim,
            "norm_type": norm_type,
            "error_if_nonfinite": error_if_nonfinite,
        },
    )
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"max_norm_: expected tensors, but item {i} is {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"max_norm_: tensor {i} has layout {t.layout}; only dense tensors")
    plan = make_plan(tensors, options["norm_dim"])  # raises if norm_dim does not fit
    project_(tensors, options, plan=plan)

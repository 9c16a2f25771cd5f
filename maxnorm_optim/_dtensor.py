r"""Max-norm projection of `DTensor` parameters (FSDP2, tensor parallelism).

For each parameter, the mesh dims that shard a dim the norm runs over decide:

* none (`Replicate()`, or `Shard(d)` with `d` outside `norm_dim`, e.g. FSDP2's
  `Shard(0)` with the default per-unit norm): every slice lies whole in the local
  shard, so the local shard is projected by the dense kernels, with no communication;
* some: the slices span ranks. The projection then runs the same pipeline on the
  local parts with cross-rank reductions in place of local ones:

  1. check norms exactly as `torch.linalg.vector_norm` computes them on a `DTensor`
     (each rank's local norm, `** p`, summed across the ranks, `** (1/p)`; a max for
     `p = inf`): one all-reduce for all such parameters of a group;
  2. accurate norms: float64 partial sums, one more all-reduce (two when values must
     first be rescaled by the slices' global largest magnitude: fp64, or `p > 4`);
  3. factors, applied locally to every rank's part of each slice;
  4. where the check is not proven by construction, one verifying all-reduce, then a
     provably sufficient shrink of the slices that fail it. Every rank sees the same
     reduced norms, so every rank takes the same decisions.

Every rank must therefore project the same `DTensor` parameters in the same order:
[`MaxNormWrapper`][maxnorm_optim.MaxNormWrapper] projects every `DTensor` of a
constrained group at each `step()`, whether or not it has a gradient on this rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

if not torch.distributed.is_available():  # pragma: no cover - depends on the torch build
    raise ImportError("maxnorm_optim's DTensor support needs torch.distributed")

from torch.distributed.tensor import DTensor, Partial, Replicate

from . import _kernels as kn
from . import _numerics as num
from ._options import SKIP, MaxNormOptions, slice_dims
from ._plans import make_plan, project_dense_

__all__ = ["project_dtensors_", "reduced_mesh_dims"]


def reduced_mesh_dims(t: DTensor, dims: tuple[int, ...] | None) -> tuple[int, ...]:
    """The mesh dims over which the slice norms of `t` (over `dims`, `None` for all)
    need a reduction: those that shard a normed dim (`Shard(d)`, FSDP2's strided
    variant included). An empty tuple means the projection is local.

    Raises:
        ValueError: `t` has a `Partial` placement (its local values are not the
            parameter's values).
    """
    normed = set(range(t.dim())) if dims is None else set(dims)
    out = []
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise ValueError(
                f"max-norm projection: a DTensor with placements {t.placements} has a "
                "Partial placement; redistribute the parameter to Shard/Replicate first"
            )
        if placement.is_shard() and placement.dim in normed:  # type: ignore[attr-defined]
            out.append(mesh_dim)
    return tuple(out)


def _all_reduce(flat: Tensor, mesh: Any, reduced: tuple[int, ...], op: str) -> Tensor:
    """Reduce `flat` across the ranks of the `reduced` mesh dims (DTensor's own
    collective: `Partial` -> `Replicate`); other mesh dims are left alone."""
    src = [Partial(op) if i in reduced else Replicate() for i in range(mesh.ndim)]
    total = DTensor.from_local(flat, mesh, src, run_check=False)
    return total.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()


class _Member:
    """One sharded parameter: its local shard, seen as `(local slices, local length)`."""

    def __init__(self, t: DTensor, dims: tuple[int, ...], name: str) -> None:
        self.mesh = t.device_mesh
        self.local = t.to_local()
        self.name = name
        self.dims = dims
        self.keep = tuple(d for d in range(self.local.dim()) if d not in dims)
        self.length = math.prod(t.shape[d] for d in dims)  # the global slice length
        self.moved = self.local.permute(*self.keep, *dims)
        self.count = math.prod(self.local.shape[d] for d in self.keep)

    def check_partials(self, p: float) -> Tensor:
        """This rank's part of the check norms, as DTensor reduces them."""
        local = num.check_norms(self.local, p, self.dims, keepdim=True)
        local = local.permute(*self.keep, *self.dims).reshape(-1)
        return local if p == math.inf else local**p

    def rows(self) -> Tensor:
        local_len = math.prod(self.local.shape[d] for d in self.dims)
        return self.moved.reshape(self.count, local_len)

    def write(self, rows: Tensor) -> None:
        if rows.data_ptr() != self.local.data_ptr() or not self.local.is_contiguous():
            self.moved.copy_(rows.view(self.moved.shape))


def project_dtensors_(
    tensors: Sequence[DTensor],
    options: MaxNormOptions,
    names: Sequence[str],
    stats: kn.Stats | None,
    skip: Tensor | None,
) -> None:
    """Project `DTensor`s in place (called by
    [`project_`][maxnorm_optim._projection.project_]).

    Args:
        tensors: every rank passes the same ones, in the same order, with the same
            `options`.
        options: the group's options.
        names: one name per tensor, for error messages.
        stats: counts this rank's slices (a slice split across ranks counts on each).
        skip: as for `project_`.
    """
    local: list[Tensor] = []
    local_names: list[str] = []
    groups: dict[tuple[Any, ...], list[_Member]] = {}
    for t, name in zip(tensors, names):
        dims = slice_dims(options.norm_dim, t.dim())
        if dims is SKIP:
            continue
        assert not isinstance(dims, type(SKIP))
        reduced = reduced_mesh_dims(t, dims)
        if not reduced:
            if t.to_local().numel():
                local.append(t.to_local())
                local_names.append(name)
            continue
        all_dims = tuple(range(t.dim())) if dims is None else dims
        key = (id(t.device_mesh), reduced, t.dtype, t.to_local().device)
        groups.setdefault(key, []).append(_Member(t, all_dims, name))
    if local:
        plan = make_plan(local, options.norm_dim, local_names)
        project_dense_(plan, local, options, stats=stats, skip=skip)
    for (_, reduced, dtype, _), members in groups.items():
        _project_sharded(members, members[0].mesh, reduced, dtype, options, stats, skip)


def _project_sharded(
    members: list[_Member],
    mesh: Any,
    reduced: tuple[int, ...],
    dtype: torch.dtype,
    options: MaxNormOptions,
    stats: kn.Stats | None,
    skip: Tensor | None,
) -> None:
    complex_ = dtype.is_complex
    pipe = kn.Pipeline(options, dtype, complex_)
    p = options.norm_type
    op = "max" if p == math.inf else "sum"
    sizes = [m.count for m in members]
    # 1. the check norms, as DTensor computes them
    check = _all_reduce(torch.cat([m.check_partials(p) for m in members]), mesh, reduced, op)
    if p != math.inf:
        check = check ** (1.0 / p)
    # 2. accurate norms
    accurate, eps = _accurate(members, mesh, reduced, p, complex_)
    lengths = [m.length for m in members]
    decision_parts = []
    for c, a, length in zip(check.split(sizes), accurate.split(sizes), lengths):
        decision_parts.append(torch.where(pipe.suspects(c, length), a, c.to(torch.float64)))
    decision = torch.cat(decision_parts)
    over, under, nonfinite, selected = pipe.classify(decision, skip)
    if options.error_if_nonfinite and bool(nonfinite.any()):
        first = next(m for m, bad in zip(members, nonfinite.split(sizes)) if bool(bad.any()))
        raise kn.nonfinite_error(first.name)
    if stats is not None:
        stats.add(selected, decision)
    # 3. factors, applied to the local parts
    factor_parts = []
    for m, n, c, o, u, s in zip(
        members,
        accurate.split(sizes),
        check.split(sizes),
        over.split(sizes),
        under.split(sizes),
        selected.split(sizes),
    ):
        aim = c if pipe.verifies(m.length, eps, prove=False)[0] else None
        margins = pipe.margins(m.length, eps, prove=False)
        factors = pipe.factors(n, o, u, s, margins, aim, m.length)
        factor_parts.append(factors)
        rows = m.rows()
        kn.where_scale_(rows, s, factors, pipe)
        m.write(rows)
    # 4. verify where the check is not proven, then a provably sufficient shrink
    verify = [pipe.verifies(m.length, eps, prove=False) for m in members]
    if not any(same or wide for same, wide in verify):
        return
    check = _all_reduce(torch.cat([m.check_partials(p) for m in members]), mesh, reduced, op)
    if p != math.inf:
        check = check ** (1.0 / p)
    upper = check.to(torch.float64)
    if any(wide for _, wide in verify):
        again, eps64 = _accurate(members, mesh, reduced, p, complex_)
        upper = torch.maximum(upper, again * (1 + 2 * eps64))
    for m, up, s, length in zip(members, upper.split(sizes), selected.split(sizes), lengths):
        fail = s & (up > pipe.bounds.hi)
        shrink = torch.where(fail, pipe.safe_shrink(up, length), torch.ones_like(up))
        rows = m.rows()
        kn.where_scale_(rows, fail, shrink, pipe)
        m.write(rows)


def _accurate(
    members: list[_Member], mesh: Any, reduced: tuple[int, ...], p: float, complex_: bool
) -> tuple[Tensor, float]:
    """float64 norms of the sharded slices with a proven error bound: partial sums of
    `|x|^p` in float64, rescaled by the slices' global largest magnitude when powers
    could over- or underflow float64."""
    length = max(m.length for m in members)
    if p == math.inf and not complex_:
        rows = [m.rows() for m in members]
        parts = [r.abs().amax(dim=1) if r.shape[1] else r.new_zeros(r.shape[0]) for r in rows]
        return _all_reduce(torch.cat(parts).to(torch.float64), mesh, reduced, "max"), 0.0
    dtype = members[0].local.dtype
    fast = not complex_ and dtype != torch.float64 and p <= 4
    wide = [m.rows().to(torch.complex128 if complex_ else torch.float64).abs() for m in members]
    if fast:
        sums = [w.pow(p).sum(dim=1) for w in wide]
        total = _all_reduce(torch.cat(sums), mesh, reduced, "sum")
        u64 = num.unit_roundoff(torch.float64)
        return total ** (1.0 / p), 1.01 * (num.gamma(length + 8, u64) / p + 8 * u64)
    tops = [w.amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0]) for w in wide]
    top = _all_reduce(torch.cat(tops), mesh, reduced, "max")
    finite = torch.isfinite(top) & (top > 0)
    _, exp = torch.frexp(torch.where(finite, top, torch.ones_like(top)))
    exp = exp.to(torch.float64)
    down = num.pow2(-exp).split([w.shape[0] for w in wide])
    sums = [(w * d.unsqueeze(1)).pow(p).sum(dim=1) for w, d in zip(wide, down)]
    total = _all_reduce(torch.cat(sums), mesh, reduced, "sum") ** (1.0 / p)
    half = torch.floor(exp / 2)
    norms = total * num.pow2(half) * num.pow2(exp - half)
    norms = torch.where(finite, norms, torch.where(top > 0, top, torch.zeros_like(top)))
    return norms, num.rescaled_bound(length, p, complex_)

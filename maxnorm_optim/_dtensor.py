r"""Max-norm projection of `DTensor` parameters (FSDP2, tensor parallelism).

For each parameter, the mesh dims of more than one rank that shard a dim the norm runs
over decide:

* none (`Replicate()`, or `Shard(d)` with `d` outside `norm_dim`, e.g. FSDP2's
  `Shard(0)` with the default per-unit norm): every slice lies whole in the local
  shard, so the local shard is projected by the dense kernels, with no communication;
* some: the slices span ranks. The parameters of a call whose norms span shards are
  grouped by mesh, reduced mesh dims, the mesh dims they are replicated along, and
  check dtype (fp32 for fp32, fp16 and bf16; fp64), and each group runs the dense
  pipeline on the local parts, with all-reduces in place of local reductions:

  1. *check norms* as `torch.linalg.vector_norm` computes them on the `DTensor`: each
     rank's local norm, `** p`, summed across the ranks, `** (1/p)`; a max for
     `p = inf`. One all-reduce;
  2. *accurate norms*: float64 partial sums of `|x|^p` with a proven error bound, one
     all-reduce; two where the values must first be divided by the slices' largest
     magnitude (fp64, complex, `p > 4`); none for real `p = inf`, whose check norm
     is exact;
  3. classification and factors from the reduced norms, applied by every rank to its
     own part of each slice; the error bounds of the check count the roundings that
     DTensor's reduction of partial norms adds, so that where the check holds by
     construction, it holds for DTensor's check;
  4. where the check does not hold by construction for the slice length (long fp32
     slices, fp16/bf16), one verifying all-reduce of the check norms, then a provably
     sufficient shrink of the slices that fail it. Where this check may differ from
     DTensor's by rounding (more than 2 ranks, several mesh dims, `p` not in
     {1, 2, inf}), the slices aim below the difference and are verified with it.

  So a group costs 1 to 3 all-reduces, 4 when values are rescaled and the check is
  verified. The count depends only on the group's dtypes, `p`, options and slice
  lengths, never on the values; every rank sees the same reduced norms, so every rank
  takes the same decisions. (A reduction over several mesh dims is one all-reduce per
  mesh dim, as DTensor does it, unless DTensor finds a flattened mesh for them.)

With `error_if_nonfinite=True`, one more all-reduce per mesh, before anything is
written, tells every rank whether any rank holds a NaN or inf, so that every rank
raises alike.

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

_INF = math.inf


def reduced_mesh_dims(t: DTensor, dims: tuple[int, ...] | None) -> tuple[int, ...]:
    """The mesh dims over which the slice norms of `t` (over `dims`, `None` for all)
    need a reduction: those of more than one rank that shard a normed dim (`Shard(d)`,
    FSDP2's strided variant included). An empty tuple means the projection is local.

    Raises:
        ValueError: `t` has a `Partial` placement (its local values are not the
            parameter's values).
    """
    normed = set(range(t.dim())) if dims is None else set(dims)
    mesh = t.device_mesh
    out = []
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise ValueError(
                f"max-norm projection: a DTensor with placements {t.placements} has a "
                "Partial placement; redistribute the parameter to Shard/Replicate first"
            )
        if (
            placement.is_shard()
            and placement.dim in normed  # type: ignore[attr-defined]
            and mesh.size(mesh_dim) > 1
        ):
            out.append(mesh_dim)
    return tuple(out)


def _reduce(flat: Tensor, mesh: Any, reduced: tuple[int, ...], partial: Any) -> Tensor:
    """Reduce `flat` across the ranks of the `reduced` mesh dims with DTensor's own
    collectives (`partial` -> `Replicate`); other mesh dims are left alone."""
    src = [partial if i in reduced else Replicate() for i in range(mesh.ndim)]
    total = DTensor.from_local(flat, mesh, src, run_check=False)
    return total.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()


def _max(flat: Tensor, mesh: Any, reduced: tuple[int, ...]) -> Tensor:
    """A max all-reduce that keeps NaN (as inf): the backends' max may drop a NaN."""
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, _INF), flat)
    return _reduce(flat, mesh, reduced, Partial("max"))


class _Member:
    """One sharded parameter: its local shard, seen as `(local slices, local length)`."""

    def __init__(self, t: DTensor, dims: tuple[int, ...], name: str) -> None:
        self.local = t.to_local()
        self.name = name
        self.dtype = t.dtype
        self.dims = dims
        self.keep = tuple(d for d in range(self.local.dim()) if d not in dims)
        self.length = math.prod(t.shape[d] for d in dims)  # the global slice length
        self.local_length = math.prod(self.local.shape[d] for d in dims)
        self.moved = self.local.permute(*self.keep, *dims)
        self.count = math.prod(self.local.shape[d] for d in self.keep)

    def local_norms(self, p: float) -> Tensor:
        """This rank's check norms of its parts of the slices (what DTensor reduces)."""
        if self.local_length == 0:  # an empty shard (vector_norm refuses p = inf there)
            acc = num.work_dtype(self.dtype)
            return torch.zeros(self.count, dtype=acc, device=self.local.device)
        local = num.check_norms(self.local, p, self.dims, keepdim=True)
        return local.permute(*self.keep, *self.dims).reshape(-1)

    def rows(self) -> Tensor:
        """The local parts as `(slices, local length)`: a view where the layout allows,
        else a copy (written back by `write`)."""
        return self.moved.reshape(self.count, self.local_length)

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

    Raises:
        RuntimeError: `error_if_nonfinite` and a slice on any rank holds NaN or inf;
            raised on every rank, before anything is written.
    """
    items: list[tuple[DTensor, str]] = []
    # Grouped by mesh (equal meshes, e.g. FSDP2's one per `fully_shard` call, are one),
    # and only with tensors replicated along the same mesh dims: what a tensor's
    # projection depends on (the dense kernels' batches, the layout of an all-reduce)
    # is then the same on all the ranks that hold a replica, and so are its bits.
    local: dict[tuple[Any, ...], tuple[list[Tensor], list[str]]] = {}
    groups: dict[tuple[Any, ...], list[_Member]] = {}
    meshes: dict[tuple[Any, ...], Any] = {}
    for t, name in zip(tensors, names):
        dims = slice_dims(options.norm_dim, t.dim())
        if dims is SKIP:
            continue
        assert not isinstance(dims, type(SKIP))
        items.append((t, name))
        reduced = reduced_mesh_dims(t, dims)
        mesh = t.device_mesh
        copies = tuple(
            i for i, pl in enumerate(t.placements) if pl.is_replicate() and mesh.size(i) > 1
        )
        if not reduced:
            if t.to_local().numel():
                shards, labels = local.setdefault((mesh, copies), ([], []))
                shards.append(t.to_local())
                labels.append(name)
            continue
        all_dims = tuple(range(t.dim())) if dims is None else dims
        acc = num.work_dtype(t.dtype)
        key = (mesh, reduced, copies, acc, t.is_complex(), t.to_local().device)
        groups.setdefault(key, []).append(_Member(t, all_dims, name))
        meshes[key] = mesh
    if options.error_if_nonfinite and items:
        _raise_if_nonfinite(items)
    for shards, labels in local.values():
        plan = make_plan(shards, options.norm_dim, labels)
        project_dense_(plan, options, stats=stats, skip=skip)
    for key, members in groups.items():
        _project_sharded(members, meshes[key], key[1], options, stats, skip)


def _raise_if_nonfinite(items: list[tuple[DTensor, str]]) -> None:
    """Whether any rank's shard of any of `items` holds NaN or inf: one max all-reduce
    of a flag per tensor for each mesh (in the order of first use, the same on every
    rank), then every rank raises naming the same, first such tensor."""
    by_mesh: dict[Any, list[int]] = {}
    for i, (t, _) in enumerate(items):
        by_mesh.setdefault(t.device_mesh, []).append(i)
    bad: list[int] = []
    for mesh, indices in by_mesh.items():
        bad_here = [(~torch.isfinite(items[i][0].to_local())).any() for i in indices]
        flags = torch.stack(bad_here).to(torch.float32)
        total = _max(flags, mesh, tuple(range(mesh.ndim)))
        bad.extend(i for i, flag in zip(indices, total.tolist()) if flag > 0)
    if bad:
        raise kn.nonfinite_error(items[min(bad)][1])


def _stages(p: float, hi: float, length: int) -> float:
    """Extra terms, per reduced mesh dim, that cover what DTensor's check adds to a
    plain norm: each rank's local norm is rounded by its root and again by `** p`
    before the ranks' sum (`error_bound`'s model of powers and roots, doubled; none
    for `p` in {1, inf}, whose partials are not powered)."""
    if p in (1.0, _INF):
        return 0.0
    if p == 2.0:
        return 4.0  # sqrt (at most 2u on the square) and the square (u), rounded up
    logs = abs(math.log(hi))
    root = 5.0 + logs
    power = 4.0 + p * (logs + 1.0) + math.log(max(length, 1))
    return math.ceil(2 * (p * root + power))


class _Group:
    """The numbers of one group that depend only on its options, dtypes and lengths."""

    def __init__(
        self, members: list[_Member], mesh: Any, reduced: tuple[int, ...], options: MaxNormOptions
    ) -> None:
        self.members = members
        self.mesh = mesh
        self.reduced = reduced
        self.p = options.norm_type
        self.complex = members[0].local.is_complex()
        self.sizes = [m.count for m in members]
        self.pipes: dict[torch.dtype, kn.Pipeline] = {}
        for m in members:
            if m.dtype not in self.pipes:
                self.pipes[m.dtype] = kn.Pipeline(options, m.dtype, self.complex)
        first = self.pipes[members[0].dtype].bounds
        hi = first.hi if math.isfinite(first.hi) else max(first.lo, 1e-300)
        ranks = [mesh.size(d) for d in reduced]
        # Slice lengths as the check's error bounds see them: the global length plus
        # the roundings DTensor's reduction of partial norms adds per mesh dim.
        self.lengths = [
            m.length + int(sum(_stages(self.p, hi, m.length) for _ in ranks)) for m in members
        ]
        # Our check is DTensor's, bitwise, for p = inf (a max), and for p in {1, 2}
        # over one mesh dim of 2 ranks (`** p` and `** (1/p)` are exact or correctly
        # rounded there, and two partials add alike in either order). Otherwise the
        # ranks may add in another order, over several mesh dims DTensor takes a root
        # and a power in between, and other powers round differently by position:
        # verifying allows for the difference of two such checks, and aims below it.
        exact = self.p == _INF or (self.p in (1.0, 2.0) and ranks == [2])
        self.order_slack = [
            0.0
            if exact
            else 2
            * sum(
                num.error_bound(r + _stages(self.p, hi, r), self.p, m.dtype, False, hi)
                for r in ranks
            )
            for m in members
        ]

    def pipe(self, m: _Member) -> kn.Pipeline:
        return self.pipes[m.dtype]


def _check_norms(g: _Group) -> Tensor:
    """The check norms of every slice of the group, replicated (one all-reduce)."""
    parts = torch.cat([m.local_norms(g.p) for m in g.members])
    if g.p == _INF:
        return _max(parts, g.mesh, g.reduced)
    return _reduce(parts**g.p, g.mesh, g.reduced, Partial("sum")) ** (1.0 / g.p)


def _accurate(g: _Group, check: Tensor) -> tuple[Tensor, float]:
    """float64 norms of the group's slices with a proven relative error bound."""
    length = max(m.length for m in g.members)
    if g.p == _INF and not g.complex:
        return check.to(torch.float64), 0.0  # a max is exact: the check norms are
    u64 = num.unit_roundoff(torch.float64)
    fp64 = any(m.dtype in (torch.float64, torch.complex128) for m in g.members)
    wide = [m.rows().to(torch.complex128 if g.complex else torch.float64).abs() for m in g.members]
    if not g.complex and not fp64 and g.p <= 4:
        # fp32/fp16/bf16 values to a power p <= 4 neither over- nor underflow float64.
        sums = [w.pow(g.p).sum(dim=1) for w in wide]
        total = _reduce(torch.cat(sums), g.mesh, g.reduced, Partial("sum"))
        return total ** (1.0 / g.p), 1.01 * (num.gamma(length + 8, u64) / g.p + 8 * u64)
    # Divided by the slice's largest magnitude (the largest term is then exactly 1), so
    # that no |x|^p over- or underflows, whatever p.
    tops = [w.amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0]) for w in wide]
    top = _max(torch.cat(tops), g.mesh, g.reduced)
    eps = num.rescaled_bound(length, g.p, g.complex) + 4 * u64
    if g.p == _INF:
        return top, eps
    finite = torch.isfinite(top) & (top > 0)
    safe = torch.where(finite, top, torch.ones_like(top)).split(g.sizes)
    sums = [(w / s.unsqueeze(1)).pow(g.p).sum(dim=1) for w, s in zip(wide, safe)]
    total = _reduce(torch.cat(sums), g.mesh, g.reduced, Partial("sum")) ** (1.0 / g.p)
    # Slices of zeros, inf or NaN (as inf) keep their largest magnitude as the norm.
    return torch.where(finite, total * top, top), eps


def _project_sharded(
    members: list[_Member],
    mesh: Any,
    reduced: tuple[int, ...],
    options: MaxNormOptions,
    stats: kn.Stats | None,
    skip: Tensor | None,
) -> None:
    g = _Group(members, mesh, reduced, options)
    cpu = members[0].local.device.type == "cpu"
    # 1-2. reduced norms; the same on every rank
    check = _check_norms(g)
    accurate, eps = _accurate(g, check)
    checks, accurates = check.split(g.sizes), accurate.split(g.sizes)
    classes = []
    for m, c, a, length, slack in zip(members, checks, accurates, g.lengths, g.order_slack):
        pipe = g.pipe(m)
        decision = torch.where(pipe.suspects(c, length), a, c.to(torch.float64))
        over, under, nonfinite, selected = pipe.classify(decision, skip)
        if slack:
            # DTensor's check may read up to `slack` above ours: over where it may be
            # over, under where it may be under.
            high = pipe.classify(decision * (1 + slack), skip)
            low = pipe.classify(decision / (1 + slack), skip)
            over, under = high[0], low[1] & ~high[0]
            selected = (high[3] & over) | (low[3] & under)
        classes.append((decision, over, under, nonfinite, selected))
    if options.error_if_nonfinite:  # every rank sees the same norms: all raise alike
        for m, (_, _, _, nonfinite, _) in zip(members, classes):
            if bool(nonfinite.any()):
                raise kn.nonfinite_error(m.name)
    if stats is not None:
        stats.add(torch.cat([k[4] for k in classes]), torch.cat([k[0] for k in classes]))
    # 3. factors, applied to the local parts
    verify = [g.pipe(m).verifies(length, eps, prove=False) for m, length in zip(members, g.lengths)]
    planned: list[num.Factors] = []
    for i, (m, c, a, length, (_, over, under, _, selected), (same, _)) in enumerate(
        zip(members, checks, accurates, g.lengths, classes, verify)
    ):
        pipe = g.pipe(m)
        below, above = pipe.margins(length, eps, prove=False)
        margins = (below + g.order_slack[i], above)  # so that a second call keeps it
        factors = pipe.factors(a, over, under, selected, margins, c if same else None, length)
        planned.append(factors)
        if cpu and not bool(selected.any()):
            continue  # nothing to write here (free to know on CPU)
        rows = m.rows()
        kn.where_scale_(rows, selected, factors, pipe)
        m.write(rows)
    # 4. verify where the check is not proven, then a provably sufficient shrink
    if not any(same or wide for same, wide in verify):
        return
    judged = [g.pipe(m).judges(length) for m, length in zip(members, g.lengths)]
    by_check = [same or (wide and j) for (same, wide), j in zip(verify, judged)]
    again = _check_norms(g).split(g.sizes) if any(by_check) else None
    for i, m in enumerate(members):
        same, wide = verify[i]
        if not (same or wide):
            continue
        pipe, length = g.pipe(m), g.lengths[i]
        selected = classes[i][4]
        f64 = num.error_bound(length, g.p, torch.float64, g.complex, pipe.bounds.hi)
        upper = torch.full_like(accurates[i], -_INF)
        if by_check[i]:
            assert again is not None
            now = again[i].to(torch.float64)
            if same:  # the user's check (up to the ranks' order of addition)
                upper = now * (1 + g.order_slack[i])
            if wide:  # a proven upper bound of the float64 norm, from the check
                beta = pipe.check_bound(length)
                upper = torch.maximum(upper, now / (1 - beta) * (1 + f64))
        if wide and not judged[i]:
            # No check to judge by (hi^p overflows it): the float64 norm after scaling,
            # bounded from the accurate norms, the factors and the roundings.
            mant, exp = planned[i]
            scaled = accurates[i] * mant * num.pow2(exp)
            rounding = (1 + pipe.u_work) ** 3 * (1 + pipe.u_store) * (1 + f64)
            upper = torch.maximum(upper, scaled / (1 - eps) * rounding)
        fail = selected & (upper > pipe.bounds.hi)
        if cpu and not bool(fail.any()):
            continue
        shrink = torch.where(fail, pipe.safe_shrink(upper, length), torch.ones_like(upper))
        rows = m.rows()
        kn.where_scale_(rows, fail, shrink, pipe)
        m.write(rows)

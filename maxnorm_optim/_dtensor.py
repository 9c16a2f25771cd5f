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
from ._options import MaxNormOptions, Skip, slice_dims
from ._plans import make_plan, project_dense_

__all__ = ["project_dtensors_", "raise_if_nonfinite", "reduced_mesh_dims"]

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
    """One sharded parameter's local shard. Per-slice values are flat, in the order of
    the slices of `moved` (the shard with the normed dims last)."""

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
        order = (*self.keep, *dims)
        self.inverse = tuple(order.index(d) for d in range(self.local.dim()))
        try:  # a `(slices, local length)` view, where the layout allows one
            self.flat: Tensor | None = self.moved.view(self.count, self.local_length)
        except RuntimeError:
            self.flat = None

    def flatten(self, x: Tensor) -> Tensor:
        """Per-slice values computed with `keepdim=True` on the shard, flat."""
        return x.permute(*self.keep, *self.dims).reshape(-1)

    def broadcast(self, v: Tensor) -> Tensor:
        """Flat per-slice values, shaped to broadcast against the shard."""
        shape = (*(self.moved.shape[: len(self.keep)]), *([1] * len(self.dims)))
        return v.view(shape).permute(*self.inverse)

    def local_norms(self, p: float) -> Tensor:
        """This rank's check norms of its parts of the slices (what DTensor reduces)."""
        if self.local_length == 0:  # an empty shard (vector_norm refuses p = inf there)
            acc = num.work_dtype(self.dtype)
            return torch.zeros(self.count, dtype=acc, device=self.local.device)
        return self.flatten(num.check_norms(self.local, p, self.dims, keepdim=True))

    def magnitudes(self, pick: Tensor | None) -> Tensor:
        """`|x|` in float64 of the slices `pick` as `(k, local length)`, or (`None`)
        of the whole shard in its own layout."""
        x = self.local if pick is None else self.take(pick)
        if x.is_complex():
            return x.to(torch.complex128).abs()
        return x.abs().to(torch.float64)  # |x| is exact in any real dtype

    def reduce(self, x: Tensor, pick: Tensor | None, op: str) -> Tensor:
        """Flat per-slice `sum` or `amax` of what `magnitudes(pick)` returned."""
        if pick is not None:
            if op == "sum":
                return x.sum(dim=1)
            return x.amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0])
        if self.local_length == 0:
            return x.new_zeros(self.count)
        if op == "sum":
            return self.flatten(x.sum(dim=self.dims, keepdim=True))
        return self.flatten(x.amax(dim=self.dims, keepdim=True))

    def _at(self, idx: Tensor) -> tuple[Tensor, ...]:
        return torch.unravel_index(idx, tuple(self.moved.shape[: len(self.keep)]))

    def take(self, idx: Tensor) -> Tensor:
        """The local parts of the slices `idx`, gathered as `(k, local length)`."""
        if self.flat is not None:
            return self.flat.index_select(0, idx)
        if not self.keep:  # one slice: the whole shard
            return self.moved.reshape(1, self.local_length)[: idx.numel()].clone()
        return self.moved[self._at(idx)].reshape(idx.numel(), self.local_length)

    def put(self, idx: Tensor, rows: Tensor) -> None:
        """Write back what `take(idx)` returned."""
        if self.flat is not None:
            self.flat.index_copy_(0, idx, rows)
        elif not self.keep:
            if idx.numel():
                self.moved.copy_(rows.view(self.moved.shape))
        else:
            shape = (idx.numel(), *self.moved.shape[len(self.keep) :])
            self.moved.index_put_(self._at(idx), rows.view(shape))

    def scale(self, chosen: Tensor, factors: num.Factors, pipe: kn.Pipeline) -> None:
        """Scale the slices `chosen` by `factors` in the shard's own layout, every other
        slice keeping its bits (`torch.where`, no multiplication by 1), without syncs."""
        first, second = num.split_factors(factors, pipe.work)
        view = torch.view_as_real(self.local) if self.local.is_complex() else self.local
        extra = (1,) * (view.dim() - self.local.dim())  # the (re, im) dim of complex

        def spread(v: Tensor) -> Tensor:
            return self.broadcast(v).reshape(*self.broadcast(v).shape, *extra)

        scaled = (view.to(pipe.work) * spread(first)) * spread(second)
        view.copy_(torch.where(spread(chosen), scaled.to(view.dtype), view))


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
        if isinstance(dims, Skip):
            continue
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
    # error_if_nonfinite: checked by the callers before anything is written
    # (`_projection.raise_if_nonfinite`, every rank alike).
    for shards, labels in local.values():
        plan = make_plan(shards, options.norm_dim, labels)
        project_dense_(plan, shards, options, stats=stats, skip=skip)
    for key, members in groups.items():
        _project_sharded(members, meshes[key], key[1], options, stats, skip)


def raise_if_nonfinite(items: list[tuple[DTensor, str]]) -> None:
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


def _check_norms(g: _Group, picks: list[Tensor | None]) -> Tensor:
    """The check norms of the slices `picks` of each member (`None`: every slice),
    concatenated and replicated: one all-reduce. Each rank's local norms are those of
    its whole shard (what DTensor computes), then picked."""
    parts = []
    for m, pick in zip(g.members, picks):
        if pick is not None and pick.numel() == 0:  # nothing to reduce (all in bound)
            acc = num.work_dtype(m.dtype)
            parts.append(torch.zeros(0, dtype=acc, device=m.local.device))
            continue
        local = m.local_norms(g.p)
        parts.append(local if pick is None else local.index_select(0, pick))
    flat = torch.cat(parts)
    if g.p == _INF:
        return _max(flat, g.mesh, g.reduced)
    return _reduce(flat**g.p, g.mesh, g.reduced, Partial("sum")) ** (1.0 / g.p)


def _power(x: Tensor, p: float) -> Tensor:
    """`x ** p` of float64 magnitudes (`x * x`, exact for fp32 values, for p = 2)."""
    if p == 1.0:
        return x
    return x * x if p == 2.0 else x.pow(p)


def _accurate(g: _Group, picks: list[Tensor | None]) -> tuple[Tensor, float]:
    """float64 norms, with a proven relative error bound, of the slices `picks` of each
    member (`None`: every slice), concatenated (one all-reduce, two when rescaled)."""
    length = max(m.length for m in g.members)
    u64 = num.unit_roundoff(torch.float64)
    fp64 = any(m.dtype in (torch.float64, torch.complex128) for m in g.members)
    mags = [m.magnitudes(pick) for m, pick in zip(g.members, picks)]
    if not g.complex and not fp64 and g.p <= 4:
        # fp32/fp16/bf16 values to a power p <= 4 neither over- nor underflow float64.
        sums = [m.reduce(_power(x, g.p), pick, "sum") for m, x, pick in zip(g.members, mags, picks)]
        total = _reduce(torch.cat(sums), g.mesh, g.reduced, Partial("sum"))
        return total ** (1.0 / g.p), 1.01 * (num.gamma(length + 8, u64) / g.p + 8 * u64)
    # Divided by the slice's largest magnitude (the largest term is then exactly 1), so
    # that no |x|^p over- or underflows, whatever p.
    tops = [m.reduce(x, pick, "amax") for m, x, pick in zip(g.members, mags, picks)]
    top = _max(torch.cat(tops), g.mesh, g.reduced)
    eps = num.rescaled_bound(length, g.p, g.complex) + 4 * u64
    if g.p == _INF:
        return top, eps
    finite = torch.isfinite(top) & (top > 0)
    safe = torch.where(finite, top, torch.ones_like(top)).split([t.numel() for t in tops])
    sums = []
    for m, x, pick, s in zip(g.members, mags, picks, safe):
        div = s.unsqueeze(1) if pick is not None else m.broadcast(s)
        sums.append(m.reduce(_power(x / div, g.p), pick, "sum"))
    total = _reduce(torch.cat(sums), g.mesh, g.reduced, Partial("sum")) ** (1.0 / g.p)
    # Slices of zeros, inf or NaN (as inf) keep their largest magnitude as the norm.
    return torch.where(finite, total * top, top), eps


def _spread(values: Tensor, picks: list[Tensor | None], fills: Sequence[Tensor]) -> list[Tensor]:
    """Per member, `fills` with the picked slices set from `values` (concatenated)."""
    sizes = [f.shape[0] if pick is None else pick.numel() for f, pick in zip(fills, picks)]
    out = []
    for part, pick, fill in zip(values.split(sizes), picks, fills):
        out.append(part if pick is None else fill.index_copy(0, pick, part))
    return out


def _classify(
    pipe: kn.Pipeline, decision: Tensor, slack: float, skip: Tensor | None, length: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`Pipeline.classify`; where DTensor's check may read up to `slack` from ours:
    over where it may be over, under where it may be under."""
    over, under, nonfinite, selected = pipe.classify(decision, skip, length)
    if slack:
        high = pipe.classify(decision * (1 + slack), skip, length)
        low = pipe.classify(decision / (1 + slack), skip, length)
        over, under = high[0], low[1] & ~high[0]
        selected = (high[3] & over) | (low[3] & under)
    return over, under, nonfinite, selected


def _few(chosen: Tensor, count: int, cpu: bool) -> Tensor | None:
    """The slices to gather, on CPU where at most a quarter are chosen; else `None`:
    work on the whole shard. `chosen` is the same on every rank that shares the slices
    (it follows from reduced norms), and so is this choice."""
    if not cpu:
        return None
    idx = chosen.nonzero().squeeze(1)
    return idx if idx.numel() * 4 <= count else None


def _scale(m: _Member, pipe: kn.Pipeline, chosen: Tensor, factors: num.Factors, cpu: bool) -> None:
    """Scale the slices `chosen` of `m` by `factors`, every other slice keeping its
    bits: few on CPU are gathered, scaled and written back; else the whole shard."""
    idx = _few(chosen, m.count, cpu)
    if idx is None:
        m.scale(chosen, factors, pipe)
        return
    if idx.numel() == 0:
        return
    rows = m.take(idx)
    every = torch.ones(idx.numel(), dtype=torch.bool, device=rows.device)
    picked = num.Factors(factors.mant.index_select(0, idx), factors.exp.index_select(0, idx))
    kn.where_scale_(rows, every, picked, pipe)
    m.put(idx, rows)


def _project_sharded(
    members: list[_Member],
    mesh: Any,
    reduced: tuple[int, ...],
    options: MaxNormOptions,
    stats: kn.Stats | None,
    skip: Tensor | None,
) -> None:
    g = _Group(members, mesh, reduced, options)
    # On CPU, reading which slices to treat is free: where they are few, the accurate
    # norms and the verification reduce only those, and only those are gathered and
    # scaled; elsewhere every slice, without host syncs. The number of collectives is
    # the same either way.
    cpu = members[0].local.device.type == "cpu"
    every: list[Tensor | None] = [None] * len(members)
    # 1. check norms, the same on every rank
    checks = [c.to(torch.float64) for c in _check_norms(g, every).split(g.sizes)]
    pipes = [g.pipe(m) for m in members]
    # 2. accurate norms where the check over- or underflowed, or selects the slice
    if g.p == _INF and not g.complex:
        accurates, eps = checks, 0.0  # a max is exact: the check norms are accurate
    else:
        picks: list[Tensor | None] = []
        for m, pipe, c, length, slack in zip(members, pipes, checks, g.lengths, g.order_slack):
            needed = pipe.suspects(c, length) | _classify(pipe, c, slack, None, length)[3]
            picks.append(_few(needed, m.count, cpu))
        values, eps = _accurate(g, picks)
        accurates = _spread(values, picks, checks)
    classes = []
    # What is reduced follows from reduced norms only, never from `skip` (a rank's own
    # view of a skipped step): every rank reduces the same slices.
    reduce_for: list[Tensor] = []
    for pipe, c, a, length, slack in zip(pipes, checks, accurates, g.lengths, g.order_slack):
        decision = torch.where(pipe.suspects(c, length), a, c)
        classes.append((decision, *_classify(pipe, decision, slack, skip, length)))
        reduce_for.append(
            classes[-1][4] if skip is None else _classify(pipe, decision, slack, None, length)[3]
        )
    if options.error_if_nonfinite:  # every rank sees the same norms: all raise alike
        for m, (_, _, _, nonfinite, _) in zip(members, classes):
            if bool(nonfinite.any()):
                raise kn.nonfinite_error(m.name)
    if stats is not None:
        stats.add(torch.cat([k[4] for k in classes]), torch.cat([k[0] for k in classes]))
    # 3. factors, applied to the local parts
    verify = [pipe.verifies(length, eps, prove=False) for pipe, length in zip(pipes, g.lengths)]
    planned: list[num.Factors] = []
    for i, m in enumerate(members):
        pipe, length, (same, _) = pipes[i], g.lengths[i], verify[i]
        _, over, under, _, selected = classes[i]
        below, above = pipe.margins(length, eps, prove=False)
        margins = (below + g.order_slack[i], above)  # so that a second call keeps it
        aim = checks[i] if same else None
        factors = pipe.factors(accurates[i], over, under, selected, margins, aim, length)
        planned.append(factors)
        _scale(m, pipe, selected, factors, cpu)
    # 4. verify where the check is not proven, then a provably sufficient shrink
    if not any(same or wide for same, wide in verify):
        return
    judged = [pipe.judges(length) for pipe, length in zip(pipes, g.lengths)]
    by_check = [same or (wide and j) for (same, wide), j in zip(verify, judged)]
    again: list[Tensor] | None = None
    if any(by_check):
        chosen = [_few(r, m.count, cpu) for r, m in zip(reduce_for, members)]
        unknown = [torch.full_like(c, -_INF) for c in checks]
        again = _spread(_check_norms(g, chosen).to(torch.float64), chosen, unknown)
    for i, m in enumerate(members):
        same, wide = verify[i]
        if not (same or wide):
            continue
        pipe, length = pipes[i], g.lengths[i]
        selected = classes[i][4]
        f64 = num.error_bound(length, g.p, torch.float64, g.complex, pipe.bounds.hi)
        upper = torch.full_like(accurates[i], -_INF)
        if by_check[i]:
            assert again is not None
            if same:  # the user's check (up to the ranks' order of addition)
                upper = again[i] * (1 + g.order_slack[i])
            if wide:  # a proven upper bound of the float64 norm, from the check
                beta = pipe.check_bound(length)
                upper = torch.maximum(upper, again[i] / (1 - beta) * (1 + f64))
        if wide and not judged[i]:
            # No check to judge by (hi^p overflows it): the float64 norm after scaling,
            # bounded from the accurate norms, the factors and the roundings.
            mant, exp = planned[i]
            scaled = accurates[i] * mant * num.pow2(exp)
            rounding = (1 + pipe.u_work) ** 3 * (1 + pipe.u_store) * (1 + f64)
            upper = torch.maximum(upper, scaled / (1 - eps) * rounding)
        fail = selected & (upper > pipe.bounds.hi)
        shrink = torch.where(fail, pipe.safe_shrink(upper, length), torch.ones_like(upper))
        _scale(m, pipe, fail, num.factors_of(shrink), cpu)

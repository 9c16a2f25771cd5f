r"""Plans: how a list of dense tensors is projected, and the dispatch to the kernels.

A [`Plan`][maxnorm_optim._plans.Plan] groups tensors by layout (contiguous rows,
batches of small tensors, any other layout, selected rows); it is bookkeeping only and
is reused while [`plan_key`][maxnorm_optim._plans.plan_key] stays the same.
[`project_dense_`][maxnorm_optim._plans.project_dense_] is the one dispatch point:
per tensor and call it picks the strategy of [`_kernels`][maxnorm_optim._kernels]:
`cpu` (CPU, eager), `sync_free` (accelerators) or `compiled` (under
`torch.compile`: the sync-free kernels, judged by the eager kernels' check norms).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _kernels as kn
from ._options import MaxNormOptions, NormDim, Skip, show, slice_dims

__all__ = [
    "BatchRecipe",
    "Bound",
    "Plan",
    "fingerprint",
    "forced_strategy",
    "is_dtensor",
    "make_plan",
    "plan_key",
    "project_dense_",
    "strategy",
]


@dataclass(frozen=True)
class BatchRecipe:
    """Small tensors normed together: their indices in the list, their slices each, the
    slice length, whether they are used as they are (`view=False`: the slices are their
    dim-0 slices) or viewed as `(slices, length)`, and the owner of every row."""

    indices: tuple[int, ...]
    sizes: tuple[int, ...]
    length: int
    view: bool
    owner: Tensor


@dataclass(frozen=True)
class Plan:
    """How a list of tensors is projected: layout only, by position in the list (no
    tensor of the list is referenced, so a cached plan keeps no weight alive).

    Valid for any list with the same [`plan_key`][maxnorm_optim._plans.plan_key];
    [`bind`][maxnorm_optim._plans.Plan.bind] pairs it with the tensors of a call.
    """

    rows: tuple[tuple[int, int], ...] = ()  # (index, slices)
    batches: tuple[BatchRecipe, ...] = ()
    generic: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (index, normed dims)
    selected: tuple[int, ...] = ()
    dtensors: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    slices: int = 0

    def bind(self, tensors: Sequence[Tensor]) -> Bound:
        """The kernels' view of this plan over `tensors` (cheap: one view per large
        tensor and per small tensor that is not used as it is)."""
        names = self.names
        batches = []
        for r in self.batches:
            members = [tensors[i] for i in r.indices]
            if r.view:
                members = [t.view(n, -1) for t, n in zip(members, r.sizes)]
            batches.append(
                kn.Batch(members, [names[i] for i in r.indices], list(r.sizes), r.length, r.owner)
            )
        return Bound(
            rows=[kn.Rows(tensors[i], tensors[i].view(n, -1), names[i]) for i, n in self.rows],
            batches=batches,
            generic=[kn.Generic(tensors[i], dims, names[i]) for i, dims in self.generic],
            selected={i: kn.Selected(tensors[i], names[i]) for i in self.selected},
            dtensors=[(tensors[i], names[i]) for i in self.dtensors],
        )


@dataclass
class Bound:
    """A [`Plan`][maxnorm_optim._plans.Plan] paired with the tensors of one call."""

    rows: list[kn.Rows] = field(default_factory=list)
    batches: list[kn.Batch] = field(default_factory=list)
    generic: list[kn.Generic] = field(default_factory=list)
    selected: dict[int, kn.Selected] = field(default_factory=dict)
    dtensors: list[tuple[Tensor, str]] = field(default_factory=list)


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def fingerprint(tensors: Sequence[Tensor]) -> tuple[Any, ...]:
    """What a plan depends on per tensor: data pointer, shape, strides and dtype (for a
    `DTensor`, those of its local shard and its placements; a new device means a new
    data pointer).

    Raises:
        AttributeError, RuntimeError, TypeError: an item is not a dense tensor.
    """
    try:
        return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors)
    except RuntimeError:  # DTensors have no storage of their own
        pass
    out = []
    for t in tensors:
        if is_dtensor(t):
            local = t.to_local()  # type: ignore[attr-defined]
            placements = t.placements  # type: ignore[attr-defined]
            out.append((local.data_ptr(), t.shape, local.stride(), placements))
        else:
            out.append((t.data_ptr(), t.shape, t.stride(), t.dtype))
    return tuple(out)


def plan_key(
    tensors: Sequence[Tensor],
    norm_dim: NormDim,
    selected: Iterable[int] = (),
    prints: tuple[Any, ...] | None = None,
) -> tuple[Any, ...]:
    """The key a `Plan` stays valid under: the `norm_dim`, which tensors have selected
    rows, and every tensor's `fingerprint` (`prints`, when already computed)."""
    return (norm_dim, tuple(selected), fingerprint(tensors) if prints is None else prints)


def _label(names: Sequence[str] | None, i: int) -> str:
    return names[i] if names is not None else f"tensor {i}"


def make_plan(
    tensors: Sequence[Tensor],
    norm_dim: NormDim,
    names: Sequence[str] | None = None,
    selected: Iterable[int] = (),
) -> Plan:
    """Group `tensors` by how they are projected.

    Args:
        tensors: dense tensors or DTensors (already validated, distinct).
        norm_dim: as for [`max_norm_`][maxnorm_optim.max_norm_].
        names: one name per tensor for error messages (default `"tensor i"`).
        selected: indices of tensors projected only on rows given per call.

    Raises:
        ValueError: `norm_dim` does not fit a tensor (naming it and its shape).
    """
    chosen = set(selected)
    rows: list[tuple[int, int]] = []
    generic: list[tuple[int, tuple[int, ...]]] = []
    picked: list[int] = []
    dtensors: list[int] = []
    slices = 0
    small: dict[tuple[Any, ...], list[tuple[int, int, int]]] = {}
    labels = tuple(_label(names, i) for i in range(len(tensors)))
    for i, t in enumerate(tensors):
        try:
            dims = slice_dims(norm_dim, t.dim())
        except IndexError as err:
            raise ValueError(
                f"norm_dim={show(norm_dim)} does not fit {labels[i]} of shape "
                f"{tuple(t.shape)} ({err})"
            ) from None
        if isinstance(dims, Skip):
            continue
        if is_dtensor(t):
            dtensors.append(i)
            continue
        all_dims = tuple(range(t.dim())) if dims is None else dims
        lead = all_dims[0] if all_dims else 0
        if i in chosen:
            picked.append(i)
            continue
        if t.numel() == 0:
            continue
        count = t.numel() // max(1, math.prod(t.shape[d] for d in all_dims))
        slices += count
        if all_dims != tuple(range(lead, t.dim())) or not t.is_contiguous():
            generic.append((i, all_dims))
        elif t.numel() <= kn.SMALL_NUMEL:
            # Tensors whose slices are their dim-0 slices are used as they are (no view
            # per call); the others are viewed as (slices, length).
            as_is = lead == 1
            key = (t.dtype, t.device, as_is, tuple(t.shape[1:]) if as_is else t.numel() // count)
            small.setdefault(key, []).append((i, count, t.numel()))
        else:
            rows.append((i, count))
    batches: list[BatchRecipe] = []
    for group in [m for m in small.values() if len(m) == 1]:
        rows.append((group[0][0], group[0][1]))  # alone: no copy into a batch
    for (_, device, as_is, _), members in small.items():
        if len(members) == 1:
            continue
        length = members[0][2] // members[0][1]
        chunk: list[tuple[int, int, int]] = []
        size = 0
        for member in members:
            if chunk and size + member[2] > kn.SCRATCH_NUMEL:
                batches.append(_recipe(chunk, length, not as_is, device))
                chunk, size = [], 0
            chunk.append(member)
            size += member[2]
        batches.append(_recipe(chunk, length, not as_is, device))
    return Plan(
        tuple(rows), tuple(batches), tuple(generic), tuple(picked), tuple(dtensors), labels, slices
    )


def _recipe(
    members: list[tuple[int, int, int]], length: int, view: bool, device: torch.device
) -> BatchRecipe:
    sizes = tuple(count for _, count, _ in members)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
    return BatchRecipe(tuple(i for i, _, _ in members), sizes, length, view, owner)


# -- dispatch --------------------------------------------------------------------------
_FORCED: list[str] = []  # tests run the sync-free strategy on CPU through this


@contextlib.contextmanager
def forced_strategy(name: str) -> Iterator[None]:
    """Run every eager projection with strategy `name` (`"cpu"` or `"sync_free"`), e.g.
    the accelerators' sync-free kernels on CPU in tests."""
    if name not in ("cpu", "sync_free"):
        raise ValueError(f"unknown strategy {name!r}")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def strategy(t: Tensor) -> str:
    """`"compiled"` under `torch.compile`, else `"cpu"` on CPU, `"sync_free"` elsewhere."""
    if torch.compiler.is_compiling():
        return "compiled"
    if _FORCED:
        return _FORCED[-1]
    return "cpu" if t.device.type == "cpu" else "sync_free"


def project_dense_(
    plan: Plan,
    tensors: Sequence[Tensor],
    options: MaxNormOptions,
    *,
    rows: dict[int, Tensor] | None = None,
    stats: kn.Stats | None = None,
    skip: Tensor | None = None,
) -> None:
    """Project the dense tensors of `plan` (over `tensors`) in place (validated
    `options`)."""
    check_nonfinite = options.error_if_nonfinite
    bound = plan.bind(tensors)
    def pipe_for(t: Tensor) -> kn.Pipeline:
        return kn.pipeline(options, t.dtype)

    for i, sel in bound.selected.items():
        assert rows is not None
        view = sel.tensor.view(sel.tensor.shape[0], -1)
        pipe = pipe_for(view)
        if strategy(view) == "cpu":
            kn.cpu_rows(pipe, view, sel.name, check_nonfinite, stats, skip, rows[i])
        else:
            sub = view.index_select(0, rows[i])
            kn.sync_free_rows(pipe, sub, sel.name, check_nonfinite, stats, skip)
            view.index_copy_(0, rows[i], sub)
    for item in bound.rows:
        pipe = pipe_for(item.rows)
        if strategy(item.rows) == "cpu":
            kn.cpu_rows(pipe, item.rows, item.name, check_nonfinite, stats, skip)
        else:
            kn.sync_free_rows(pipe, item.rows, item.name, check_nonfinite, stats, skip)
    for batch in bound.batches:
        pipe = pipe_for(batch.tensors[0])
        if strategy(batch.tensors[0]) == "cpu":
            kn.cpu_batch(pipe, batch, check_nonfinite, stats, skip)
        else:
            kn.sync_free_batch(pipe, batch, check_nonfinite, stats, skip)
    for gen in bound.generic:
        pipe = pipe_for(gen.tensor)
        if strategy(gen.tensor) == "cpu":
            kn.cpu_generic(pipe, gen, check_nonfinite, stats, skip)
        else:
            kn.sync_free_generic(pipe, gen, check_nonfinite, stats, skip)



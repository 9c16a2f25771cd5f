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
    "Plan",
    "fingerprint",
    "forced_strategy",
    "is_dtensor",
    "make_plan",
    "plan_key",
    "project_dense_",
    "strategy",
]


@dataclass
class Plan:
    """How a list of tensors is projected (bookkeeping only; no tensor math).

    Reusable while the tensors keep their identity, storage and layout and the
    `norm_dim` stays the same: see [`plan_key`][maxnorm_optim._projection.plan_key].
    """

    rows: list[kn.Rows] = field(default_factory=list)
    batches: list[kn.Batch] = field(default_factory=list)
    generic: list[kn.Generic] = field(default_factory=list)
    selected: dict[int, kn.Selected] = field(default_factory=dict)
    dtensors: list[tuple[Tensor, str]] = field(default_factory=list)
    slices: int = 0


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def fingerprint(tensors: Sequence[Tensor]) -> tuple[Any, ...]:
    """What a plan depends on per tensor: identity, data pointer, shape, strides and
    dtype (for a `DTensor`, those of its local shard and its placements; a new device
    means a new data pointer).

    Raises:
        AttributeError, RuntimeError, TypeError: an item is not a dense tensor.
    """
    try:
        return tuple((id(t), t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors)
    except RuntimeError:  # DTensors have no storage of their own
        pass
    out = []
    for t in tensors:
        if is_dtensor(t):
            local = t.to_local()  # type: ignore[attr-defined]
            placements = t.placements  # type: ignore[attr-defined]
            out.append((id(t), local.data_ptr(), t.shape, local.stride(), placements))
        else:
            out.append((id(t), t.data_ptr(), t.shape, t.stride(), t.dtype))
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
    plan = Plan()
    chosen = set(selected)
    small: dict[tuple[Any, ...], list[tuple[Tensor, str]]] = {}
    for i, t in enumerate(tensors):
        name = _label(names, i)
        try:
            dims = slice_dims(norm_dim, t.dim())
        except IndexError as err:
            raise ValueError(
                f"norm_dim={show(norm_dim)} does not fit {name} of shape {tuple(t.shape)} ({err})"
            ) from None
        if isinstance(dims, Skip):
            continue
        if is_dtensor(t):
            plan.dtensors.append((t, name))
            continue
        all_dims = tuple(range(t.dim())) if dims is None else dims
        lead = all_dims[0] if all_dims else 0
        if i in chosen:
            plan.selected[i] = kn.Selected(t, name)
            continue
        if t.numel() == 0:
            continue
        count = t.numel() // max(1, math.prod(t.shape[d] for d in all_dims))
        plan.slices += count
        trailing = all_dims == tuple(range(lead, t.dim()))
        if not trailing or not t.is_contiguous():
            plan.generic.append(kn.Generic(t, all_dims, name))
            continue
        rows = t.view(count, -1)
        if t.numel() <= kn.SMALL_NUMEL and count > 0:
            small.setdefault((t.dtype, t.device, rows.shape[1]), []).append((rows, name))
        else:
            plan.rows.append(kn.Rows(t, rows, name))
    for (_, device, length), members in small.items():
        chunk: list[tuple[Tensor, str]] = []
        size = 0
        for rows, name in members:
            if chunk and size + rows.numel() > kn.SCRATCH_NUMEL:
                plan.batches.append(_make_batch(chunk, length, device))
                chunk, size = [], 0
            chunk.append((rows, name))
            size += rows.numel()
        plan.batches.append(_make_batch(chunk, length, device))
    return plan


def _make_batch(members: list[tuple[Tensor, str]], length: int, device: torch.device) -> kn.Batch:
    sizes = [r.shape[0] for r, _ in members]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
    return kn.Batch([r for r, _ in members], [n for _, n in members], sizes, length, owner)


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
    options: MaxNormOptions,
    *,
    rows: dict[int, Tensor] | None = None,
    stats: kn.Stats | None = None,
    skip: Tensor | None = None,
) -> None:
    """Project the dense tensors of `plan` in place (validated `options`)."""
    check_nonfinite = options.error_if_nonfinite
    pipes: dict[tuple[torch.dtype, bool], kn.Pipeline] = {}

    def pipe_for(t: Tensor) -> kn.Pipeline:
        key = (t.dtype, t.is_complex())
        if key not in pipes:
            pipes[key] = kn.Pipeline(options, t.dtype, t.is_complex())
        return pipes[key]

    for i, sel in plan.selected.items():
        assert rows is not None
        view = sel.tensor.view(sel.tensor.shape[0], -1)
        pipe = pipe_for(view)
        if strategy(view) == "cpu":
            kn.cpu_rows(pipe, view, sel.name, check_nonfinite, stats, skip, rows[i])
        else:
            sub = view.index_select(0, rows[i])
            kn.sync_free_rows(pipe, sub, sel.name, check_nonfinite, stats, skip)
            view.index_copy_(0, rows[i], sub)
    for item in plan.rows:
        pipe = pipe_for(item.rows)
        if strategy(item.rows) == "cpu":
            kn.cpu_rows(pipe, item.rows, item.name, check_nonfinite, stats, skip)
        else:
            kn.sync_free_rows(pipe, item.rows, item.name, check_nonfinite, stats, skip)
    for batch in plan.batches:
        pipe = pipe_for(batch.tensors[0])
        if strategy(batch.tensors[0]) == "cpu":
            kn.cpu_batch(pipe, batch, check_nonfinite, stats, skip)
        else:
            kn.sync_free_batch(pipe, batch, check_nonfinite, stats, skip)
    for gen in plan.generic:
        pipe = pipe_for(gen.tensor)
        if strategy(gen.tensor) == "cpu":
            kn.cpu_generic(pipe, gen, check_nonfinite, stats, skip)
        else:
            kn.sync_free_generic(pipe, gen, check_nonfinite, stats, skip)



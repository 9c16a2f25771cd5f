"""Helpers that build param groups and describe which optimizers touch which rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .validation import PER_UNIT, normalize_options, resolve_norm_dim

__all__ = ["max_norm_param_groups", "sparse_rows_only", "unit_norm_dim"]

_PER_UNIT_LAYERS = (
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.modules.conv._ConvNd,
)


def unit_norm_dim(module: nn.Module, weight: Tensor) -> tuple[int, ...] | str | None:
    """The ``norm_dim`` giving one norm per output unit of ``module``'s ``weight``.

    ``ConvTransposeNd`` stores its weight as ``(in, out / groups, *kernel)``, so its
    per-unit norm runs over every dim except dim 1; every other supported layer keeps
    units on dim 0 (``"per_unit"``). Returns ``None`` for layers it does not know.

    With ``groups > 1`` a transposed convolution's slice ``[:, j]`` holds output unit
    ``j`` of every group.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (0, *range(2, weight.dim()))
    if isinstance(module, _PER_UNIT_LAYERS):
        return PER_UNIT
    return None


def max_norm_param_groups(
    module: nn.Module,
    max_norm: float,
    *,
    norm_type: float = 2.0,
    min_norm: float = 0.0,
    rate: float = 1.0,
    error_if_nonfinite: bool = False,
) -> list[dict[str, Any]]:
    """Split ``module``'s parameters into constrained and unconstrained param groups.

    The weights of ``Linear``, ``Bilinear``, ``Embedding``, ``ConvNd`` and
    ``ConvTransposeNd`` layers go into constrained groups (one group per distinct
    ``norm_dim``) with one norm per output unit; biases, normalisation-layer parameters
    and everything else go into a group with ``max_norm=None``. Empty groups are left
    out; a shared (tied) parameter appears once, where it is first met.

    Args:
        module: the model.
        max_norm: the bound for the constrained groups.
        norm_type: as for :class:`MaxNormWrapper`.
        min_norm: as for :class:`MaxNormWrapper`.
        rate: as for :class:`MaxNormWrapper`.
        error_if_nonfinite: as for :class:`MaxNormWrapper`.

    Returns:
        a list of param-group dicts for any optimizer.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> [(g["max_norm"], len(g["params"])) for g in max_norm_param_groups(model, 3.0)]
        [(3.0, 1), (None, 3)]
    """
    options = normalize_options(
        "max_norm_param_groups",
        {
            "max_norm": max_norm,
            "min_norm": min_norm,
            "rate": rate,
            "norm_dim": PER_UNIT,
            "norm_type": norm_type,
            "error_if_nonfinite": error_if_nonfinite,
        },
    )
    constrained: dict[Any, list[Tensor]] = {}
    rest: list[Tensor] = []
    seen: set[int] = set()
    for mod in module.modules():
        for name, param in mod.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            dims = unit_norm_dim(mod, param) if name == "weight" else None
            if dims is None:
                rest.append(param)
            else:
                constrained.setdefault(dims, []).append(param)
    groups: list[dict[str, Any]] = [
        {"params": params, **options, "norm_dim": dims} for dims, params in constrained.items()
    ]
    if rest:
        groups.append({"params": rest, "max_norm": None})
    return groups


def sparse_rows_only(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor
) -> bool:
    """Whether a step with a sparse gradient changes only the rows present in it.

    True for ``SparseAdam``; for ``SGD`` without momentum and weight decay; and for
    ``Adagrad`` (whose sparse path requires ``weight_decay == 0``); exact classes only,
    since a subclass may change ``step``. The projection then only needs to look at
    those rows, provided ``norm_dim`` gives one norm per row of a 2-d weight.
    """
    if param.dim() != 2 or resolve_norm_dim(group["norm_dim"], 2) != (1,):
        return False
    kind = type(optimizer)
    if kind is torch.optim.SparseAdam:
        return True
    if kind is torch.optim.SGD:
        return group.get("momentum", 0) == 0 and group.get("weight_decay", 0) == 0
    if kind is torch.optim.Adagrad:
        return group.get("weight_decay", 0) == 0
    return False

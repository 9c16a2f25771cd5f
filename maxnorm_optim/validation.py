"""Validation of the max-norm options of a param group.

Every check raises before anything is written, so a rejected call leaves the
optimizer, its param groups and the weights as they were.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "GROUP_DEFAULTS",
    "PER_UNIT",
    "NormDim",
    "normalize_options",
    "resolve_norm_dim",
    "validate_group",
]

#: Default ``norm_dim``: one norm per output unit, i.e. over every dim except dim 0
#: (a row of a ``Linear`` weight, a filter of a ``Conv`` weight, an embedding vector).
#: A 0-d or 1-d tensor is one vector. It is stored as this plain string so that
#: checkpoints stay loadable with ``torch.load(weights_only=True)``.
PER_UNIT = "per_unit"

NormDim = int | tuple[int, ...] | str | None

#: The param-group keys this library owns, with their defaults.
GROUP_DEFAULTS: dict[str, Any] = {
    "max_norm": None,
    "min_norm": 0.0,
    "rate": 1.0,
    "norm_dim": PER_UNIT,
    "norm_type": 2.0,
    "error_if_nonfinite": False,
}


def _where(group: int | str) -> str:
    return f"param group {group}" if isinstance(group, int) else str(group)


def _real(group: int | str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_where(group)}: {key} must be a real number, but got {value!r} "
            f"({type(value).__name__})"
        )
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{_where(group)}: {key} must not be NaN, but got {value!r}")
    return value


def _norm_dim(group: int | str, value: Any) -> NormDim:
    if value is None or value == PER_UNIT:
        return value
    if isinstance(value, str):
        raise ValueError(
            f"{_where(group)}: norm_dim must be an int, a tuple of ints, None or "
            f"{PER_UNIT!r}, but got {value!r}"
        )
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, Sequence) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in value
    ):
        dims = tuple(int(d) for d in value)
        if not dims:
            raise ValueError(
                f"{_where(group)}: norm_dim must not be empty (use None for the "
                f"whole tensor), but got {value!r}"
            )
        return dims
    raise TypeError(
        f"{_where(group)}: norm_dim must be an int, a tuple of ints, None or "
        f"{PER_UNIT!r}, but got {value!r} ({type(value).__name__})"
    )


def normalize_options(group: int | str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check the max-norm keys of ``options`` and return them in canonical form.

    Args:
        group: the param group's index (or a label such as ``"defaults"``), used in
            error messages.
        options: a mapping holding every key of :data:`GROUP_DEFAULTS`.

    Raises:
        TypeError, ValueError: naming the group, the key and the bad value.
    """
    out: dict[str, Any] = {}
    max_norm = options["max_norm"]
    if max_norm is not None:
        max_norm = _real(group, "max_norm", max_norm)
        if max_norm <= 0:
            raise ValueError(
                f"{_where(group)}: max_norm must be positive (or math.inf, or None to "
                f"leave the group unconstrained), but got {options['max_norm']!r}"
            )
    out["max_norm"] = max_norm

    min_norm = _real(group, "min_norm", options["min_norm"])
    upper = math.inf if max_norm is None else max_norm
    if not 0.0 <= min_norm <= upper:
        raise ValueError(
            f"{_where(group)}: min_norm must satisfy 0 <= min_norm <= max_norm "
            f"(max_norm={max_norm!r}), but got {options['min_norm']!r}"
        )
    if max_norm is None and min_norm > 0:
        raise ValueError(
            f"{_where(group)}: min_norm={options['min_norm']!r} needs a max_norm "
            f"(use max_norm=math.inf for a lower bound alone)"
        )
    out["min_norm"] = min_norm

    rate = _real(group, "rate", options["rate"])
    if not 0.0 < rate <= 1.0:
        raise ValueError(
            f"{_where(group)}: rate must satisfy 0 < rate <= 1, but got {options['rate']!r}"
        )
    out["rate"] = rate

    norm_type = _real(group, "norm_type", options["norm_type"])
    if norm_type < 1:
        raise ValueError(
            f"{_where(group)}: norm_type must be >= 1 or math.inf, but got {options['norm_type']!r}"
        )
    out["norm_type"] = norm_type

    out["norm_dim"] = _norm_dim(group, options["norm_dim"])

    flag = options["error_if_nonfinite"]
    if not isinstance(flag, bool):
        raise TypeError(f"{_where(group)}: error_if_nonfinite must be a bool, but got {flag!r}")
    out["error_if_nonfinite"] = flag
    return out


def resolve_norm_dim(norm_dim: NormDim, ndim: int) -> tuple[int, ...] | None:
    """Return the sorted, non-negative dims the norm runs over, or ``None`` for all.

    Raises:
        IndexError: if a dim is out of range for ``ndim`` dims or repeated.
    """
    if norm_dim == PER_UNIT:
        return tuple(range(1, ndim)) if ndim > 1 else None
    if norm_dim is None:
        return None
    dims = (norm_dim,) if isinstance(norm_dim, int) else tuple(norm_dim)
    size = max(ndim, 1)  # a 0-d tensor accepts dim 0 / -1, like vector_norm
    out = []
    for d in dims:
        if not -size <= d < size:
            raise IndexError(f"dim {d} out of range for a {ndim}-d tensor")
        out.append(d % size)
    if len(set(out)) != len(out):
        raise IndexError(f"dims {dims} repeat a dim")
    if ndim == 0 or len(out) == ndim:
        return None
    return tuple(sorted(out))


def validate_group(
    group_index: int, group: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate one param group (its own keys over ``defaults``) against its params.

    Returns:
        the canonical max-norm options of the group.
    """
    merged = {key: group.get(key, defaults.get(key, GROUP_DEFAULTS[key])) for key in GROUP_DEFAULTS}
    options = normalize_options(group_index, merged)
    if options["max_norm"] is not None:
        params = group.get("params", [])
        for j, p in enumerate(params if isinstance(params, (list, tuple)) else []):
            if not isinstance(p, torch.Tensor):
                continue
            try:
                resolve_norm_dim(options["norm_dim"], p.dim())
            except IndexError as err:
                raise ValueError(
                    f"param group {group_index}: norm_dim={merged['norm_dim']!r} does not "
                    f"fit parameter {j} of shape {tuple(p.shape)} ({err})"
                ) from None
    return options

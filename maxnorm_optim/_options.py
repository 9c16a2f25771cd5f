"""The max-norm options of a param group: validated once, into one immutable object.

Every check raises before anything is written, so a rejected call leaves the
optimizer, its param groups and the weights as they were. Values are type-strict: a
`bool`, a NumPy array or a tensor where a number is expected is rejected, and every
number is stored as a plain Python `float` (or `int` / `tuple` of ints for
`norm_dim`), so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "GROUP_DEFAULTS",
    "OPTION_KEYS",
    "PER_UNIT",
    "SKIP",
    "MaxNormOptions",
    "NormDim",
    "Skip",
    "parse_arguments",
    "parse_options",
    "show",
    "slice_dims",
]

#: Default `norm_dim`: one norm per dim-0 slice of a tensor with two or more dims
#: (a row of a `Linear` weight, a filter of a `Conv` weight, an embedding vector).
#: Tensors with fewer than two dims (biases, gains, scalars) are left unchanged.
PER_UNIT: Final = "per_unit"

NormDim = int | tuple[int, ...] | str | None

#: The param-group keys this library owns, in the order they are validated.
OPTION_KEYS: Final = ("max_norm", "norm_dim", "norm_type", "min_norm", "rate", "error_if_nonfinite")

#: The default of every key.
GROUP_DEFAULTS: Final[dict[str, Any]] = {
    "max_norm": None,
    "norm_dim": PER_UNIT,
    "norm_type": 2.0,
    "min_norm": 0.0,
    "rate": 1.0,
    "error_if_nonfinite": False,
}

# Longest repr of a bad value that an error message shows.
_SHOW_CHARS = 200


def show(value: Any) -> str:
    """`repr(value)`, cut to at most about 200 characters for error messages."""
    try:
        text = repr(value)
    except Exception:  # a value whose repr itself fails
        text = f"<{type(value).__name__}>"
    if len(text) > _SHOW_CHARS:
        text = f"{text[: _SHOW_CHARS - 20]}... ({len(text)} characters)"
    return text


@dataclass(frozen=True)
class MaxNormOptions:
    """The canonical max-norm options of one param group.

    Built only by [`parse_options`][maxnorm_optim._options.parse_options]; every
    kernel takes one of these, never a dict.
    """

    max_norm: float | None
    norm_dim: NormDim
    norm_type: float
    min_norm: float
    rate: float
    error_if_nonfinite: bool

    @property
    def active(self) -> bool:
        """Whether a projection can change anything (a bound is set and not a no-op)."""
        return self.max_norm is not None and (self.max_norm != math.inf or self.min_norm > 0)

    @property
    def upper(self) -> float:
        """The upper bound, `inf` for an unconstrained group."""
        return math.inf if self.max_norm is None else self.max_norm

    def as_group(self) -> dict[str, Any]:
        """The options as param-group entries (plain Python values)."""
        return {key: getattr(self, key) for key in OPTION_KEYS}


def _where(where: int | str) -> str:
    return f"param group {where}" if isinstance(where, int) else str(where)


def _real(where: int | str, key: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_where(where)}: {key} must be a real number"
            f"{' or None' if allow_none else ''}, but got {show(value)} ({type(value).__name__})"
        )
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        raise ValueError(
            f"{_where(where)}: {key}={show(value)} is not representable as a float"
        ) from None
    if math.isnan(number):
        raise ValueError(f"{_where(where)}: {key} must not be NaN")
    return number


def _norm_dim(where: int | str, value: Any) -> NormDim:
    if value is None or (isinstance(value, str) and value == PER_UNIT):
        return value
    if isinstance(value, str):
        raise ValueError(
            f"{_where(where)}: norm_dim must be an int, a tuple of ints, None or "
            f"{PER_UNIT!r}, but got {show(value)}"
        )
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (tuple, list)) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in value
    ):
        if not value:
            raise ValueError(
                f"{_where(where)}: norm_dim must not be empty (use None for the whole tensor)"
            )
        dims = tuple(int(d) for d in value)
        if len(set(dims)) != len(dims):
            raise ValueError(f"{_where(where)}: norm_dim={show(value)} repeats a dim")
        return dims
    raise TypeError(
        f"{_where(where)}: norm_dim must be an int, a tuple of ints, None or {PER_UNIT!r}, "
        f"but got {show(value)} ({type(value).__name__})"
    )


def parse_options(where: int | str, values: Mapping[str, Any]) -> MaxNormOptions:
    """Check the max-norm keys of `values` and return them as a `MaxNormOptions`.

    Args:
        where: the param group's index, or a label such as `"max_norm_"`, for messages.
        values: a mapping with every key of `OPTION_KEYS`.

    Raises:
        TypeError: a value of the wrong type (a `bool`, array or tensor for a number).
        ValueError: a value out of range; the message names the group, key and value.
    """
    max_norm = _real(where, "max_norm", values["max_norm"], allow_none=True)
    if max_norm is not None and max_norm <= 0:
        raise ValueError(
            f"{_where(where)}: max_norm must be positive (or math.inf, or None to leave the "
            f"group unconstrained), but got {show(values['max_norm'])}"
        )
    norm_type = _real(where, "norm_type", values["norm_type"])
    assert norm_type is not None
    if not norm_type >= 1:
        raise ValueError(
            f"{_where(where)}: norm_type must be >= 1 or math.inf, "
            f"but got {show(values['norm_type'])}"
        )
    min_norm = _real(where, "min_norm", values["min_norm"])
    assert min_norm is not None
    upper = math.inf if max_norm is None else max_norm
    if not 0.0 <= min_norm <= upper:
        raise ValueError(
            f"{_where(where)}: min_norm must satisfy 0 <= min_norm <= max_norm "
            f"(max_norm={max_norm!r}), but got {show(values['min_norm'])}"
        )
    if min_norm == math.inf:
        raise ValueError(f"{_where(where)}: min_norm must be finite")
    if max_norm is None and min_norm > 0:
        raise ValueError(
            f"{_where(where)}: min_norm={min_norm!r} needs a max_norm "
            "(use max_norm=math.inf for a lower bound alone)"
        )
    rate = _real(where, "rate", values["rate"])
    assert rate is not None
    if not 0.0 < rate <= 1.0:
        raise ValueError(
            f"{_where(where)}: rate must satisfy 0 < rate <= 1, but got {show(values['rate'])}"
        )
    flag = values["error_if_nonfinite"]
    if not isinstance(flag, bool):
        raise TypeError(
            f"{_where(where)}: error_if_nonfinite must be a bool, but got {show(flag)} "
            f"({type(flag).__name__})"
        )
    return MaxNormOptions(
        max_norm=max_norm,
        norm_dim=_norm_dim(where, values["norm_dim"]),
        norm_type=norm_type,
        min_norm=min_norm,
        rate=rate,
        error_if_nonfinite=flag,
    )


def parse_arguments(
    where: int | str,
    *,
    max_norm: Any,
    norm_dim: Any,
    norm_type: Any,
    min_norm: Any,
    rate: Any,
    error_if_nonfinite: Any,
) -> MaxNormOptions:
    """`parse_options` of keyword arguments (as `max_norm_` and `MaxNormWrapper` take
    them)."""
    return parse_options(
        where,
        {
            "max_norm": max_norm,
            "min_norm": min_norm,
            "rate": rate,
            "norm_dim": norm_dim,
            "norm_type": norm_type,
            "error_if_nonfinite": error_if_nonfinite,
        },
    )


class Skip:
    """Marker returned by `slice_dims`: the tensor has no slice to constrain."""

    def __repr__(self) -> str:
        return "SKIP"


SKIP: Final = Skip()


def slice_dims(norm_dim: NormDim, ndim: int) -> tuple[int, ...] | Skip | None:
    """The sorted non-negative dims one norm runs over, for a tensor of `ndim` dims.

    Returns `None` for "every dim" (the tensor is one slice) and `SKIP` under
    `"per_unit"` for tensors with fewer than two dims.

    Raises:
        IndexError: a dim out of range or given twice (after wrapping negatives).
    """
    if isinstance(norm_dim, str):
        return tuple(range(1, ndim)) if ndim >= 2 else SKIP
    if norm_dim is None:
        return None
    dims = (norm_dim,) if isinstance(norm_dim, int) else norm_dim
    size = max(ndim, 1)  # a 0-d tensor takes dim 0 / -1, like vector_norm
    out = []
    for d in dims:
        if not -size <= d < size:
            raise IndexError(f"dim {d} is out of range for a {ndim}-d tensor")
        out.append(d % size)
    if len(set(out)) != len(out):
        raise IndexError(f"dims {dims} name the same dim twice for a {ndim}-d tensor")
    if ndim == 0 or len(out) == ndim:
        return None
    return tuple(sorted(out))

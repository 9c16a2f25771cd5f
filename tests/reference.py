"""Plain reference implementations the library is checked against."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_dims(norm_dim, ndim: int):
    """Dims of one norm, written out independently of the library."""
    if norm_dim == "per_unit":
        return tuple(range(1, ndim)) if ndim > 1 else None
    return norm_dim


def reference_project(
    w: Tensor,
    max_norm: float,
    norm_dim="per_unit",
    p: float = 2.0,
    min_norm: float = 0.0,
    rate: float = 1.0,
) -> Tensor:
    """Out-of-place projection computed in float64 (complex128), one formula per slice."""
    wide = torch.complex128 if w.is_complex() else torch.float64
    x = w.detach().to(wide)
    dims = reference_dims(norm_dim, w.dim())
    n = torch.linalg.vector_norm(x, p, dim=dims, keepdim=True) if w.dim() else x.abs()
    target = rate * n.clamp(min=min_norm, max=max_norm) + (1 - rate) * n
    finite = torch.isfinite(n)
    outside = finite & ((n > max_norm) | ((n < min_norm) & (n > 0)))
    scaled = (x * (target / n)).to(w.dtype)
    return torch.where(outside, scaled, w.detach())


def slice_norms(w: Tensor, norm_dim="per_unit", p: float = 2.0) -> Tensor:
    """Slice norms recomputed in float64."""
    wide = torch.complex128 if w.is_complex() else torch.float64
    dims = reference_dims(norm_dim, w.dim())
    x = w.detach().to(wide)
    return torch.linalg.vector_norm(x, p, dim=dims, keepdim=True) if w.dim() else x.abs()


def eps(dtype: torch.dtype) -> float:
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    return torch.finfo(real).eps


def bound(max_norm: float, dtype: torch.dtype) -> float:
    return max_norm * (1 + 4 * eps(dtype)) if math.isfinite(max_norm) else max_norm

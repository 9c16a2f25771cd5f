"""The one float64 reference every test file checks the library against.

Written from the definitions, independently of the library: which dims a norm runs
over, the projection of each slice in float64 (complex128), the norm a user checks, and
norms that never over- or underflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SKIP = "skip"  # reference_dims: the tensor has no slice under "per_unit"


def reference_dims(norm_dim, ndim: int):
    """Dims of one norm: `"per_unit"` is every dim but 0 of a tensor with >= 2 dims and
    nothing at all (`SKIP`) below that; `None` is every dim."""
    if norm_dim == "per_unit":
        return tuple(range(1, ndim)) if ndim >= 2 else SKIP
    if norm_dim is None:
        return tuple(range(ndim))
    dims = (norm_dim,) if isinstance(norm_dim, int) else tuple(norm_dim)
    return tuple(d % max(ndim, 1) for d in dims)


def wide(t: Tensor) -> Tensor:
    return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)


def _norm(x: Tensor, p: float, dims) -> Tensor:
    if x.dim() == 0:
        return x.abs()
    return torch.linalg.vector_norm(x, p, dim=dims, keepdim=True)


def robust_norms(w: Tensor, norm_dim="per_unit", p: float = 2.0) -> Tensor:
    """Slice norms in float64 as `m * ||v / m||_p` with `m` the slice's largest
    magnitude: never over- or underflows (keepdim; zeros under `SKIP`)."""
    dims = reference_dims(norm_dim, w.dim())
    x = wide(w).abs()
    if dims == SKIP:
        return torch.zeros([1] * w.dim(), dtype=torch.float64)
    if x.dim() == 0:
        return x
    m = x.amax(dim=dims, keepdim=True)
    safe = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return torch.where(
        torch.isfinite(m) & (m > 0), safe * _norm(x / safe, p, dims), _norm(x, p, dims)
    )


def slice_norms(w: Tensor, norm_dim="per_unit", p: float = 2.0) -> Tensor:
    """Slice norms in float64 (keepdim; zeros under `SKIP`), plain `vector_norm`."""
    dims = reference_dims(norm_dim, w.dim())
    if dims == SKIP:
        return torch.zeros([1] * w.dim(), dtype=torch.float64)
    return _norm(wide(w), p, dims)


def check_norms(w: Tensor, norm_dim="per_unit", p: float = 2.0) -> Tensor:
    """The norm a user checks: `vector_norm` in the tensor's dtype (fp32 for fp16/bf16)."""
    dims = reference_dims(norm_dim, w.dim())
    acc = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else None
    if dims == SKIP:
        return torch.zeros([1] * w.dim())
    if w.dim() == 0:
        return w.detach().abs().to(acc or w.real.dtype)
    return torch.linalg.vector_norm(w.detach(), p, dim=dims, keepdim=True, dtype=acc)


def reference_project(
    w: Tensor,
    max_norm: float,
    norm_dim="per_unit",
    p: float = 2.0,
    min_norm: float = 0.0,
    rate: float = 1.0,
) -> Tensor:
    """Out-of-place projection in float64, one formula per slice:
    `v * t(n) / n`, `t(n) = rate * clamp(n, min_norm, max_norm) + (1 - rate) * n`,
    for slices with `n` outside `[min_norm, max_norm]`; every other slice (and NaN/inf
    slices, and tensors without slices) unchanged."""
    if reference_dims(norm_dim, w.dim()) == SKIP:
        return w.detach().clone()
    x = wide(w)
    n = robust_norms(w, norm_dim, p)
    target = rate * n.clamp(min=min_norm, max=max_norm) + (1 - rate) * n
    outside = torch.isfinite(n) & ((n > max_norm) | ((n < min_norm) & (n > 0)))
    scaled = (x * (target / torch.where(outside, n, torch.ones_like(n)))).to(w.dtype)
    return torch.where(outside, scaled, w.detach())


def slice_length(w: Tensor, norm_dim) -> int:
    dims = reference_dims(norm_dim, w.dim())
    if dims == SKIP or w.dim() == 0:
        return 1
    return math.prod(w.shape[d] for d in dims)


def landing_gap(length: int, dtype: torch.dtype) -> float:
    """How far under the bound (relative) a scaled slice of `length` may land, as the
    docs state it: 1e-5, plus `3 length u` (u the unit roundoff of the check dtype)
    where the factors come from the check norm and its proven rounding error (aimed
    under by twice that error, from a norm that may read high by it once more)."""
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return 1e-5 + 1.5 * length * eps(acc)


def eps(dtype: torch.dtype) -> float:
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    return torch.finfo(real).eps


def bits(t: Tensor) -> Tensor:
    """The raw bits of `t` (complex as pairs), for bitwise comparisons that see -0.0 and
    NaN payloads."""
    t = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def power_fits(c: float, p: float, dtype: torch.dtype, length: int = 1) -> bool:
    """Whether `vector_norm` in `dtype` can judge slices of `length` at norm `c`: `c ** p`
    neither overflows `dtype` nor lies where `length` terms of it underflow (below
    `length * tiny / eps`)."""
    if p == math.inf:
        return True
    info = torch.finfo(dtype)
    try:
        power = c**p
    except OverflowError:
        return False
    return power * 4 < info.max and (p == 1 or power > 2**p * length * info.tiny / info.eps)

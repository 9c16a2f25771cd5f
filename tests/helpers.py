"""Shared helpers for the compatibility tests: assertions on top of the plain reference
projection of ``reference.py``, and small training drivers."""

from __future__ import annotations

import copy
import functools
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from reference import check_norms, reference_project, same_bits, slice_norms

# Scaled slices are compared with this relative tolerance (the library aims just inside
# the bound: a few ulps, more on long slices); slices the reference leaves alone must
# be bitwise equal.
RTOL = 1e-5


def assert_projected(actual: Tensor, before: Tensor, max_norm: float, **kw: Any) -> int:
    """``actual`` is ``before`` projected: scaled slices close, the others bitwise equal.

    Returns the number of scaled elements (so that callers can check the case ran).
    """
    norm_dim, p = kw.get("norm_dim", "per_unit"), kw.get("p", 2.0)
    expected = reference_project(before, max_norm, norm_dim, p)
    mask = (slice_norms(before, norm_dim, p) > max_norm).expand_as(before)
    a = actual.detach()
    assert same_bits(a[~mask], expected[~mask]), "an in-bound slice changed"
    torch.testing.assert_close(a[mask], expected[mask], rtol=RTOL, atol=0.0)
    return int(mask.sum())


def assert_within(t: Tensor, max_norm: float, norm_dim: Any = "per_unit", p: float = 2.0):
    """Every finite slice's norm, computed in the tensor's own dtype and in float64, is
    ``<= max_norm`` (tensors without slices pass; slices holding NaN or inf are left
    alone by the projection, so they are not bounded)."""
    n = check_norms(t, norm_dim, p)
    wide = slice_norms(t, norm_dim, p)
    finite = torch.isfinite(wide)
    assert bool((n[finite] <= max_norm).all()), f"norms {n.flatten().tolist()} exceed {max_norm}"
    assert bool((wide[finite] <= max_norm).all())


def assert_state_equal(a: Any, b: Any, path: str = "state") -> None:
    """Recursive bitwise equality of optimizer-state-like objects."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (
            a.is_floating_point()
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def per_param_state(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Any]:
    return [opt.state.get(p, {}) for p in params]


def roundtrip(obj: Any) -> Any:
    """``torch.save`` / ``torch.load(weights_only=True)`` through memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def clone_params(params: Sequence[Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def deep(x: Any) -> Any:
    return copy.deepcopy(x)


def make_weight(rows: int, cols: int, norms: Sequence[float], seed: int) -> Tensor:
    """A ``rows x cols`` float32 tensor whose row norms are ``norms`` (cycled)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    scale = torch.tensor([norms[i % len(norms)] for i in range(rows)], dtype=torch.float64)
    return (w * scale[:, None]).to(torch.float32)


@functools.lru_cache(maxsize=1024)
def _loss_constants(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2.0, torch.rand(shape, generator=g) + 0.5


def quadratic_loss(params: Sequence[Tensor], step: int) -> Tensor:
    """A deterministic, step-dependent smooth loss of ``params`` (twice differentiable)."""
    total = torch.zeros((), dtype=params[0].dtype)
    for i, p in enumerate(params):
        target, weight = _loss_constants(tuple(p.shape), 1000 * i + step)
        total = total + ((p - target) ** 2 * weight).sum() + 0.1 * (p.sum() ** 2)
    return total


def drive(
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    step: int,
    *,
    loss_fn: Callable[[Sequence[Tensor], int], Tensor] = quadratic_loss,
    closure: bool = False,
    create_graph: bool = False,
) -> None:
    """One training step: seeded RNG, zero_grad, backward (or a closure), step."""
    torch.manual_seed(step)

    def closure_fn() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(params, step)
        loss.backward(create_graph=create_graph)
        return loss

    if closure:
        opt.step(closure_fn)
    else:
        closure_fn()
        opt.step()

"""What the projection is compared with: the naive loop, ``torch.renorm_`` and the
read floor (the cheapest single read of all the weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["naive_loop_", "read_floors", "renorm_loop_"]


@torch.no_grad()
def naive_loop_(weights: list[Tensor], max_norm: float) -> None:
    """The issue's per-parameter loop: norm, clamp, ``w *= desired / norm`` (``vector_norm``
    over every dim but 0, as ``w.norm(dim=...)`` does for 2-d weights)."""
    for w in weights:
        norm = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
        desired = norm.clamp(max=max_norm)
        w *= desired / norm


@torch.no_grad()
def renorm_loop_(weights: list[Tensor], max_norm: float) -> None:
    """``torch.renorm_`` per tensor over dim 0 (scales by ``max_norm / (norm + 1e-7)``,
    so it is a comparison of cost only, not of results)."""
    for w in weights:
        w.renorm_(2, 0, max_norm)


def read_floors(weights: list[Tensor]) -> dict[str, Callable[[], object]]:
    """Candidates for "one read of the weights"; the harness reports the faster.

    ``foreach_norm``: ``torch._foreach_norm(weights)`` (one call, one norm per tensor);
    ``vector_norm``: ``torch.linalg.vector_norm(w)`` per tensor;
    ``row_norms``: ``torch.linalg.vector_norm(w.flatten(1), dim=1)`` per tensor, i.e. the
    slice norms themselves, which is what a projection must read (on CPU this is often
    faster than a whole-tensor norm).
    """

    def foreach_norm() -> object:
        return torch._foreach_norm(weights)

    def vector_norm() -> object:
        return [torch.linalg.vector_norm(w) for w in weights]

    def row_norms() -> object:
        return [torch.linalg.vector_norm(w.flatten(1), dim=1) for w in weights]

    return {"foreach_norm": foreach_norm, "vector_norm": vector_norm, "row_norms": row_norms}

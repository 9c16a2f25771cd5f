"""What a user would run instead of ``maxnorm_optim``: the peers of the comparison.

Every dense peer takes the list of constrained weights and the bound ``c`` and works
in place, per output unit (every dim but dim 0):

* :func:`read_floor`: ``torch._foreach_norm(weights)``, one read pass of the weights
  and no write; no projection can cost less, so every time is also reported as a
  multiple of it;
* :func:`renorm_each_`: ``w.renorm_(2, 0, c)`` per tensor. It scales an out-of-bound
  slice by ``c / (n + 1e-7)``, not ``c / n``, so its result differs slightly: a cost
  peer only;
* :func:`snippet_`: the usual forum snippet, corrected so that in-bound slices are
  multiplied by exactly 1 and zero slices give no NaN, eager, per tensor;
* :func:`compile_snippet`: the same snippet over the whole list as one
  ``torch.compile`` function.

:func:`touched_rows_snippet_` is the hand-written peer of the sparse case: project only
the rows a sparse gradient touched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DENSE_PEERS",
    "compile_snippet",
    "read_floor",
    "renorm_each_",
    "snippet_",
    "touched_rows_snippet_",
]

# Peers of the dense comparison, in table order (the floor is reported separately).
DENSE_PEERS = ("renorm_", "snippet", "compiled")


def read_floor(weights: list[Tensor]) -> object:
    return torch._foreach_norm(weights)


@torch.no_grad()
def renorm_each_(weights: list[Tensor], c: float) -> None:
    for w in weights:
        w.renorm_(2, 0, c)


def _snippet(weights: list[Tensor], c: float) -> None:
    for w in weights:
        n = w.norm(2, dim=tuple(range(1, w.dim())), keepdim=True).clamp(min=c / 2)
        w *= n.clamp(max=c) / n


@torch.no_grad()
def snippet_(weights: list[Tensor], c: float) -> None:
    _snippet(weights, c)


def compile_snippet(c: float) -> Callable[[list[Tensor]], None]:
    """``torch.compile`` (``dynamic=False``) of the snippet over a whole list.

    Resets the compiler caches first: each call of this function is a fresh compile
    for whatever list the returned function is first called with (its first call
    compiles; the harness times it separately).
    """
    torch.compiler.reset()

    def project_all(weights: list[Tensor]) -> None:
        _snippet(weights, c)

    compiled = torch.compile(project_all, dynamic=False)

    @torch.no_grad()
    def run(weights: list[Tensor]) -> None:
        compiled(weights)

    return run


@torch.no_grad()
def touched_rows_snippet_(w: Tensor, c: float) -> None:
    """Project the rows of ``w`` that its sparse gradient touched (after the step).

    In-bound rows are multiplied by exactly 1 (``min(c / n, 1)``), zero rows too.
    """
    assert w.grad is not None
    idx = w.grad.coalesce().indices()[0]
    rows = w.index_select(0, idx)
    scale = torch.linalg.vector_norm(rows, dim=1, keepdim=True).reciprocal_().mul_(c)
    w.index_copy_(0, idx, rows.mul_(scale.clamp_(max=1.0)))

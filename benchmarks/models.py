"""The model families of issue 4, as lists of constrained weights and other params.

Gradients are random (no forward pass is needed to time a projection or an optimizer
step). The weights of one family that share a slice length are views into one flat
``(rows, slice_len)`` buffer, so that the harness can re-arm every out-of-bound slice
with a single ``index_copy_`` per slice length (see :class:`Family`); each weight is
still a separate contiguous tensor, which is all the projection sees.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DENSE_FAMILIES", "Family", "build_dense", "build_embedding", "dense_shapes"]

DENSE_FAMILIES = ("mlp", "big_linear", "many_small", "small_cnn")

# Bound used by every family (the weights are scaled around it).
MAX_NORM = 1.0


def dense_shapes(name: str, quick: bool) -> tuple[list[tuple[int, ...]], list[int]]:
    """Weight shapes (constrained, one slice per output unit) and bias sizes."""
    if name == "mlp":  # MLP 784-1024-1024-10
        dims = [784, 1024, 1024, 10]
        weights = [(o, i) for i, o in itertools.pairwise(dims)]
        return weights, [o for o, _ in weights]
    if name == "big_linear":  # 4 x Linear(4096, 4096)
        n = 1024 if quick else 4096
        return [(n, n)] * 4, [n] * 4
    if name == "many_small":  # 300 x Linear(64, 64)
        return [(64, 64)] * 300, [64] * 300
    if name == "small_cnn":  # 3 convs + 2 linears (a CIFAR-10 style net)
        weights = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (512, 256 * 4 * 4), (10, 512)]
        return weights, [w[0] for w in weights]
    raise ValueError(f"unknown family {name!r}")


@dataclass
class Family:
    """Constrained ``weights`` (views into per-slice-length ``buffers``) and ``others``.

    ``over[k]`` are the rows of ``buffers[k]`` whose norm exceeds ``MAX_NORM`` and
    ``saved[k]`` their original values: :meth:`rearm` writes them back, which undoes
    any projection (in-bound rows are never changed by a projection).
    """

    name: str
    weights: list[Tensor]
    others: list[Tensor]
    buffers: list[Tensor] = field(default_factory=list)
    over: list[Tensor] = field(default_factory=list)
    saved: list[Tensor] = field(default_factory=list)
    fraction: float = 0.0

    @property
    def params(self) -> list[Tensor]:
        return self.weights + self.others

    @property
    def slices(self) -> int:
        return sum(w.shape[0] for w in self.weights)

    @property
    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)

    def rearm(self) -> None:
        for buf, idx, rows in zip(self.buffers, self.over, self.saved):
            if idx.numel():
                buf.index_copy_(0, idx, rows)

    def set_fraction(self, fraction: float, seed: int = 0) -> None:
        """Rescale rows so that ``round(fraction * slices)`` of them exceed the bound.

        Out-of-bound rows get norms uniform in ``[1.1, 2] * MAX_NORM``, the others in
        ``[0.3, 0.95] * MAX_NORM``; the chosen rows are spread at random over the
        whole family.
        """
        gen = torch.Generator().manual_seed(seed)
        total = sum(b.shape[0] for b in self.buffers)
        count = round(fraction * total)
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.randperm(total, generator=gen)[:count]] = True
        self.over, self.saved = [], []
        start = 0
        with torch.no_grad():
            for buf in self.buffers:
                n = buf.shape[0]
                mask = chosen[start : start + n]
                start += n
                u = torch.rand(n, generator=gen, dtype=torch.float64)
                target = torch.where(mask, 1.1 + 0.9 * u, 0.3 + 0.65 * u) * MAX_NORM
                norms = torch.linalg.vector_norm(buf, dim=1, dtype=torch.float64)
                buf.mul_((target / norms).to(buf.dtype, copy=True).unsqueeze(1).to(buf.device))
                idx = mask.nonzero().squeeze(1).to(buf.device)
                self.over.append(idx)
                self.saved.append(buf.index_select(0, idx).clone())
        self.fraction = fraction


def _views(shapes: list[tuple[int, ...]], device: torch.device, gen: torch.Generator):
    """One flat buffer per slice length; weights are contiguous views into it."""
    by_len: dict[int, list[int]] = {}
    for k, s in enumerate(shapes):
        by_len.setdefault(math.prod(s[1:]), []).append(k)
    weights: list[Tensor | None] = [None] * len(shapes)
    buffers = []
    for length, members in by_len.items():
        rows = sum(shapes[k][0] for k in members)
        buf = torch.randn(rows, length, generator=gen).to(device)
        buffers.append(buf)
        start = 0
        for k in members:
            n = shapes[k][0]
            w = buf[start : start + n].view(shapes[k])
            weights[k] = torch.nn.Parameter(w)
            start += n
    return [w for w in weights if w is not None], buffers


def build_dense(name: str, device: torch.device, quick: bool, seed: int = 0) -> Family:
    """A dense family with random gradients on every parameter."""
    gen = torch.Generator().manual_seed(seed)
    wshapes, bsizes = dense_shapes(name, quick)
    weights, buffers = _views(wshapes, device, gen)
    others = [torch.nn.Parameter(0.01 * torch.randn(n, generator=gen).to(device)) for n in bsizes]
    for p in weights + others:
        p.grad = 1e-3 * torch.randn(p.shape, generator=gen).to(device)
    fam = Family(name, weights, others, buffers)
    fam.set_fraction(0.0)
    return fam


def build_embedding(
    device: torch.device, quick: bool, touched: int = 4096, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``Embedding(1e6, 64)`` weight (1e5 rows in quick mode), rows inside the bound,
    and a coalesced sparse gradient on ``touched`` distinct rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = 100_000 if quick else 1_000_000
    w = torch.randn(rows, 64, generator=gen)
    w.mul_((0.5 * MAX_NORM / w.norm(dim=1)).unsqueeze(1))
    idx = torch.randperm(rows, generator=gen)[:touched].sort().values
    vals = 1e-2 * torch.randn(touched, 64, generator=gen)
    grad = torch.sparse_coo_tensor(
        idx.unsqueeze(0), vals, (rows, 64), check_invariants=True
    ).coalesce()
    return torch.nn.Parameter(w.to(device)), grad.to(device)

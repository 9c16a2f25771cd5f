"""What is projected: model families, scaling sweeps, the sparse embedding, training models.

A :class:`Family` is a list of constrained weights (projected per output unit) plus
the other parameters of the model (biases, never constrained). The weights of one
family that share a slice length are contiguous views into one flat
``(rows, slice_len)`` buffer, so that the harness can re-arm every out-of-bound slice
with a single ``index_copy_`` per slice length; each weight is still a separate
contiguous tensor, which is all a projection sees.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "DENSE_FAMILIES",
    "MAX_NORM",
    "TRAIN_MAX_NORM",
    "Family",
    "build_dense",
    "build_embedding_sparse",
    "build_family",
    "build_training_model",
    "dense_shapes",
    "sweep_sizes",
]

DENSE_FAMILIES = ("mlp", "big_linear", "many_small", "small_cnn", "embedding")

# Bound used by every projection benchmark (the weights are scaled around it).
MAX_NORM = 1.0
# Bound of the training-step benchmark. PyTorch's default init gives every Linear and
# Conv row a norm of about 1/sqrt(3) = 0.577, so with 0.5 every row sits at the bound
# after the first step and the constraint stays active (about half the rows go back
# over it at each step; the harness reports the measured share).
TRAIN_MAX_NORM = 0.5

Shape = tuple[int, ...]


def dense_shapes(name: str, quick: bool) -> tuple[list[Shape], list[int]]:
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
    if name == "small_cnn":  # 3 convs + 2 linears (a CIFAR-10 style net, see CNN below)
        weights = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (512, 256 * 4 * 4), (10, 512)]
        return weights, [w[0] for w in weights]
    if name == "embedding":  # Embedding(1e6, 64), every row projected
        return [(100_000 if quick else 1_000_000, 64)], []
    raise ValueError(f"unknown family {name!r}")


def sweep_sizes(quick: bool) -> tuple[list[int], list[int]]:
    """Side lengths of the single square tensors, and counts of 64 x 64 tensors."""
    if quick:
        return [256, 512, 1024], [10, 30, 100]
    return [256, 512, 1024, 2048, 4096, 8192], [10, 30, 100, 300, 1000, 3000]


@dataclass
class Family:
    """Constrained ``weights`` (views into per-slice-length ``buffers``) and ``others``.

    ``over[k]`` are the rows of ``buffers[k]`` whose norm exceeds ``MAX_NORM`` and
    ``saved[k]`` their original values: :meth:`rearm` writes them back, which undoes
    any projection that leaves in-bound rows unchanged.
    """

    name: str
    weights: list[Tensor]
    others: list[Tensor]
    buffers: list[Tensor] = field(default_factory=list)
    over: list[Tensor] = field(default_factory=list)
    saved: list[Tensor] = field(default_factory=list)
    fraction: float = 0.0

    @property
    def slices(self) -> int:
        return sum(w.shape[0] for w in self.weights)

    @property
    def slices_over(self) -> int:
        return sum(i.numel() for i in self.over)

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
                norm = torch.where(mask, 1.1 + 0.9 * u, 0.3 + 0.65 * u) * MAX_NORM
                current = torch.linalg.vector_norm(buf, dim=1, dtype=torch.float64).cpu()
                scale = (norm / current).to(buf.dtype).unsqueeze(1).to(buf.device)
                buf.mul_(scale)
                idx = mask.nonzero().squeeze(1).to(buf.device)
                self.over.append(idx)
                self.saved.append(buf.index_select(0, idx).clone())
        self.fraction = fraction


def _views(
    shapes: Sequence[Shape], device: torch.device, gen: torch.Generator
) -> tuple[list[Tensor], list[Tensor]]:
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
            weights[k] = nn.Parameter(buf[start : start + n].view(shapes[k]))
            start += n
    return [w for w in weights if w is not None], buffers


def build_family(
    name: str,
    shapes: Sequence[Shape],
    bias_sizes: Sequence[int],
    device: torch.device,
    seed: int = 0,
) -> Family:
    gen = torch.Generator().manual_seed(seed)
    weights, buffers = _views(shapes, device, gen)
    others = [nn.Parameter(0.01 * torch.randn(n, generator=gen).to(device)) for n in bias_sizes]
    fam = Family(name, weights, others, buffers)
    fam.set_fraction(0.0)
    return fam


def build_dense(name: str, device: torch.device, quick: bool, seed: int = 0) -> Family:
    shapes, biases = dense_shapes(name, quick)
    return build_family(name, shapes, biases, device, seed)


def build_embedding_sparse(
    device: torch.device, quick: bool, touched: int, fraction: float, copies: int = 3
) -> tuple[list[nn.Parameter], Tensor]:
    """``copies`` identical ``Embedding(1e6, 64)`` weights (1e5 rows in quick mode),
    each with the same coalesced sparse gradient on ``touched`` distinct rows.

    ``round(fraction * touched)`` of the touched rows sit at the bound ``MAX_NORM`` with
    a gradient pointing outwards, so that every Adam step takes them over it again (a
    steady state: the projection brings them back, the next step pushes them out); the
    other touched rows sit at ``0.5 * MAX_NORM`` with a zero gradient (Adam leaves them
    where they are), as do the rows no gradient touches. Nothing but each copy's own
    optimizer writes to it, so the wrapper's touched-rows rule holds at every step.
    """
    gen = torch.Generator().manual_seed(0)
    rows = 100_000 if quick else 1_000_000
    w = torch.randn(rows, 64, generator=gen)
    w.mul_((0.5 * MAX_NORM / w.norm(dim=1)).unsqueeze(1))
    idx = torch.randperm(rows, generator=gen)[:touched].sort().values
    over = torch.zeros(touched, dtype=torch.bool)
    over[torch.randperm(touched, generator=gen)[: round(fraction * touched)]] = True
    picked = w.index_select(0, idx)
    picked[over] *= 2.0  # at the bound
    w.index_copy_(0, idx, picked)
    vals = torch.where(over.unsqueeze(1), -picked, torch.zeros_like(picked))
    grad = torch.sparse_coo_tensor(
        idx.unsqueeze(0), vals, (rows, 64), check_invariants=True
    ).coalesce()
    params = [nn.Parameter(w.clone().to(device)) for _ in range(copies)]
    grad = grad.to(device)
    for p in params:
        p.grad = grad
    return params, idx.to(device)


class CNN(nn.Module):
    """The ``small_cnn`` family as a model: 3 x (conv 3x3, ReLU, max-pool 2) on
    3 x 32 x 32 inputs, then Linear(4096, 512), ReLU, Linear(512, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_training_model(
    name: str, device: torch.device, quick: bool, copies: int, seed: int = 0, batches: int = 8
) -> tuple[list[nn.Module], list[tuple[Tensor, Tensor]]]:
    """``copies`` identical models (``mlp`` or ``small_cnn``) and ``batches`` random
    batches (inputs, labels) to cycle through.

    Batch: 128 x 784 for the MLP, 64 x 3 x 32 x 32 for the CNN (quick: 16 and 4).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model: nn.Module
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
        shape: Shape = (16 if quick else 128, 784)
    elif name == "small_cnn":
        model = CNN()
        shape = (4 if quick else 64, 3, 32, 32)
    else:
        raise ValueError(f"no training model for {name!r}")
    data = [
        (
            torch.randn(shape, generator=gen).to(device),
            torch.randint(0, 10, (shape[0],), generator=gen).to(device),
        )
        for _ in range(batches)
    ]
    model = model.to(device)
    models = [model] + [copy.deepcopy(model) for _ in range(copies - 1)]
    return models, data

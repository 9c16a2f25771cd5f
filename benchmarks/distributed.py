"""Projection time, collectives and payload for DTensor parameters (gloo on CPU).

Spawns ``world_size`` processes per world size (FileStore rendezvous in a temporary
directory, no network) and projects a stack of transformer-like fp32 weights held as
DTensors on a 1-d mesh, in four layouts:

* ``fsdp2 per-unit``: every weight ``Shard(0)``, norm per output unit (dim 1): local;
* ``fsdp2 dim 0``: every weight ``Shard(0)``, norm over dim 0 (spans the shard);
* ``tp per-unit``: up-projections ``Shard(0)`` (colwise), down-projections ``Shard(1)``
  (rowwise), norm per output unit: only the rowwise weights span the shard;
* ``tp per-unit, per-param``: the same tensors projected one DTensor at a time with
  DTensor's own ``vector_norm`` (the naive ``w *= min(1, c / ||w||)``), for
  comparison; it is not exact (it scales to the bound, not inside it) and it scales
  every slice, in bound or not.

Each repeat scales the weights by 1.05 (untimed), so that every slice exceeds the
bound, and times one projection (``scaled``: every slice is scaled and written), then
times a second one (``in bound``: nothing to scale, the common case in training).
Reported: median wall time of one projection (the slowest rank), collectives per
projection and the bytes per rank that those collectives send, for both (counted with
``CommDebugMode``, the bytes from the tensors handed to each collective; on CPU the
library reduces the accurate norms and the verification only for the slices it
scales). Only public APIs are used.

Usage::

    PYTHONPATH=. python benchmarks/distributed.py --world-sizes 2 4 --layers 4 --width 512
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor.debug import CommDebugMode


class _CommBytes(CommDebugMode):
    """`CommDebugMode` that also adds up the bytes of the tensors passed to each
    collective (this rank's payload)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        before = self.get_total_counts()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.get_total_counts() > before:
            self.bytes += sum(
                a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)
            )
        return out


def _naive_project(tensors: list[Any], c: float, dims: tuple[int, ...]) -> None:
    """One DTensor at a time through DTensor's `vector_norm`, as a user would write it."""
    for t in tensors:
        norms = torch.linalg.vector_norm(t, 2.0, dim=dims, keepdim=True)
        t.mul_(torch.clamp(c / norms, max=1.0))


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):  # gloo on loopback only (rendezvous: a file)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from maxnorm_optim import max_norm_

    mesh = init_device_mesh("cpu", (world,))
    d, layers = args.width, args.layers
    torch.manual_seed(0)
    up = [torch.randn(4 * d, d) * 0.05 for _ in range(layers)]
    down = [torch.randn(d, 4 * d) * 0.05 for _ in range(layers)]

    def make(up_pl: Any, down_pl: Any) -> list[Any]:
        return [distribute_tensor(w.clone(), mesh, [up_pl]) for w in up] + [
            distribute_tensor(w.clone(), mesh, [down_pl]) for w in down
        ]

    cases = [
        ("fsdp2 per-unit", make(Shard(0), Shard(0)), "per_unit", False),
        ("fsdp2 dim 0", make(Shard(0), Shard(0)), 0, False),
        ("tp per-unit", make(Shard(0), Shard(1)), "per_unit", False),
        ("tp per-unit, per-param", make(Shard(0), Shard(1)), "per_unit", True),
    ]
    c = 1.0
    rows = []
    for name, tensors, norm_dim, naive in cases:

        def project(tensors: list[Any] = tensors, norm_dim: Any = norm_dim, naive: bool = naive):
            with torch.no_grad():
                if naive:
                    _naive_project(tensors, c, (1,) if norm_dim == "per_unit" else (norm_dim,))
                else:
                    max_norm_(tensors, c, norm_dim=norm_dim)

        def timed() -> float:
            dist.barrier()
            start = time.perf_counter()
            project()
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            return float(elapsed)

        counts = []
        for _ in range(2):  # every slice out of bound, then every slice in bound
            with _CommBytes() as mode:
                project()
            counts.append((int(mode.get_total_counts()), mode.bytes))
        scaled, inside = [], []
        for _ in range(args.repeats):
            with torch.no_grad():
                for t in tensors:
                    t.to_local().mul_(1.05)
            scaled.append(timed())
            inside.append(timed())
        rows.append(
            (name, statistics.median(scaled) * 1e3, statistics.median(inside) * 1e3, *counts)
        )
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    d = args.width
    numel = args.layers * 2 * 4 * d * d
    print(
        f"{args.layers} layers x (({4 * d}, {d}) up + ({d}, {4 * d}) down) fp32 weights, "
        f"{numel / 1e6:.1f} M elements; median of {args.repeats}; torch {torch.__version__}"
    )
    print(
        f"{'':31}{'-- scaled ':-<31} {'-- in bound ':-<31}\n"
        f"{'world':>5}  {'case':<24} {'ms':>8} {'collectives':>11} {'bytes/rank':>10}  "
        f"{'ms':>8} {'collectives':>11} {'bytes/rank':>10}"
    )
    ctx = mp.get_context("spawn")
    for world in args.world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            queue = ctx.Queue()
            mp.start_processes(
                _worker,
                args=(world, f"{tmp}/store", args, queue),
                nprocs=world,
                start_method="spawn",
            )
            for name, ms, ms_in, (count, payload), (count_in, payload_in) in queue.get(timeout=600):
                print(
                    f"{world:>5}  {name:<24} {ms:>8.2f} {count:>11} {payload:>10}  "
                    f"{ms_in:>8.2f} {count_in:>11} {payload_in:>10}"
                )


if __name__ == "__main__":
    main()

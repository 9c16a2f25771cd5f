"""Projection time and collective count for DTensor parameters (gloo on CPU).

Spawns ``world_size`` processes per world size (FileStore rendezvous in a temporary
directory, no network) and projects a stack of transformer-like weights held as
DTensors on a 1-d mesh, in four layouts:

* ``fsdp2 per-unit``: every weight ``Shard(0)``, norm per output unit (dim 1): local;
* ``fsdp2 dim 0``: every weight ``Shard(0)``, norm over dim 0 (spans the shard);
* ``tp per-unit``: up-projections ``Shard(0)`` (colwise), down-projections ``Shard(1)``
  (rowwise), norm per output unit: only the rowwise weights span the shard;
* ``tp per-unit, per-param``: the same, projected the way the library did before
  ``maxnorm_optim.distributed`` (``vector_norm`` on each DTensor, one collective per
  parameter), for comparison.

Before every timed call the weights are scaled by 1.05 (untimed) so that slices exceed
the bound and get written. Reported: median wall time of one projection (the slowest
rank), collectives per projection (``CommDebugMode``) and the all-reduce payload per
rank (the partial norms a slice-wise projection has to send: one float32 per slice of
each weight whose norm spans a shard; not computed for the per-param comparison).

Usage::

    python benchmarks/distributed.py --world-sizes 2 4 --layers 4 --width 512
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


def _old_project(tensors: list[Any], c: float, dims: tuple[int, ...]) -> None:
    """The generic path used for DTensors before: one norm (one collective) per param."""
    for t in tensors:
        norms = torch.linalg.vector_norm(t, 2.0, dim=dims, keepdim=True)
        factors = torch.where(norms > c, c / norms, torch.ones_like(norms))
        t.mul_(factors)


def _spans_shard(t: Any, norm_dim: Any) -> bool:
    """Whether a slice norm of DTensor ``t`` runs over a sharded dim (needs a reduction)."""
    dims = set(range(1, t.dim())) if norm_dim == "per_unit" else {norm_dim % t.dim()}
    return any(p.is_shard() and p.dim in dims for p in t.placements)


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
    from torch.distributed.tensor.debug import CommDebugMode

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
    for name, tensors, norm_dim, old in cases:

        def project(tensors: list[Any] = tensors, norm_dim: Any = norm_dim, old: bool = old):
            if old:
                _old_project(tensors, c, (1,) if norm_dim == "per_unit" else (norm_dim,))
            else:
                max_norm_(tensors, c, norm_dim=norm_dim)

        with CommDebugMode() as mode:
            project()
        collectives = int(mode.get_total_counts())
        payload: int | str = "n/a"  # the old path's traffic is whatever DTensor dispatch does
        for t in [] if old else tensors:
            payload = payload if isinstance(payload, int) else 0
            if _spans_shard(t, norm_dim):
                dims = (1,) if norm_dim == "per_unit" else (norm_dim,)
                payload += t.to_local().numel() // t.to_local().shape[dims[0]] * 4
        times = []
        for _ in range(args.repeats):
            with torch.no_grad():
                for t in tensors:
                    t.to_local().mul_(1.05)
            dist.barrier()
            start = time.perf_counter()
            project()
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed))
        rows.append((name, statistics.median(times) * 1e3, collectives, payload))
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    print(f"{'world':>5}  {'case':<24} {'ms':>8} {'collectives':>12} {'bytes/rank':>11}")
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
            for name, ms, count, payload in queue.get(timeout=60):
                print(f"{world:>5}  {name:<24} {ms:>8.2f} {count:>12} {payload:>11}")


if __name__ == "__main__":
    main()

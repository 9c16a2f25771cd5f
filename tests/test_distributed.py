"""Distributed tests: DDP, FSDP2, DTensor (tensor parallel) and distributed checkpoints.

Two gloo processes on CPU rendezvous on a FileStore in ``tmp_path`` (no network).
Every run is bounded three ways so that a hang fails instead of stalling CI: the
process group's ``timeout``, a deadline on joining the workers (which are then
killed), and ``pytest-timeout``. The checks themselves live in ``dist_workers.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

import dist_workers
import torch.multiprocessing as mp

WORLD_SIZE = 2
JOIN_DEADLINE_S = 150.0


def _run(scenario: str, tmp_path: Path) -> None:
    ctx = mp.start_processes(
        dist_workers.entry,
        args=(WORLD_SIZE, str(tmp_path), scenario),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while not ctx.join(timeout=1.0):  # raises with the worker's traceback on failure
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            for proc in ctx.processes:
                proc.join(5)
            pytest.fail(f"distributed scenario {scenario!r} did not finish in time")


@pytest.mark.timeout(180)
def test_dtensor_tensor_parallel_ddp_and_ranks_out_of_step(tmp_path: Path) -> None:
    """Shard(0)/Shard(1)/Replicate DTensors on 1-d and 2-d meshes, fp32/fp64/bf16,
    p in {1, 2, 3, 5, inf}, every norm_dim: scaled slices equal the float64 reference
    and pass ``vector_norm`` of the DTensor (its dtype and float64), in-bound slices are
    bitwise unchanged, replicas bit-identical; the collectives of a group whose norms
    span a shard (1 to 4, none where norms are local) are the same on every rank and for
    any data; error_if_nonfinite raises on every rank and changes nothing; the wrapper
    over several groups; DDP ranks stay bit-identical and equal a single-process run; a
    rank without gradients still takes part; a rank that skips step() makes the others
    fail after the timeout."""
    _run("dtensor_ddp", tmp_path)


@pytest.mark.timeout(180)
def test_fsdp2_training_and_distributed_checkpoint(tmp_path: Path) -> None:
    """FSDP2 MLP and CNN (uneven and empty shards) equal a single-process reference for
    norms over a local dim and over the sharded dim, with the user's check holding after
    every step; state-dict calls on a fresh wrapper leave the weights bitwise as they
    are; a DCP save/resume continues bit-identically; a bare-optimizer checkpoint loads
    with MaxNormLoadPlanner."""
    _run("fsdp2_dcp", tmp_path)

"""Worker processes of ``test_distributed.py`` (gloo on CPU, 2 ranks).

Each scenario runs many checks inside one spawned job, since process start-up is the
main cost. A failed check raises in the worker; ``torch.multiprocessing`` hands the
traceback to the test. The reference for every check is the float64 reference of
``reference.py`` on full tensors, made on every rank with the same seed, and the
guarantees are checked as a user would: ``torch.linalg.vector_norm`` of the DTensor
itself, in its dtype and in float64.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from reference import (
    SKIP,
    landing_gap,
    reference_dims,
    reference_project,
    robust_norms,
    same_bits,
    slice_length,
)

STORE_TIMEOUT = datetime.timedelta(seconds=60)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _acc(dtype: torch.dtype) -> torch.dtype | None:
    """The check's `dtype=`: fp32 for fp16/bf16 (as the library's check)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def _rtol(dtype: torch.dtype, length: int) -> float:
    """Scaled slices against the float64 reference: the library aims a little inside
    the bound (`landing_gap`); fp16/bf16 round each scaled value once more."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else landing_gap(length, dtype)


def _fits(norm_dim: Any, ndim: int) -> bool:
    if norm_dim is None or isinstance(norm_dim, str):
        return True
    dims = (norm_dim,) if isinstance(norm_dim, int) else norm_dim
    size = max(ndim, 1)
    return all(-size <= d < size for d in dims) and len({d % size for d in dims}) == len(dims)


def _user_check(t: Any, norm_dim: Any, p: float, wide: bool = False) -> Tensor:
    """The check a user runs on a DTensor, gathered (keepdim): ``vector_norm`` of the
    DTensor in its dtype (fp32 for fp16/bf16), or of its float64 copy."""
    dims = reference_dims(norm_dim, t.dim())
    assert dims != SKIP
    if p == math.inf:
        # A max is exact in any order, and DTensor's vector_norm refuses p = inf on a
        # rank whose part of a slice is empty: the gathered tensor's norm is the same.
        full = t.full_tensor()
        full = full.to(_wide(t.dtype)) if wide else full
        n = torch.linalg.vector_norm(full, p, dim=dims, keepdim=True, dtype=_acc(full.dtype))
        return n.to(torch.float64)
    if wide:
        n = torch.linalg.vector_norm(t.to(_wide(t.dtype)), p, dim=dims, keepdim=True)
    else:
        n = torch.linalg.vector_norm(t, p, dim=dims, keepdim=True, dtype=_acc(t.dtype))
    return n.full_tensor().to(torch.float64)


def _all_equal_across_ranks(t: Tensor, what: str) -> None:
    """Bitwise equality of ``t`` on every rank."""
    t = t.detach().contiguous()
    raw = t.view(torch.uint8) if t.numel() else t
    gathered = [torch.empty_like(raw) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, raw)
    for r, g in enumerate(gathered):
        assert torch.equal(g, gathered[0]), f"{what}: rank {r} differs from rank 0"


def _same_on_every_rank(value: int, what: str) -> None:
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, value)
    assert len(set(counts)) == 1, f"{what}: collectives per rank {counts}"


@contextmanager
def _count(what: str, expected: int | None = None) -> Iterator[list[int]]:
    """Count the collectives of the block (``CommDebugMode``); check that every rank
    ran as many, and ``expected`` where given."""
    from torch.distributed.tensor.debug import CommDebugMode

    out: list[int] = []
    with CommDebugMode() as mode:
        yield out
    n = int(mode.get_total_counts())
    out.append(n)
    _same_on_every_rank(n, what)
    assert expected is None or n == expected, f"{what}: {n} collectives, expected {expected}"


def check_projected(
    full: Tensor,
    before: Any,
    after: Any,
    c: float,
    norm_dim: Any,
    p: float,
    what: str,
    *,
    min_norm: float = 0.0,
    rate: float = 1.0,
    judged: bool = True,
) -> int:
    """The guarantees on a projected DTensor ``after`` (``before``: the DTensor's check
    norms before the projection, from ``_user_check``), against the float64 reference
    of ``full``. Returns the number of scaled slices.

    * in-bound slices (by the check) are bitwise unchanged;
    * scaled slices equal the reference up to ``_rtol``, and pass the user's check,
      ``vector_norm`` of the DTensor, in its dtype and in float64, and the float64
      norm of the gathered tensor;
    * every finite slice passes the user's check afterwards.

    ``judged=False``: the bound's p-th power overflows the check's dtype, so the check
    cannot judge; slices are then classified, and bounded, by their float64 norms.
    """
    got = after.full_tensor()
    if reference_dims(norm_dim, full.dim()) == SKIP:
        assert same_bits(got, full), f"{what}: a tensor without slices changed"
        return 0
    robust = robust_norms(full, norm_dim, p)
    # the library's decision: the check, or the float64 norm where the check overflowed
    before = torch.where(torch.isinf(before) & torch.isfinite(robust), robust, before)
    finite = torch.isfinite(before) & torch.isfinite(robust)
    inside = finite & (before <= c) & ((before >= min_norm) | (before == 0))
    scaled = finite & ~inside
    assert same_bits(got[(~scaled).expand_as(full)], full[(~scaled).expand_as(full)]), (
        f"{what}: an in-bound (or non-finite) slice changed"
    )
    want = reference_project(full, c, norm_dim, p, min_norm=min_norm, rate=rate)
    agree = scaled & ((robust > c) | ((robust < min_norm) & (robust > 0)))
    mask = agree.expand_as(full)
    torch.testing.assert_close(
        got[mask].to(torch.float64),
        want[mask].to(torch.float64),
        rtol=_rtol(full.dtype, slice_length(full, norm_dim)),
        atol=0.0,
        msg=lambda m: f"{what}: scaled slices differ from the reference: {m}",
    )
    now = _user_check(after, norm_dim, p)
    bounded = (finite if rate == 1.0 else inside) if judged else inside
    assert bool((now[bounded] <= c).all()), f"{what}: {now[bounded].max().item()} > {c}"
    if rate == 1.0 and bool(scaled.any()):
        wide = _user_check(after, norm_dim, p, wide=True)[scaled]
        dims = reference_dims(norm_dim, full.dim())
        dense = torch.linalg.vector_norm(got.to(_wide(got.dtype)), p, dim=dims, keepdim=True)
        for name, n in (("float64 DTensor check", wide), ("float64 norm", dense[scaled])):
            assert bool((n <= c).all()), f"{what}: {name} {n.max().item()} > {c}"
        if min_norm > 0:
            up = scaled & (before < min_norm)
            assert bool((now[up] >= min_norm).all()), f"{what}: scaled up to {now[up].min()}"
    return int(scaled.sum())


def _distribute(full: Tensor, mesh: Any, placements: list[Any]) -> Any:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.clone(), mesh, placements)


# -- scenario: DTensor (tensor parallel), DDP, ranks out of step ---------------------------
def _sweep(rank: int, world: int) -> None:
    """Every placement x dtype x p x norm_dim gives the reference result with the
    guarantees; counts are equal on every rank and do not depend on the data."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from maxnorm_optim import max_norm_

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(5, 3), (3, 5), (1, 4), (4, 3, 2, 2), (5,), (4, 70)]
    placements = [Shard(0), Shard(1), Replicate()]
    norm_dims = ["per_unit", 0, 1, -1, None, (0, 2)]
    cases = [(torch.float32, p, 1.5) for p in (1.0, 2.0, math.inf, 3.0)]
    cases += [(torch.float64, 2.0, 1.5), (torch.float32, 5.0, 1.5), (torch.bfloat16, 2.0, 1.5)]
    # a bound that few short slices exceed: those are gathered, scaled and written back
    cases += [(torch.float32, 2.0, 5.0), (torch.float64, 3.0, 5.0), (torch.float32, 1.0, 8.0)]
    scaled_total = 0
    for dtype, p, c in cases:
        for norm_dim in norm_dims:
            torch.manual_seed(int(p) if p != math.inf else 7)
            fulls, dts, pls = [], [], []
            for shape in shapes:
                if not _fits(norm_dim, len(shape)):
                    continue
                for pl in placements:
                    if isinstance(pl, Shard) and pl.dim >= len(shape):
                        continue
                    full = (torch.randn(shape, dtype=torch.float64) * 2).to(dtype)
                    fulls.append(full)
                    dts.append(_distribute(full, mesh, [pl]))
                    pls.append(pl)
            what = f"{dtype} p={p} c={c} norm_dim={norm_dim}"
            befores = [
                _user_check(d, norm_dim, p)
                if reference_dims(norm_dim, d.dim()) != SKIP
                else torch.zeros(())
                for d in dts
            ]
            with _count(what) as first:
                max_norm_(dts, c, norm_dim=norm_dim, norm_type=p)
            rescaled = dtype == torch.float64 or p > 4
            assert first[0] <= (4 if rescaled else 3), f"{what}: {first[0]} collectives"
            for full, before, d, pl in zip(fulls, befores, dts, pls):
                label = f"{what} {pl} {tuple(full.shape)}"
                scaled_total += check_projected(full, before, d, c, norm_dim, p, label)
                if isinstance(pl, Replicate):
                    _all_equal_across_ranks(d.to_local(), f"{label}: replicated")
            # A second projection leaves everything as it is, with as many collectives.
            again = [d.full_tensor() for d in dts]
            with _count(f"{what} (again)", first[0]):
                max_norm_(dts, c, norm_dim=norm_dim, norm_type=p)
            for d, a in zip(dts, again):
                assert same_bits(d.full_tensor(), a), f"{what}: a second projection changed"
    assert scaled_total > 500, f"only {scaled_total} slices scaled (test too weak)"


def _meshes_2d(rank: int, world: int) -> None:
    """2-d meshes (HSDP-like [Replicate, Shard], FSDP + TP-like [Shard, Shard]): only the
    mesh dims of more than one rank that shard a normed dim are reduced over."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from maxnorm_optim import max_norm_

    for mesh_shape in ((1, world), (world, 1)):
        mesh2 = init_device_mesh("cpu", mesh_shape)
        for pls in ([Replicate(), Shard(0)], [Shard(0), Shard(1)], [Shard(1), Shard(0)]):
            for norm_dim in ("per_unit", 0, None):
                for p in (2.0, math.inf):
                    torch.manual_seed(6)
                    full = torch.randn(5, 4) * 2
                    d = _distribute(full, mesh2, pls)
                    before = _user_check(d, norm_dim, p)
                    dims = reference_dims(norm_dim, 2)
                    spans = any(
                        isinstance(pl, Shard) and pl.dim in dims and mesh_shape[i] > 1
                        for i, pl in enumerate(pls)
                    )
                    expected = (1 if p == math.inf else 2) if spans else 0
                    what = f"mesh {mesh_shape} {pls} norm_dim={norm_dim} p={p}"
                    with _count(what, expected):
                        max_norm_(d, 1.0, norm_dim=norm_dim, norm_type=p)
                    check_projected(full, before, d, 1.0, norm_dim, p, what)
                    if any(pl.is_replicate() and n > 1 for pl, n in zip(pls, mesh_shape)):
                        _all_equal_across_ranks(d.to_local(), f"{what}: replicas")


def _counts_table(rank: int, world: int) -> None:
    """The collectives of one group whose norms span the shard, per case: the same on
    every rank and for any data (out of bound, in bound, zeros, NaN on one rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from maxnorm_optim import max_norm_

    mesh = init_device_mesh("cpu", (world,))
    short, long = ((6, 5), Shard(0), 0), ((4, 256), Shard(1), "per_unit")
    table: list[tuple[str, list[tuple[Any, torch.dtype]], float, dict[str, Any], int]] = [
        # check + accurate; the check holds by construction for short fp32 slices
        ("fp32 p=2 short", [(short, torch.float32)], 2.0, {}, 2),
        ("fp32 p=1 short", [(short, torch.float32)], 1.0, {}, 2),
        ("fp32 p=3 short", [(short, torch.float32)], 3.0, {}, 2),
        # + a verification of the check for long slices
        ("fp32 p=2 long", [(long, torch.float32)], 2.0, {}, 3),
        ("fp32 p=1 long", [(long, torch.float32)], 1.0, {}, 3),
        # p = inf: the check (a max) is exact and is the accurate norm
        ("fp32 p=inf", [(short, torch.float32), (long, torch.float32)], math.inf, {}, 1),
        # rescaled: check + largest magnitude + sums (+ verification)
        ("fp64 p=2", [(short, torch.float64), (long, torch.float64)], 2.0, {}, 3),
        ("fp32 p=5 short", [(short, torch.float32)], 5.0, {}, 3),
        ("fp32 p=5 long", [(long, torch.float32)], 5.0, {}, 4),
        ("complex64 p=2 short", [(short, torch.complex64)], 2.0, {}, 3),
        ("complex64 p=2 long", [(long, torch.complex64)], 2.0, {}, 4),
        ("complex128 p=2 long", [(long, torch.complex128)], 2.0, {}, 3),
        ("complex64 p=inf", [(short, torch.complex64)], math.inf, {}, 2),
        # fp16/bf16: the check is always verified; fp32 and bf16 share the collectives
        ("bf16 p=2", [(short, torch.bfloat16)], 2.0, {}, 3),
        ("bf16 + fp32", [(short, torch.bfloat16), (short, torch.float32)], 2.0, {}, 3),
        ("bf16 p=5", [(short, torch.bfloat16)], 5.0, {}, 4),
        ("bf16 c^2 > fp32 max", [(short, torch.bfloat16)], 2.0, {"scale": 1e20}, 2),
        # min_norm / rate change no count; error_if_nonfinite adds one (per mesh)
        ("min_norm", [(short, torch.float32)], 2.0, {"min_norm": 0.5}, 2),
        ("rate", [(long, torch.float32)], 2.0, {"rate": 0.5}, 2),
        ("error_if_nonfinite", [(short, torch.float32)], 2.0, {"error_if_nonfinite": True}, 3),
    ]
    for what, specs, p, kw, expected in table:
        kw = dict(kw)
        scale = kw.pop("scale", 1.0)
        c = 1.5 * scale
        for data in ("over", "inside", "zeros", "nan"):
            if data == "nan" and kw.get("error_if_nonfinite"):
                continue
            torch.manual_seed(3)
            fulls = []
            for (shape, _, _), dtype in specs:
                x = torch.randn(
                    shape, dtype=torch.complex128 if dtype.is_complex else torch.float64
                )
                x = x * 3 * scale
                if data == "inside":
                    x = x * 1e-3
                elif data == "zeros":
                    x = torch.zeros(shape, dtype=torch.float64)
                elif data == "nan" and rank == 1:
                    x[-1, -1] = math.nan  # rank 1's part only: the others do not know
                fulls.append(x.to(dtype))
            dts = [_distribute(f, mesh, [pl]) for f, ((_, pl, _), _) in zip(fulls, specs)]
            norm_dim = specs[0][0][2]
            befores = [_user_check(d, norm_dim, p) for d in dts]
            with _count(f"{what} ({data})", expected):
                max_norm_(dts, c, norm_dim=norm_dim, norm_type=p, **kw)
            if data == "nan":
                continue
            opts = {k: v for k, v in kw.items() if k in ("min_norm", "rate")}
            for f, b, d in zip(fulls, befores, dts):
                label = f"{what} ({data})"
                check_projected(f, b, d, c, norm_dim, p, label, judged=scale == 1.0, **opts)
    # A skip (a step GradScaler skipped) that only one rank sees changes no count.
    from maxnorm_optim import _dtensor
    from maxnorm_optim._options import GROUP_DEFAULTS, parse_options

    opts = parse_options("test", {**GROUP_DEFAULTS, "max_norm": 1.0})
    full = torch.randn(4, 256) * 3
    for skip in (torch.tensor(rank), torch.tensor(0), torch.tensor(1)):
        d = _distribute(full, mesh, [Shard(1)])
        mine = d.to_local().clone()
        with _count(f"skip={int(skip)} on rank {rank}", 3):
            _dtensor.project_dtensors_([d], opts, ["w"], None, skip)
        assert same_bits(d.to_local(), mine) == bool(skip), f"skip={int(skip)}"
    # Local norms cost nothing, next to a group whose norms span the shard.
    torch.manual_seed(4)
    full = torch.randn(6, 5) * 3
    local = _distribute(full, mesh, [Shard(0)])
    with _count("local only", 0):
        max_norm_(local, 1.0)
    local, spans = _distribute(full, mesh, [Shard(1)]), _distribute(full, mesh, [Shard(0)])
    with _count("local + spanning in one call", 2):
        max_norm_([local, spans], 1.0, norm_dim=0)


def _check_is_dtensors(rank: int, world: int) -> None:
    """The check norms the projection reduces (and verifies with) are bitwise those of
    ``vector_norm`` on each DTensor, for a group of several parameters, where they are
    claimed to be: p in {1, 2} over one mesh dim of 2 ranks (p = inf: a max, exact in
    any order)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from maxnorm_optim import _dtensor
    from maxnorm_optim._options import GROUP_DEFAULTS, parse_options

    mesh = init_device_mesh("cpu", (world,))
    for p in (1.0, 2.0):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            opts = parse_options("test", {**GROUP_DEFAULTS, "max_norm": 1.0, "norm_type": p})
            torch.manual_seed(9)
            specs = [
                ((37, 301), Shard(1), (1,)),
                ((7, 3, 5), Shard(0), (0, 2)),
                ((1, 9), Shard(0), (0,)),
            ]
            dts = [_distribute(torch.randn(s).to(dtype), mesh, [pl]) for s, pl, _ in specs]
            members = [_dtensor._Member(d, dims, "x") for d, (_, _, dims) in zip(dts, specs)]
            group = _dtensor._Group(members, mesh, (0,), opts)
            assert group.order_slack == [0.0] * len(members), group.order_slack
            ours = _dtensor._check_norms(group, [None] * len(members)).split(group.sizes)
            for d, (_, _, dims), m, got in zip(dts, specs, members, ours):
                user = torch.linalg.vector_norm(d, p, dim=dims, keepdim=True, dtype=_acc(dtype))
                # the sharded dim is normed: every rank holds every slice's norm
                want = user.full_tensor().permute(*m.keep, *dims).reshape(-1)
                assert same_bits(got, want), f"p={p} {dtype} {tuple(d.shape)}: not DTensor's"


def _nonfinite(rank: int, world: int) -> None:
    """A NaN in a slice: that slice is left alone on every rank (also for p = inf,
    whose max must not drop the NaN), the others are projected; error_if_nonfinite
    raises on every rank alike and changes nothing, for norms that span the shard and
    for norms local to the rank that holds the NaN."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from maxnorm_optim import max_norm_

    mesh = init_device_mesh("cpu", (world,))
    for p in (2.0, math.inf):
        torch.manual_seed(8)
        bad_full = torch.randn(6, 3) * 3
        bad_full[5, 1] = math.nan  # on the last rank's shard
        bad = _distribute(bad_full, mesh, [Shard(0)])
        before = _user_check(bad, 0, p)
        max_norm_(bad, 1.0, norm_dim=0, norm_type=p)
        assert same_bits(bad.full_tensor()[:, 1], bad_full[:, 1]), f"p={p}: NaN slice changed"
        check_projected(bad_full, before, bad, 1.0, 0, p, f"NaN next to finite slices p={p}")
        for norm_dim, where in ((0, "spanning"), ("per_unit", "local to rank 1")):
            fresh = _distribute(bad_full, mesh, [Shard(0)])
            other_full = torch.randn(4, 6) * 3
            other = _distribute(other_full, mesh, [Shard(1)])
            try:
                max_norm_(
                    [other, fresh], 1.0, norm_dim=norm_dim, norm_type=p, error_if_nonfinite=True
                )
            except RuntimeError as err:
                assert "non-finite" in str(err) or "NaN" in str(err), str(err)
                assert "tensor 1" in str(err), str(err)
            else:
                raise AssertionError(f"p={p} {where}: no error on rank {rank}")
            assert same_bits(fresh.full_tensor(), bad_full), f"p={p} {where}: changed"
            assert same_bits(other.full_tensor(), other_full), f"p={p} {where}: changed"


def _wrapper_groups(rank: int, world: int) -> None:
    """Wrapper over several param groups: the collectives of each group whose norms span
    a shard, none for groups whose norms are local; stats count local slices."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from maxnorm_optim import MaxNormWrapper

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    full = {name: torch.randn(6, 5) * 3 for name in "abcdef"}
    pl = {
        "a": Shard(0),
        "b": Shard(0),
        "c": Shard(1),
        "d": Shard(1),
        "e": Replicate(),
        "f": Shard(0),
    }
    params = {k: nn.Parameter(_distribute(v, mesh, [pl[k]])) for k, v in full.items()}
    groups = [
        {"params": [params["a"], params["c"], params["e"]], "norm_dim": 0},  # a spans: 2
        {"params": [params["b"], params["d"]], "norm_dim": 1},  # d spans: 2
        {"params": [params["f"]], "norm_dim": 1},  # local: 0
    ]
    opt = MaxNormWrapper(torch.optim.SGD(groups, lr=1e-3), max_norm=1.0)  # zero grads
    for prm in params.values():
        prm.grad = torch.zeros_like(prm)
    befores = {k: _user_check(prm, 0 if k in "ace" else 1, 2.0) for k, prm in params.items()}
    with _count("wrapper step", 4):
        opt.step()
    for k, prm in params.items():
        nd = 0 if k in "ace" else 1
        check_projected(full[k], befores[k], prm, 1.0, nd, 2.0, f"group param {k}")

    # bf16 and fp32 share the collectives; stats count local slices.
    torch.manual_seed(5)
    h_full, s_full = torch.randn(6, 5).bfloat16() * 3, torch.randn(6, 5) * 3
    h = nn.Parameter(_distribute(h_full, mesh, [Shard(0)]))
    s = nn.Parameter(_distribute(s_full, mesh, [Shard(0)]))
    hb, sb = _user_check(h, 0, 2.0), _user_check(s, 0, 2.0)
    opt = MaxNormWrapper(
        torch.optim.SGD([h, s], lr=1e-3), max_norm=1.0, norm_dim=0, track_stats=True
    )
    with _count("bf16 + fp32", 3):
        opt.step()  # no gradients: DTensors are projected anyway
    check_projected(h_full, hb, h, 1.0, 0, 2.0, "bf16")
    check_projected(s_full, sb, s, 1.0, 0, 2.0, "fp32 next to bf16")
    stats = opt.constraint_stats()[0]
    assert stats is not None and int(stats["slices"]) == 10, stats  # 5 columns x 2 params
    assert int(stats["projected"]) == int((hb > 1).sum() + (sb > 1).sum()), stats


def _ranks_out_of_step(rank: int, world: int) -> None:
    """Ranks disagree about which DTensor params have a gradient: every rank still
    projects every DTensor of the group (same collectives), so nothing hangs and the
    result is the projection of the full tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from maxnorm_optim import MaxNormWrapper

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(2)
    w_full = torch.randn(8, 4)
    w = nn.Parameter(_distribute(w_full, mesh, [Shard(0)]))
    opt = MaxNormWrapper(torch.optim.SGD([w], lr=0.5), max_norm=1.0, norm_dim=0)
    if rank == 0:
        w.grad = -torch.ones_like(w)
    stepped = w_full.clone()
    stepped[: w_full.shape[0] // world] += 0.5  # only rank 0's rows move
    before = _user_check(_distribute(stepped, mesh, [Shard(0)]), 0, 2.0)
    with _count("a rank without a gradient joins the collectives", 2):
        opt.step()
    check_projected(stepped, before, w, 1.0, 0, 2.0, "grad on one rank only")
    # Stepping the base optimizer projects too (a post-hook on the base).
    w2 = nn.Parameter(_distribute(w_full * 3, mesh, [Shard(0)]))
    before = _user_check(w2, 0, 2.0)
    opt2 = MaxNormWrapper(torch.optim.SGD([w2], lr=0.5), max_norm=1.0, norm_dim=0)
    with _count("base step", 2):
        opt2.optimizer.step()
    check_projected(w_full * 3, before, w2, 1.0, 0, 2.0, "base step projects")
    # A first step at lr = 0 with a gradient on one rank only: the ranks agree that the
    # gradients are not all zero (it is not a state-initialising step): all project.
    w3 = nn.Parameter(_distribute(w_full * 3, mesh, [Shard(0)]))
    opt3 = MaxNormWrapper(torch.optim.SGD([w3], lr=0.0), max_norm=1.0, norm_dim=0)
    w3.grad = _distribute(torch.zeros_like(w_full), mesh, [Shard(0)])
    if rank == 0:
        w3.grad.to_local().fill_(1.0)
    before = _user_check(w3, 0, 2.0)
    opt3.step()
    check_projected(w_full * 3, before, w3, 1.0, 0, 2.0, "lr 0, a gradient on one rank")
    # error_if_nonfinite over two groups: a NaN in the second group's DTensor raises on
    # every rank before the first group's is scaled.
    a = nn.Parameter(_distribute(torch.full((4, 4), 2.0), mesh, [Shard(1)]))
    bad = torch.full((4, 4), 2.0)
    bad[0, 0] = math.nan
    b = nn.Parameter(_distribute(bad, mesh, [Shard(1)]))
    opt4 = MaxNormWrapper(
        torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1),
        max_norm=1.0,
        error_if_nonfinite=True,
    )
    a_before = a.to_local().clone()
    try:
        opt4.step()
    except RuntimeError as err:
        assert "NaN or inf" in str(err), err
    else:
        raise AssertionError("error_if_nonfinite did not raise")
    assert torch.equal(a.to_local(), a_before), "a group was scaled before the error"
    # A replicated DTensor stays bit-identical on every rank.
    r = nn.Parameter(_distribute(torch.randn(4, 4) * 3, mesh, [Replicate()]))
    MaxNormWrapper(torch.optim.SGD([r], lr=0.1), max_norm=1.0).step()  # no grads anywhere
    _all_equal_across_ranks(r.to_local(), "replicated DTensor")
    assert float(r.to_local().norm(dim=1).max()) <= 1.0


def _ddp(rank: int, world: int) -> None:
    """DDP: ranks stay bit-identical and match a single-process run of the wrapper."""
    from maxnorm_optim import MaxNormWrapper

    torch.manual_seed(3)
    ref_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model.load_state_dict(ref_model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = MaxNormWrapper(torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9), max_norm=0.6)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        local = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x[local]), y[local]).backward()
        opt.step()
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref_opt.step()
        with torch.no_grad():
            for prm in ref_model.parameters():
                prm.copy_(reference_project(prm, 0.6))  # biases: left alone
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        _all_equal_across_ranks(a.detach(), f"DDP {name}")
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        if a.dim() == 2:
            assert float(a.detach().norm(dim=1).max()) <= 0.6, name


def _skipped_step(rank: int, world: int) -> None:
    """A rank that skips step() does not hang the others forever: the collective fails
    after the process group's timeout (here a 2 s group)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard

    from maxnorm_optim import MaxNormWrapper

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    short = DeviceMesh.from_group(group, "cpu")
    v = nn.Parameter(_distribute(torch.randn(4, 3), short, [Shard(0)]))
    v.grad = torch.ones_like(v)
    opt = MaxNormWrapper(torch.optim.SGD([v], lr=0.1), max_norm=0.1, norm_dim=None)
    if rank == 0:
        start = time.monotonic()
        try:
            opt.step()
        except RuntimeError as err:
            assert "Timed out" in str(err) or "timeout" in str(err).lower(), str(err)
        else:
            raise AssertionError("step() on one rank alone should have failed")
        assert time.monotonic() - start < 30
    dist.barrier()  # rank 1 waits here (on the default group) without calling step()


def scenario_dtensor_ddp(rank: int, world: int, tmp: Path) -> None:
    _sweep(rank, world)
    _meshes_2d(rank, world)
    _counts_table(rank, world)
    _check_is_dtensors(rank, world)
    _nonfinite(rank, world)
    _wrapper_groups(rank, world)
    _ranks_out_of_step(rank, world)
    _ddp(rank, world)
    _skipped_step(rank, world)  # last: leaves an abandoned collective behind


# -- scenario: FSDP2 training and distributed checkpoints ---------------------------------
def _mlp() -> nn.Module:
    # 7 rows shard 4/3 over 2 ranks; the last layer's single row leaves rank 1 empty.
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 1))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Conv2d(5, 3, 3), nn.Flatten(), nn.Linear(48, 3)
    )


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if any(True for _ in m.parameters(recurse=False)):
            fully_shard(m)
    fully_shard(model)
    return model


def _split(model: nn.Module) -> tuple[list[Any], list[Any]]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return weights, biases


def _groups(model: nn.Module, norm_dim: Any) -> list[dict[str, Any]]:
    weights, biases = _split(model)
    return [
        {"params": weights, "norm_dim": norm_dim},
        {"params": biases, "norm_dim": None, "max_norm": 0.3},  # 1-d: spans the shard
    ]


def _batches(kind: str, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape, out = ((8, 6), 1) if kind == "mlp" else ((8, 2, 8, 8), 3)
    return [
        (torch.randn(*shape, generator=gen), torch.randn(8, out, generator=gen)) for _ in range(n)
    ]


def _fsdp2_training(rank: int, world: int) -> None:
    """FSDP2 MLP and CNN against a single-process reference, norm over a local dim (per
    unit) and over the sharded dim 0; the user's check holds after every step."""
    from maxnorm_optim import MaxNormWrapper

    def local_batch(x: Tensor) -> Tensor:
        return x[rank * x.shape[0] // world : (rank + 1) * x.shape[0] // world]

    for kind, make in (("mlp", _mlp), ("cnn", _cnn)):
        for norm_dim in ("per_unit", 0):
            torch.manual_seed(10)
            ref = make()
            model = make()
            model.load_state_dict(ref.state_dict())
            _shard(model)
            opt = MaxNormWrapper(
                torch.optim.SGD(_groups(model, norm_dim), lr=0.3, momentum=0.9), max_norm=0.5
            )
            ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
            at_bound = False
            for x, y in _batches(kind, 4, seed=11):
                opt.zero_grad()
                nn.functional.mse_loss(model(local_batch(x)), local_batch(y)).backward()
                # check + accurate norms for the biases (whole vectors, short), and as
                # many more for weights normed over the sharded dim 0
                expected = 2 if norm_dim == "per_unit" else 4
                with _count(f"FSDP2 {kind} {norm_dim}", expected):
                    opt.step()
                ref_opt.zero_grad()
                nn.functional.mse_loss(ref(x), y).backward()
                ref_opt.step()
                with torch.no_grad():
                    ref_w, ref_b = _split(ref)
                    for prm in ref_w:
                        prm.copy_(reference_project(prm, 0.5, norm_dim))
                    for prm in ref_b:
                        prm.copy_(reference_project(prm, 0.3, None))
                weights, biases = _split(model)
                for params, nd, c in ((weights, norm_dim, 0.5), (biases, None, 0.3)):
                    for prm in params:
                        n = _user_check(prm, nd, 2.0)
                        assert bool((n <= c).all()), f"{kind}: {n.max().item()} > {c}"
                        n64 = _user_check(prm, nd, 2.0, wide=True)
                        at_bound |= bool((n64 >= c * (1 - 1e-5)).any())
            for (name, a), b in zip(model.named_parameters(), ref.parameters()):
                label = f"FSDP2 {kind} norm_dim={norm_dim} {name}"
                torch.testing.assert_close(
                    a.full_tensor(),
                    b.detach(),
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m, label=label: f"{label}: {m}",
                )
            assert at_bound, f"{kind} {norm_dim}: no slice reached the bound (test too weak)"


def _fresh(seed: int) -> tuple[nn.Module, Any]:
    from maxnorm_optim import MaxNormWrapper

    torch.manual_seed(seed)
    model = _shard(_mlp())
    base = torch.optim.Adam(_groups(model, 0), lr=0.05)
    return model, MaxNormWrapper(base, max_norm=0.5)


def _train(rank: int, world: int, model: nn.Module, opt: Any, batches: Any) -> None:
    def local_batch(x: Tensor) -> Tensor:
        return x[rank * x.shape[0] // world : (rank + 1) * x.shape[0] // world]

    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(local_batch(x)), local_batch(y)).backward()
        opt.step()


def _state_dict_calls_on_a_fresh_wrapper(rank: int, world: int) -> None:
    """get/set_optimizer_state_dict on a wrapper without state run torch's
    state-initialising step (lr = 0, zero gradients): the weights stay bitwise as they
    are, out-of-bound slices included."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = _fresh(40)
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(4.0)  # every column of the weights out of bound
    before = [prm.full_tensor() for prm in model.parameters()]
    n = _user_check(next(iter(model.parameters())), 0, 2.0)
    assert bool((n > 0.5).any()), "no out-of-bound slice (test too weak)"
    osd = get_optimizer_state_dict(model, opt)
    set_optimizer_state_dict(model, opt, osd)
    for a, b in zip(model.parameters(), before):
        assert same_bits(a.full_tensor(), b), "a state-dict call changed the weights"


def _checkpoints(rank: int, world: int, tmp: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    from maxnorm_optim.distributed import MaxNormLoadPlanner

    # 1. Distributed checkpoint: save after 3 steps, resume, continue identically.
    ckpt = tmp / "ckpt"
    batches = _batches("mlp", 6, seed=12)
    model, opt = _fresh(20)
    _train(rank, world, model, opt, batches[:3])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    _train(rank, world, model, opt, batches[3:])
    expected = [p.full_tensor() for p in model.parameters()]

    model2, opt2 = _fresh(21)  # different initial weights: all must come from the checkpoint
    msd, osd = get_state_dict(model2, opt2)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    set_state_dict(model2, opt2, model_state_dict=msd, optim_state_dict=osd)
    assert opt2.param_groups[0]["max_norm"] == 0.5 and opt2.param_groups[0]["norm_dim"] == 0
    _train(rank, world, model2, opt2, batches[3:])
    for a, b in zip(model2.parameters(), expected):
        assert same_bits(a.full_tensor(), b), "resumed run differs from the uninterrupted one"

    # 2. A checkpoint written by a bare base optimizer, loaded into a wrapper.
    bare_ckpt = tmp / "bare"
    torch.manual_seed(30)
    model3 = _shard(_mlp())
    bare = torch.optim.Adam([{"params": g["params"]} for g in _groups(model3, 0)], lr=0.05)
    _train(rank, world, model3, bare, batches[:3])
    dcp.save({"optim": get_optimizer_state_dict(model3, bare)}, checkpoint_id=str(bare_ckpt))
    bare_first = bare.state[bare.param_groups[0]["params"][0]]
    bare_state = {k: v.full_tensor() for k, v in bare_first.items() if hasattr(v, "full_tensor")}

    model4, opt4 = _fresh(31)
    model4.load_state_dict(model3.state_dict())
    osd = get_optimizer_state_dict(model4, opt4)
    try:
        dcp.load({"optim": osd}, checkpoint_id=str(bare_ckpt))
    except CheckpointException as err:  # the default planner refuses (docs/distributed.md)
        assert "Missing key in checkpoint state_dict" in str(err), str(err)
        assert "max_norm" in str(err) or "norm_dim" in str(err), str(err)
    else:
        raise AssertionError("the default load planner accepted a bare-optimizer checkpoint")
    # allow_partial_load (documented as the lax alternative) also keeps the options
    lax = get_optimizer_state_dict(model4, opt4)
    planner = DefaultLoadPlanner(allow_partial_load=True)
    dcp.load({"optim": lax}, checkpoint_id=str(bare_ckpt), planner=planner)
    assert lax["param_groups"][0]["max_norm"] == 0.5 and lax["param_groups"][1]["max_norm"] == 0.3
    osd = get_optimizer_state_dict(model4, opt4)
    dcp.load({"optim": osd}, checkpoint_id=str(bare_ckpt), planner=MaxNormLoadPlanner())
    assert osd["param_groups"][0]["lr"] == 0.05 and torch.equal(
        osd["state"]["0.weight"]["exp_avg"].full_tensor(), bare_state["exp_avg"]
    )
    set_optimizer_state_dict(model4, opt4, osd)
    g0, g1 = opt4.param_groups
    assert (g0["max_norm"], g0["norm_dim"], g1["max_norm"], g1["norm_dim"]) == (0.5, 0, 0.3, None)
    first = opt4.state[opt4.param_groups[0]["params"][0]]
    assert set(bare_state) == {"exp_avg", "exp_avg_sq"}
    for k, v in bare_state.items():
        assert torch.equal(first[k].full_tensor(), v), f"state {k} not loaded"
    assert int(first["step"]) == 3
    # The planner stays strict about every other key.
    osd = get_optimizer_state_dict(model4, opt4)
    osd["state"]["0.weight"]["unknown"] = torch.zeros(())
    try:
        dcp.load({"optim": osd}, checkpoint_id=str(bare_ckpt), planner=MaxNormLoadPlanner())
    except CheckpointException as err:
        assert "Missing key in checkpoint state_dict" in str(err), str(err)
        assert "unknown" in str(err), str(err)
    else:
        raise AssertionError("MaxNormLoadPlanner accepted a missing non-max-norm key")
    # Training continues under the wrapper's constraint.
    _train(rank, world, model4, opt4, batches[3:])
    for name, prm in model4.named_parameters():
        c, nd = (0.5, 0) if name.endswith("weight") else (0.3, None)
        n = _user_check(prm, nd, 2.0)
        assert bool((n <= c).all()), f"{name} after bare resume: {n.max().item()}"


def scenario_fsdp2_dcp(rank: int, world: int, tmp: Path) -> None:
    _fsdp2_training(rank, world)
    _state_dict_calls_on_a_fresh_wrapper(rank, world)
    _checkpoints(rank, world, tmp)


SCENARIOS: dict[str, Callable[[int, int, Path], None]] = {
    "dtensor_ddp": scenario_dtensor_ddp,
    "fsdp2_dcp": scenario_fsdp2_dcp,
}


def loopback_only() -> None:
    """Keep gloo's connections on the loopback interface (it otherwise uses the address
    the host name resolves to). Rendezvous is a FileStore: no network at all."""
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def entry(rank: int, world: int, tmp: str, scenario: str) -> None:
    """``torch.multiprocessing`` entry point: rendezvous on a FileStore, run, tear down."""
    torch.set_num_threads(1)
    loopback_only()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=world,
        timeout=STORE_TIMEOUT,
    )
    SCENARIOS[scenario](rank, world, Path(tmp))
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: a gloo group left with an abandoned collective
    # (_skipped_step above) takes many seconds to destroy. Everything was checked already.
    os._exit(0)

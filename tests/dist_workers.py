"""Worker processes of ``test_distributed.py`` (gloo on CPU, 2 ranks).

Each scenario runs many checks inside one spawned job, since process start-up is the
main cost. A failed check raises in the worker; ``torch.multiprocessing`` hands the
traceback to the test. The reference for every check is a plain single-process
computation on full tensors (``ref_project``), made on every rank with the same seed.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STORE_TIMEOUT = datetime.timedelta(seconds=60)


def ref_project(w: torch.Tensor, c: float, dims: tuple[int, ...] | None, p: float) -> torch.Tensor:
    """Per-slice p-norm in float64; scale by c / n only where n > c."""
    x = w.detach().to(torch.float64)
    if dims is None:
        dims = tuple(range(x.dim()))
    n = torch.linalg.vector_norm(x, p, dim=dims, keepdim=True)
    return torch.where(n > c, x * (c / n), x).to(w.dtype)


def ref_dims(norm_dim: Any, ndim: int) -> tuple[int, ...] | None:
    if norm_dim == "per_unit":
        return tuple(range(1, ndim)) if ndim > 1 else None
    if norm_dim is None:
        return None
    return (norm_dim,) if isinstance(norm_dim, int) else tuple(norm_dim)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-6) -> None:
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape and err <= atol, f"{what}: max abs diff {err} (shapes {a.shape})"


def _all_equal_across_ranks(t: torch.Tensor, what: str) -> None:
    """Bitwise equality of ``t`` on every rank."""
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    for r, g in enumerate(gathered):
        assert torch.equal(g, gathered[0]), f"{what}: rank {r} differs from rank 0"


def _counts(mode: Any) -> int:
    return int(mode.get_total_counts())


# -- scenario: DTensor (tensor parallel), DDP, ranks out of step ---------------------------
def scenario_dtensor_ddp(rank: int, world: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from maxnorm_optim import MaxNormWrapper, max_norm_

    mesh = init_device_mesh("cpu", (world,))

    # 1. Every placement x p x norm_dim gives the dense result; count the collectives.
    shapes = [(5, 3), (3, 5), (1, 4), (4, 3, 2, 2), (5,)]
    placements = [Shard(0), Shard(1), Replicate()]
    norm_dims = ["per_unit", 0, 1, None, (0, 2)]
    for p in (1.0, 2.0, math.inf):
        for norm_dim in norm_dims:
            fulls, dts = [], []
            torch.manual_seed(int(p) if p != math.inf else 7)
            for shape in shapes:
                for pl in placements:
                    if isinstance(pl, Shard) and pl.dim >= len(shape):
                        continue
                    if ref_dims(norm_dim, len(shape)) is not None and max(
                        ref_dims(norm_dim, len(shape))  # type: ignore[arg-type]
                    ) >= len(shape):
                        continue
                    full = torch.randn(shape) * 2
                    fulls.append((full, pl))
                    dts.append(distribute_tensor(full.clone(), mesh, [pl]))
            with CommDebugMode() as mode:
                max_norm_(dts, 1.5, norm_dim=norm_dim, norm_type=p)
            spans = [
                isinstance(pl, Shard)
                and (ref_dims(norm_dim, f.dim()) is None or pl.dim in ref_dims(norm_dim, f.dim()))
                for f, pl in fulls
            ]
            expected = 1 if any(spans) else 0
            assert _counts(mode) == expected, (
                f"p={p} norm_dim={norm_dim}: {_counts(mode)} collectives, expected {expected}"
            )
            for (full, pl), d in zip(fulls, dts):
                want = ref_project(full, 1.5, ref_dims(norm_dim, full.dim()), p)
                _close(d.full_tensor(), want, f"{pl} {tuple(full.shape)} p={p} dim={norm_dim}")
                # in-bound slices are bitwise unchanged: every element is either kept
                # exactly or belongs to a slice whose reference norm exceeds the bound
                kept = d.full_tensor() == full
                changed = want != full
                assert bool((kept | changed).all()), f"{pl} {full.shape}: in-bound slice moved"

    # 1b. 2-d meshes (HSDP-like [Replicate, Shard], FSDP + TP-like [Shard, Shard]): only
    #     the mesh dims that shard a normed dim are reduced over; one collective at most.
    for mesh_shape in ((1, world), (world, 1)):
        mesh2 = init_device_mesh("cpu", mesh_shape)
        for pls in ([Replicate(), Shard(0)], [Shard(0), Shard(1)], [Shard(1), Shard(0)]):
            for norm_dim in ("per_unit", 0, None):
                torch.manual_seed(6)
                full = torch.randn(5, 4) * 2
                d = distribute_tensor(full.clone(), mesh2, pls)
                with CommDebugMode() as mode:
                    max_norm_(d, 1.0, norm_dim=norm_dim)
                assert _counts(mode) <= 1, f"{mesh_shape} {pls} {norm_dim}: {_counts(mode)}"
                want = ref_project(full, 1.0, ref_dims(norm_dim, 2), 2.0)
                _close(d.full_tensor(), want, f"mesh {mesh_shape} {pls} norm_dim={norm_dim}")

    # 2. Wrapper over several param groups: one collective per (mesh, reduced mesh dims,
    #    dtype) per constrained group; none for groups whose norms are local.
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
    params = {k: nn.Parameter(distribute_tensor(v.clone(), mesh, [pl[k]])) for k, v in full.items()}
    groups = [
        {"params": [params["a"], params["c"], params["e"]], "norm_dim": 0},  # a spans: 1
        {"params": [params["b"], params["d"]], "norm_dim": 1},  # d spans: 1
        {"params": [params["f"]], "norm_dim": 1},  # local: 0
    ]
    opt = MaxNormWrapper(torch.optim.SGD(groups, lr=1e-3), max_norm=1.0)  # zero grads
    for prm in params.values():
        prm.grad = torch.zeros_like(prm)
    with CommDebugMode() as mode:
        opt.step()
    assert _counts(mode) == 2, f"wrapper step: {_counts(mode)} collectives, expected 2"
    dims = {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0, "f": 1}
    for k, prm in params.items():
        _close(prm.full_tensor(), ref_project(full[k], 1.0, (dims[k],), 2.0), f"group param {k}")

    # 2b. bf16 and fp32 partials share the fp32 all-reduce; stats count local slices.
    torch.manual_seed(5)
    h_full, s_full = torch.randn(6, 5).bfloat16() * 3, torch.randn(6, 5) * 3
    h = nn.Parameter(distribute_tensor(h_full.clone(), mesh, [Shard(0)]))
    s = nn.Parameter(distribute_tensor(s_full.clone(), mesh, [Shard(0)]))
    opt = MaxNormWrapper(
        torch.optim.SGD([h, s], lr=1e-3), max_norm=1.0, norm_dim=0, track_stats=True
    )
    with CommDebugMode() as mode:
        opt.step()  # no gradients: DTensors are projected anyway
    assert _counts(mode) == 1, f"bf16 + fp32: {_counts(mode)} collectives"
    _close(h.full_tensor().float(), ref_project(h_full.float(), 1.0, (0,), 2.0), "bf16", 2e-2)
    _close(s.full_tensor(), ref_project(s_full, 1.0, (0,), 2.0), "fp32 next to bf16")
    stats = opt.constraint_stats()[0]
    assert stats is not None and int(stats["slices"]) == 10, stats  # 5 columns x 2 params
    assert int(stats["projected"]) == int((s_full.norm(dim=0) > 1).sum()) + int(
        (h_full.float().norm(dim=0) > 1).sum()
    ), stats

    # 2c. A NaN in a sharded slice: that slice is left alone on every rank (also for
    #     p = inf, whose max must not drop the NaN), the others are projected;
    #     error_if_nonfinite raises on every rank alike.
    for p in (2.0, math.inf):
        bad_full = torch.randn(6, 3) * 3
        bad_full[5, 1] = float("nan")  # on the last rank's shard
        bad = distribute_tensor(bad_full.clone(), mesh, [Shard(0)])
        max_norm_(bad, 1.0, norm_dim=0, norm_type=p)
        got = bad.full_tensor()
        assert torch.equal(got[:, 1].isnan(), bad_full[:, 1].isnan()), f"p={p}: NaN slice"
        kept = got[:, 1] == bad_full[:, 1]
        assert bool(kept[:5].all()), f"p={p}: the NaN slice was scaled"
        for col in (0, 2):
            want = ref_project(bad_full[:, col : col + 1], 1.0, (0,), p)
            _close(got[:, col : col + 1], want, f"p={p}: finite slice next to NaN")
        try:
            max_norm_(bad, 1.0, norm_dim=0, norm_type=p, error_if_nonfinite=True)
        except RuntimeError as err:
            assert "non-finite" in str(err), str(err)
        else:
            raise AssertionError(f"p={p}: error_if_nonfinite did not raise on rank {rank}")

    # 3. Ranks disagree about which DTensor params have a gradient: every rank still
    #    projects every DTensor of the group (same collectives), so nothing hangs and
    #    the result is the dense projection of the full tensor.
    torch.manual_seed(2)
    w_full = torch.randn(8, 4)
    w = nn.Parameter(distribute_tensor(w_full.clone(), mesh, [Shard(0)]))
    opt = MaxNormWrapper(torch.optim.SGD([w], lr=0.5), max_norm=1.0, norm_dim=0)
    if rank == 0:
        w.grad = -torch.ones_like(w)
    with CommDebugMode() as mode:
        opt.step()
    assert _counts(mode) == 1, "the rank without a gradient must join the collective"
    stepped = w_full.clone()
    stepped[: w_full.shape[0] // world] += 0.5  # only rank 0's rows moved
    _close(w.full_tensor(), ref_project(stepped, 1.0, (0,), 2.0), "grad on one rank only")
    # a replicated DTensor stays bit-identical on every rank in the same situation
    r = nn.Parameter(distribute_tensor(torch.randn(4, 4) * 3, mesh, [Replicate()]))
    MaxNormWrapper(torch.optim.SGD([r], lr=0.1), max_norm=1.0).step()  # no grads anywhere
    _all_equal_across_ranks(r.to_local(), "replicated DTensor")
    assert float(r.to_local().norm(dim=1).max()) <= 1.0

    # 4. DDP: ranks stay bit-identical and match a single-process run.
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
                prm.copy_(ref_project(prm, 0.6, ref_dims("per_unit", prm.dim()), 2.0))
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        _all_equal_across_ranks(a.detach(), f"DDP {name}")
        _close(a.detach(), b.detach(), f"DDP {name} vs single process")

    # 5. A rank that skips step() does not hang the others forever: the collective
    #    fails after the process group's timeout (here a 2 s group).
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    short = DeviceMesh.from_group(group, "cpu")
    v = nn.Parameter(distribute_tensor(torch.randn(4, 3), short, [Shard(0)]))
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


def _groups(model: nn.Module, norm_dim: Any) -> list[dict[str, Any]]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": weights, "norm_dim": norm_dim},
        {"params": biases, "norm_dim": None, "max_norm": 0.3},  # 1-d: spans the shard
    ]


def _ref_groups(model: nn.Module, norm_dim: Any) -> list[tuple[list[torch.Tensor], Any, float]]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [(weights, norm_dim, 0.5), (biases, None, 0.3)]


def _batches(kind: str, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape, out = ((8, 6), 1) if kind == "mlp" else ((8, 2, 8, 8), 3)
    return [
        (torch.randn(*shape, generator=gen), torch.randn(8, out, generator=gen)) for _ in range(n)
    ]


def scenario_fsdp2_dcp(rank: int, world: int, tmp: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )
    from torch.distributed.tensor.debug import CommDebugMode

    from maxnorm_optim import MaxNormWrapper
    from maxnorm_optim.distributed import MaxNormLoadPlanner

    def local_batch(x: torch.Tensor) -> torch.Tensor:
        return x[rank * x.shape[0] // world : (rank + 1) * x.shape[0] // world]

    def train(model: nn.Module, opt: Any, batches: Any) -> None:
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(model(local_batch(x)), local_batch(y)).backward()
            opt.step()

    # 1. FSDP2 MLP and CNN against a single-process reference, norm over a local dim
    #    (per unit) and over the sharded dim 0.
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
            batches = _batches(kind, 4, seed=11)
            for x, y in batches:
                opt.zero_grad()
                nn.functional.mse_loss(model(local_batch(x)), local_batch(y)).backward()
                with CommDebugMode() as mode:
                    opt.step()
                # one all-reduce for the biases, one more for weights normed over dim 0
                expected = 1 if norm_dim == "per_unit" else 2
                assert _counts(mode) == expected, f"{kind} {norm_dim}: {_counts(mode)} comms"
                ref_opt.zero_grad()
                nn.functional.mse_loss(ref(x), y).backward()
                ref_opt.step()
                with torch.no_grad():
                    for params, nd, c in _ref_groups(ref, norm_dim):
                        for prm in params:
                            prm.copy_(ref_project(prm, c, ref_dims(nd, prm.dim()), 2.0))
            at_bound = False
            for (name, a), b in zip(model.named_parameters(), ref.parameters()):
                full = a.full_tensor()
                _close(full, b.detach(), f"FSDP2 {kind} norm_dim={norm_dim} {name}")
                c = 0.5 if name.endswith("weight") else 0.3
                nd = norm_dim if name.endswith("weight") else None
                dims = ref_dims(nd, full.dim()) or tuple(range(full.dim()))
                n = torch.linalg.vector_norm(full.detach().double(), 2, dim=dims)
                assert float(n.max()) <= c * (1 + 1e-6), f"{kind} {name}: {float(n.max())} > {c}"
                at_bound |= float(n.max()) >= c * (1 - 1e-5)
            assert at_bound, f"{kind} {norm_dim}: no slice reached the bound (test too weak)"

    # 2. Distributed checkpoint: save after 3 steps, resume, continue identically.
    ckpt = tmp / "ckpt"
    batches = _batches("mlp", 6, seed=12)

    def fresh(seed: int) -> tuple[nn.Module, MaxNormWrapper]:
        torch.manual_seed(seed)
        model = _shard(_mlp())
        base = torch.optim.Adam(_groups(model, 0), lr=0.05)
        return model, MaxNormWrapper(base, max_norm=0.5)

    model, opt = fresh(20)
    train(model, opt, batches[:3])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    train(model, opt, batches[3:])
    expected = [p.full_tensor() for p in model.parameters()]

    model2, opt2 = fresh(21)  # different initial weights: all must come from the checkpoint
    msd, osd = get_state_dict(model2, opt2)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    set_state_dict(model2, opt2, model_state_dict=msd, optim_state_dict=osd)
    assert opt2.param_groups[0]["max_norm"] == 0.5 and opt2.param_groups[0]["norm_dim"] == 0
    train(model2, opt2, batches[3:])
    for a, b in zip(model2.parameters(), expected):
        assert torch.equal(a.full_tensor(), b), "resumed run differs from the uninterrupted one"

    # 3. A checkpoint written by a bare base optimizer, loaded into a wrapper.
    bare_ckpt = tmp / "bare"
    torch.manual_seed(30)
    model3 = _shard(_mlp())
    bare = torch.optim.Adam([{"params": g["params"]} for g in _groups(model3, 0)], lr=0.05)
    train(model3, bare, batches[:3])
    dcp.save({"optim": get_optimizer_state_dict(model3, bare)}, checkpoint_id=str(bare_ckpt))
    bare_first = bare.state[bare.param_groups[0]["params"][0]]
    bare_state = {k: v.full_tensor() for k, v in bare_first.items() if hasattr(v, "full_tensor")}

    model4, opt4 = fresh(31)
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
    train(model4, opt4, batches[3:])
    for name, prm in model4.named_parameters():
        if name.endswith("weight"):
            n = torch.linalg.vector_norm(prm.full_tensor().double(), 2, dim=0)
            assert float(n.max()) <= 0.5 * (1 + 1e-6), f"{name} after bare resume"


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
    # (scenario 5 above) takes many seconds to destroy. Everything was checked already.
    os._exit(0)

"""The projection on a CUDA device (skipped without one): the sync-free kernels never
wait for the device inside `step()`, and every guarantee of the projection holds there
as on the CPU. `tools/gpu_check.sh` runs this file and the benchmarks on a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maxnorm_optim import MaxNormWrapper, max_norm_

from reference import check_norms, reference_project, robust_norms, same_bits, slice_norms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    with torch.no_grad():
        model[0].weight.mul_(20)
    return model


@pytest.mark.parametrize("base", ["sgd", "adam_fused", "adam_foreach"])
@pytest.mark.parametrize("track_stats", [False, True])
def test_wrapper_steps_without_a_host_sync(base, track_stats):
    model = _model()
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
        "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    }[base]
    opt = MaxNormWrapper(make(model.parameters()), max_norm=1.0, track_stats=track_stats)
    x = torch.randn(32, 64, device="cuda")
    model(x).sum().backward()
    opt.step()  # plans and state are built here (may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool((check_norms(model[0].weight) <= 1.0).all())
    if track_stats:
        assert opt.constraint_stats()[0]["slices"].item() == 256 + 10


def test_grad_scaler_with_a_fused_base_syncs_nothing_in_step():
    model = _model()
    opt = MaxNormWrapper(torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), max_norm=1.0)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(model(x).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert bool((check_norms(model[0].weight) <= 1.0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("length", [3, 64, 4096, 1 << 16])
def test_guarantees_hold_on_the_device(dtype, p, length):
    """In-bound slices bitwise, scaled slices pass the check in their dtype and in
    float64 (as computed on the device), projecting twice equals once."""
    g = torch.Generator().manual_seed(length)
    rows = max(2, min(64, (1 << 20) // length))
    x = torch.randn(rows, length, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(rows, length, generator=g, dtype=torch.float64))
    n = torch.linalg.vector_norm(x, p, dim=1, keepdim=True)
    spread = torch.where(torch.arange(rows).unsqueeze(1) % 2 == 0, 0.5, 2.0)
    c = 3.0
    w = (x / n * c * spread).to(dtype).cuda()
    w[1, 0] = math.nan if not dtype.is_complex else complex(math.inf, 0.0)
    before = w.clone()
    max_norm_(w, c, norm_type=p)
    over = (robust_norms(before.cpu(), "per_unit", p) > c).flatten() & (
        torch.isfinite(robust_norms(before.cpu(), "per_unit", p)).flatten()
    )
    inside = ~over
    assert same_bits(w[inside.cuda()], before[inside.cuda()])
    assert bool((check_norms(w, "per_unit", p).flatten()[over.cuda()] <= c).all())
    assert bool((slice_norms(w.cpu(), "per_unit", p).flatten()[over] <= c).all())
    once = w.clone()
    max_norm_(w, c, norm_type=p)
    assert same_bits(w, once)


@pytest.mark.parametrize("norm_dim", ["per_unit", None, 0])
def test_device_matches_the_float64_reference(norm_dim):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(s, generator=g) * 3 for s in [(300, 7), (64, 3, 3, 3), (4096, 256)]]
    devs = [t.cuda() for t in tensors]
    max_norm_(devs, 2.0, norm_dim)
    for t, d in zip(tensors, devs):
        expected = reference_project(t, 2.0, norm_dim)
        torch.testing.assert_close(d.cpu(), expected, rtol=1e-4, atol=1e-6)


def test_unit_norm_and_error_if_nonfinite_on_the_device():
    w = (torch.randn(128, 300) * torch.logspace(-20, 2, 128).unsqueeze(1)).cuda()
    max_norm_(w, 1.0, min_norm=1.0)
    n = check_norms(w).flatten()
    assert bool((n <= 1.0).all()) and bool((n >= 1.0 - 1e-4).all())
    bad = torch.ones(4, 4, device="cuda")
    bad[2, 2] = math.nan
    before = [w.clone(), bad.clone()]
    with pytest.raises(RuntimeError, match="NaN or inf"):
        max_norm_([w, bad], 0.5, error_if_nonfinite=True)
    assert same_bits(w, before[0]) and same_bits(bad, before[1])

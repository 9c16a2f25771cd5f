"""Compatibility matrix, ``torch.compile``: a compiled function calling ``opt.step()``
runs and matches eager, and the projection does not recompile per param group.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from maxnorm_optim import MaxNormWrapper

from helpers import assert_within, clone_params, make_weight

COMPAT_SECTION = "torch.compile"
COMPAT_ORDER = 4
COMPAT_COLUMNS = {
    "test_compiled_step_matches_eager": "compiled step = eager (1e-6)",
    "test_no_recompile_per_param_group": "12 constrained groups, no recompile",
}

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def seeded_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_compiled_step_matches_eager() -> None:
    """Inductor (the default backend): SGD with momentum, a constrained 2-d and 3-d
    weight and an unconstrained bias."""
    pa = [
        torch.nn.Parameter(make_weight(4, 3, (0.5, 1.5, 0.8, 2.0), seed=31)),
        torch.nn.Parameter(make_weight(3, 4, (2.0, 0.7), seed=32).reshape(3, 2, 2)),
        torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4)),
    ]
    pb = clone_params(pa)

    def make(params):
        groups = [{"params": params[:2]}, {"params": params[2:], "max_norm": None}]
        return MaxNormWrapper(torch.optim.SGD(groups, lr=0.1, momentum=0.9), max_norm=1.0)

    eager, compiled = make(pa), make(pb)

    @torch.compile
    def compiled_step():
        compiled.step()

    for step in range(3):
        seeded_grads(pa, step)
        seeded_grads(pb, step)
        eager.step()
        compiled_step()
        for a, b in zip(pa, pb):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        assert_within(pb[0], 1.0)
        assert_within(pb[1], 1.0)
    assert counters["stats"]["unique_graphs"] >= 1  # it really was compiled


def test_no_recompile_per_param_group() -> None:
    """12 constrained groups, each with its own bound and shape: one compilation
    serves every group and every step (any recompile raises)."""
    shapes = [(4, 3), (3, 5), (6, 2), (2, 2, 3)] * 3
    pa = [
        torch.nn.Parameter(
            make_weight(s[0], 12 // s[0] if len(s) == 3 else s[1], (0.5, 3.0), seed=40 + i).reshape(
                s
            )
        )
        for i, s in enumerate(shapes)
    ]
    pb = clone_params(pa)
    bounds = [1.0 + 0.25 * i for i in range(len(shapes))]

    def make(params):
        groups = [{"params": [p], "max_norm": c} for p, c in zip(params, bounds)]
        return MaxNormWrapper(torch.optim.Adam(groups, lr=0.05))

    eager, compiled = make(pa), make(pb)

    # The "eager" backend: recompiles are decided by Dynamo's guards, whatever the
    # backend, and it keeps this test fast.
    @torch.compile(backend="eager")
    def compiled_step():
        compiled.step()

    with torch._dynamo.config.patch(error_on_recompile=True, fail_on_recompile_limit_hit=True):
        for step in range(3):
            seeded_grads(pa, step)
            seeded_grads(pb, step)
            eager.step()
            compiled_step()
            if step == 0:
                graphs = counters["stats"]["unique_graphs"]
                assert graphs >= 1
            for a, b, c in zip(pa, pb, bounds):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
                assert_within(b, c)
    assert counters["stats"]["unique_graphs"] == graphs, "a later step compiled again"


def test_max_norm_under_torch_compile_keeps_the_guarantees() -> None:
    """max_norm_ traced by Dynamo takes the sync-free kernels, judged by the eager check
    norms (an opaque custom op): every scaled slice passes the eager check."""
    from maxnorm_optim import max_norm_

    from reference import check_norms, slice_norms

    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(40, 300, generator=g) * 3, torch.randn(16, 3, 3, 3, generator=g)]
    before = [w.clone() for w in ws]

    @torch.compile(backend="aot_eager")
    def project(tensors):
        max_norm_(tensors, 2.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        project(ws)
    assert counters["stats"]["unique_graphs"] >= 1
    for w, b in zip(ws, before):
        over = (slice_norms(b) > 2.0).flatten()
        assert bool(over.any())
        assert bool((check_norms(w).flatten()[over] <= 2.0).all())
        assert bool((slice_norms(w).flatten()[over] <= 2.0).all())
        inside = ~over
        assert torch.equal(w[inside], b[inside])

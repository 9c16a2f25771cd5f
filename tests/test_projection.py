"""max_norm_ as an API: what it remembers between calls (layouts only), and that a new
layout, repeats and temporaries are handled."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from maxnorm_optim import max_norm_

from reference import landing_gap, reference_project


def test_repeats_in_a_list_seen_before_are_still_projected_once():
    a, b = torch.full((4, 9), 3.0), torch.full((4, 9), 6.0)
    for _ in range(2):  # the second call takes the remembered layout
        x, y = a.clone(), b.clone()
        max_norm_([x, x, y], 1.0)
        torch.testing.assert_close(x.norm(dim=1), torch.ones(4), rtol=1e-5, atol=0)
        torch.testing.assert_close(y.norm(dim=1), torch.ones(4), rtol=1e-5, atol=0)


def test_a_call_keeps_no_tensor_alive():
    w = torch.randn(256, 64) * 5
    ref = weakref.ref(w)
    max_norm_(w, 1.0)
    max_norm_([w, torch.randn(3, 3)], 1.0)
    del w
    gc.collect()
    assert ref() is None


def test_the_same_memory_with_a_new_layout_is_planned_anew():
    base = torch.randn(64, 64) * 5
    for view in (base, base.t(), base.view(16, 256), base[:32]):
        x = view.clone() if not view.is_contiguous() else view
        before = x.clone()
        max_norm_(x, 1.0)
        gap = landing_gap(x[0].numel(), x.dtype)
        torch.testing.assert_close(x, reference_project(before, 1.0), rtol=gap, atol=1e-7)


def test_small_tensors_of_mixed_shapes_are_batched_correctly():
    g = torch.Generator().manual_seed(3)
    shapes = [(8, 3, 3), (8, 9), (4, 3, 3), (2, 2, 2, 2), (5, 8)] * 4
    tensors = [torch.randn(s, generator=g) * 4 for s in shapes]
    before = [t.clone() for t in tensors]
    for norm_dim in ("per_unit", None, (1, -1)):
        xs = [t.clone() for t in before]
        if norm_dim == (1, -1):
            xs = [x for x in xs if x.dim() >= 3]
        expected = [reference_project(x.clone(), 1.0, norm_dim) for x in xs]
        max_norm_(xs, 1.0, norm_dim)
        for x, e in zip(xs, expected):
            torch.testing.assert_close(x, e, rtol=1e-5, atol=1e-7)
    del tensors


@pytest.mark.parametrize("batched", [False, True])
def test_rows_left_alone_keep_their_bits_when_subnormals_are_flushed(batched):
    """Short rows are scaled by one multiply of whole tensors (by exactly 1 where in
    bound) only where that is exact: not while the CPU flushes subnormals."""
    w = torch.full((8, 16), 1.0)
    w[::2] = 2.0**-140  # in bound, subnormal (fp32)
    w[1::2] *= 3.0  # over the bound
    tensors = [w] + ([torch.full((8, 16), 0.1)] if batched else [])
    before = w.clone()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        max_norm_(tensors, 1.0)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(w[::2].view(torch.int32), before[::2].view(torch.int32))
    assert bool((torch.linalg.vector_norm(w[1::2], dim=1) <= 1.0).all())


@pytest.mark.parametrize("length", [1024, 8192])
@pytest.mark.parametrize("special", ["none", "nan", "subnormal"])
def test_many_rows_over_are_written_back_by_one_multiply_exactly(length, special):
    """Half the rows over: they are written back by one multiply of every row (by
    exactly 1 where in bound) where that is exact, and gathered and scattered where a
    row holds NaN or subnormals are flushed; either way in-bound rows keep their bits
    and scaled rows match the float64 reference."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, length, generator=g)
    w[::2] *= 0.2 / math.sqrt(length)  # in bound
    w[0, 0] = -0.0
    if special == "nan":
        w[2, 1] = math.nan
    if special == "subnormal":
        w[4, :] = 2.0**-140
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush subnormals")
    before = w.clone()
    try:
        max_norm_(w, 1.0)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(w[::2].view(torch.int32), before[::2].view(torch.int32))
    assert bool((torch.linalg.vector_norm(w[1::2], dim=1) <= 1.0).all())
    assert bool((torch.linalg.vector_norm(w[1::2].double(), dim=1) <= 1.0).all())
    gap = landing_gap(length, w.dtype)
    torch.testing.assert_close(w, reference_project(before, 1.0), rtol=gap, atol=0, equal_nan=True)


def test_options_seen_before_are_still_checked_by_type():
    """A call with valid options does not let a later call through with values that
    compare equal but have another type (True == 1, (True,) == (1,))."""
    w = torch.randn(4, 3)
    before = w.clone()
    for good, bad in (
        ({"max_norm": 1}, {"max_norm": True}),
        ({"max_norm": 1.0, "norm_dim": (1,)}, {"max_norm": 1.0, "norm_dim": (True,)}),
        ({"max_norm": 2, "error_if_nonfinite": False}, {"max_norm": 2, "error_if_nonfinite": 0}),
        ({"max_norm": 1.0, "norm_type": 2}, {"max_norm": 1.0, "norm_type": True}),
    ):
        x = before.clone()
        max_norm_(x, **good)
        y = before.clone()
        with pytest.raises(TypeError):
            max_norm_(y, **bad)
        assert torch.equal(y, before)


def test_calls_from_several_threads_with_many_option_sets():
    """What is remembered between calls (validated options, per-dtype pipelines) is
    shared by threads: many distinct bounds from several threads at once (each memory
    is cleared when full) never fail."""
    import sys
    import threading

    errors: list[BaseException] = []

    def work(k: int) -> None:
        w = torch.randn(2, 4)
        try:
            for i in range(1500):
                max_norm_(w, 1.0 + (i * 7 + k) % 97)
        except BaseException as exc:  # reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: races show up
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:1]

"""Touched-rows projection after sparse-gradient steps, and when it must not be used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maxnorm_optim import MaxNormWrapper

from reference import reference_project

ROW_ONLY = [
    (torch.optim.SparseAdam, {"lr": 0.5}),
    (torch.optim.SGD, {"lr": 5.0}),
    (torch.optim.Adagrad, {"lr": 2.0}),
]


def _embedding_step(emb: nn.Embedding, opt, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, emb.num_embeddings, (12,), generator=g)
    opt.zero_grad()
    emb(idx).pow(2).sum().mul(-1).backward()  # pushes touched rows outward
    opt.step()
    return idx


@pytest.mark.parametrize("opt_cls,kw", ROW_ONLY)
def test_listed_optimizers_change_only_touched_rows(opt_cls, kw):
    """The premise of the touched-rows rule, checked on the real optimizers."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, sparse=True)
    opt = opt_cls(emb.parameters(), **kw)
    for step in range(4):
        before = emb.weight.detach().clone()
        idx = _embedding_step(emb, opt, step)
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(emb.weight[untouched], before[untouched])


def _assert_equals_bare_step_plus_reference(opt_cls, kw, rows, c, seed, init_scale=1.0):
    torch.manual_seed(seed)
    e1 = nn.Embedding(rows, 8, sparse=True)
    with torch.no_grad():
        e1.weight.mul_(init_scale)
    e2 = nn.Embedding(rows, 8, sparse=True)
    e2.load_state_dict(e1.state_dict())
    o1 = MaxNormWrapper(opt_cls(e1.parameters(), **kw), max_norm=c)
    bare = opt_cls(e2.parameters(), **kw)
    for step in range(6):
        _embedding_step(e1, o1, step)
        _embedding_step(e2, bare, step)
        with torch.no_grad():
            e2.weight.copy_(reference_project(e2.weight, c))
        torch.testing.assert_close(e1.weight, e2.weight, rtol=1e-5, atol=1e-7)
        assert e1.weight.norm(dim=1).max() <= c  # no violating row left behind


@pytest.mark.parametrize("opt_cls,kw", ROW_ONLY)
def test_touched_rows_rule_matches_full_projection(opt_cls, kw):
    # Many initial rows out of bound: the first step projects every row.
    _assert_equals_bare_step_plus_reference(opt_cls, kw, rows=50, c=1.0, seed=1, init_scale=3.0)


def test_touched_rows_only_while_every_other_row_is_known_in_bound():
    """The touched-rows rule holds only while nothing else changed: a write outside the
    optimizer, a new bound, a load, a new layout each make the next step look at every
    row."""
    torch.manual_seed(2)
    emb = nn.Embedding(40, 4, sparse=True)
    opt = MaxNormWrapper(torch.optim.SparseAdam(emb.parameters(), lr=0.1), max_norm=0.5)
    _embedding_step(emb, opt, 0)
    assert emb.weight.norm(dim=1).max() <= 0.5  # first step: every row
    with torch.no_grad():
        emb.weight[0] = 10.0  # written outside the optimizer (its version moves) ...
    idx = _embedding_step(emb, opt, 1)
    assert 0 not in idx
    assert emb.weight.norm(dim=1).max() <= 0.5  # ... and seen by the next step
    opt.param_groups[0]["max_norm"] = 0.2  # a new bound: every row
    _embedding_step(emb, opt, 2)
    assert emb.weight.norm(dim=1).max() <= 0.2
    with torch.no_grad():
        emb.weight.copy_(torch.full((40, 4), 3.0))  # pretrained weights, copied in
    _embedding_step(emb, opt, 3)
    assert emb.weight.norm(dim=1).max() <= 0.2
    opt.load_state_dict(opt.state_dict())
    _embedding_step(emb, opt, 4)
    assert emb.weight.norm(dim=1).max() <= 0.2
    with torch.no_grad():
        emb.weight.data[1] = 10.0  # through .data: no version bump, not seen by a step ...
    _embedding_step(emb, opt, 5)
    opt.project()  # ... project() always projects every row
    assert emb.weight.norm(dim=1).max() <= 0.2


@pytest.mark.parametrize("opt_cls,kw", ROW_ONLY)
def test_touched_rows_rule_follows_a_new_bound_and_outside_writes(opt_cls, kw):
    """Every listed optimizer: after max_norm is lowered, or the table is overwritten
    (model.load_state_dict), the next step enforces the bound on all rows."""
    torch.manual_seed(4)
    emb = nn.Embedding(200, 8, sparse=True)
    opt = MaxNormWrapper(opt_cls(emb.parameters(), **kw), max_norm=1.0)
    for step in range(3):
        _embedding_step(emb, opt, step)
    opt.param_groups[0]["max_norm"] = 0.5
    _embedding_step(emb, opt, 3)
    assert emb.weight.norm(dim=1).max() <= 0.5
    emb.load_state_dict({"weight": torch.randn(200, 8) * 5})
    _embedding_step(emb, opt, 4)
    assert emb.weight.norm(dim=1).max() <= 0.5


@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (torch.optim.SGD, {"lr": 1.0, "momentum": 0.9}),
        (torch.optim.SGD, {"lr": 1.0, "momentum": 0.5, "nesterov": True}),
    ],
)
def test_other_sparse_optimizers_keep_the_full_projection(opt_cls, kw):
    """SGD with momentum changes untouched rows: the wrapper projects every row."""
    _assert_equals_bare_step_plus_reference(opt_cls, kw, rows=30, c=0.6, seed=3)

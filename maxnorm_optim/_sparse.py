"""Which optimizers' sparse-gradient steps change only the rows in the gradient.

After such a step the projection needs to look only at those rows, provided every
other row was in bound before the step (see `MaxNormWrapper`'s certificates).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._options import slice_dims

__all__ = ["sparse_rows_only"]


def sparse_rows_only(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor
) -> bool:
    """Whether a step with a sparse gradient changes only the rows present in it.

    True for `SparseAdam`; for `SGD` without momentum and weight decay; and for
    `Adagrad` (whose sparse path requires `weight_decay == 0`); exact classes only,
    since a subclass may change `step`. The projection then only needs to look at
    those rows, provided `norm_dim` gives one norm per row of a 2-d weight.
    """
    if param.dim() != 2 or slice_dims(group["norm_dim"], 2) != (1,):
        return False
    kind = type(optimizer)
    if kind is torch.optim.SparseAdam:
        return True
    if kind is torch.optim.SGD:
        return group.get("momentum", 0) == 0 and group.get("weight_decay", 0) == 0
    if kind is torch.optim.Adagrad:
        return group.get("weight_decay", 0) == 0
    return False

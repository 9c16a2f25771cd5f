"""Distributed checkpoints of wrapped optimizers.

`DTensor` parameters (FSDP2 `fully_shard`, tensor parallelism) need nothing from this
module: `MaxNormWrapper` and `max_norm_` project them directly (see
`docs/distributed.md`). `MaxNormLoadPlanner` loads a `torch.distributed.checkpoint`
checkpoint written by a bare optimizer into a wrapper's state dict.
"""

from __future__ import annotations

from typing import Any

import torch

if not torch.distributed.is_available():  # pragma: no cover - depends on the torch build
    raise ImportError("maxnorm_optim.distributed needs a torch built with torch.distributed")

from torch.distributed.checkpoint import DefaultLoadPlanner

from ._options import OPTION_KEYS

__all__ = ["MaxNormLoadPlanner"]


def _is_option_key(fqn: str) -> bool:
    parts = fqn.split(".")
    return "param_groups" in parts[:-1] and parts[-1] in OPTION_KEYS


class MaxNormLoadPlanner(DefaultLoadPlanner):
    """A `DefaultLoadPlanner` that loads checkpoints lacking the max-norm group keys.

    A checkpoint written by a bare optimizer (`get_optimizer_state_dict` of the base,
    not of the wrapper) has no `max_norm`, `norm_dim`, ... in its param groups, and
    the default planner refuses to load it into a wrapper's state dict
    (`Missing key in checkpoint state_dict: ...max_norm`). This planner skips exactly
    those keys when the checkpoint lacks them, so they keep the values of the state
    dict being loaded into (the wrapper's current options), and stays strict about
    every other key. Keys present in the checkpoint are loaded as usual.

    Examples:
        ```python
        osd = get_optimizer_state_dict(model, wrapper)
        dcp.load({"optim": osd}, checkpoint_id=path, planner=MaxNormLoadPlanner())
        set_optimizer_state_dict(model, wrapper, osd)
        ```
    """

    def create_local_plan(self) -> Any:
        saved = self.metadata.state_dict_metadata if self.metadata is not None else {}
        for fqn in [k for k in self.state_dict if k not in saved and _is_option_key(k)]:
            del self.state_dict[fqn]
        return super().create_local_plan()

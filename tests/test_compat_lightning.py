"""Compatibility matrix, PyTorch Lightning: a ``LightningModule`` whose
``configure_optimizers`` returns the wrapper (alone, or with an LR scheduler) trains on
CPU with the constraint holding. Lightning is a test-only extra: skipped when absent.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from maxnorm_optim import MaxNormWrapper

from helpers import assert_within

COMPAT_SECTION = "PyTorch Lightning"
COMPAT_ORDER = 7
COMPAT_COLUMNS = {"test_lightning_trains_with_wrapper": "Trainer.fit on CPU"}

torch.set_num_threads(1)

MAX_NORM = 1.0


def make_net(L, with_scheduler: bool):
    """The LightningModule (defined here so that the module imports without lightning)."""

    class Net(L.LightningModule):
        def __init__(self, with_scheduler: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.hidden = torch.nn.Linear(3, 8)
            self.out = torch.nn.Linear(8, 2)
            with torch.no_grad():
                self.hidden.weight.mul_(5.0)  # start outside the ball
            self.with_scheduler = with_scheduler
            self.lrs: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.out(torch.tanh(self.hidden(x))), y)

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.lrs.append(self.optimizers().param_groups[0]["lr"])

        def configure_optimizers(self):
            groups = [
                {"params": [self.hidden.weight, self.out.weight]},
                {"params": [self.hidden.bias, self.out.bias], "max_norm": None},
            ]
            opt = MaxNormWrapper(torch.optim.Adam(groups, lr=0.05), max_norm=MAX_NORM)
            if not self.with_scheduler:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Net(with_scheduler)


@pytest.mark.parametrize("with_scheduler", [False, True], ids=["wrapper", "wrapper+StepLR"])
def test_lightning_trains_with_wrapper(with_scheduler: bool, tmp_path) -> None:
    L = pytest.importorskip("lightning", reason="lightning (a test-only extra) is not installed")
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 3, generator=g), torch.randn(24, 2, generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model = make_net(L, with_scheduler)
    start = model.hidden.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        trainer.fit(model, loader)
    assert trainer.global_step == 5
    assert isinstance(trainer.optimizers[0], MaxNormWrapper)
    assert not torch.equal(model.hidden.weight, start)
    assert_within(model.hidden.weight, MAX_NORM)
    assert_within(model.out.weight, MAX_NORM)
    if with_scheduler:
        assert model.lrs == [0.05, 0.025, 0.025, 0.0125, 0.0125]

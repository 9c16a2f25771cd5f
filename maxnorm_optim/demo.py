"""Test error against learning rate on scikit-learn's digits: bare optimizer vs. max-norm.

Run ``python -m maxnorm_optim.demo --help`` (or ``maxnorm-optim-demo --help``). The demo
needs scikit-learn, matplotlib and tqdm: in a checkout of the repository,
``pip install -e '.[demo]'`` (or ``pip install -r requirements/dev.txt``).

A dropout MLP is trained at several learning rates, with several seeds each, once with
the bare optimizer and once wrapped in ``MaxNormWrapper``. For a given seed both runs
start from the same weights and see the same mini-batches and dropout masks; the
projection draws no random numbers. In the spirit of Srivastava et al. (2014, "Dropout: a
simple way to prevent neural networks from overfitting"), the question is whether the
bound on every unit's incoming weight norm keeps training stable at learning rates at
which the bare network diverges. One run proves little (at the edge of stability the
outcome depends on the seed and on floating-point rounding), so the demo reports, per
learning rate, the median and the range over seeds and how many seeds diverged.

``--write-docs`` regenerates the README's demo table and ``docs/demo-output.md`` from the
run (in a checkout).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from . import MaxNormWrapper, max_norm_param_groups

__all__ = ["main"]

PROG = "maxnorm-optim-demo"
INSTALL_HINT = (
    "in a checkout of the repository run pip install -e '.[demo]' "
    "(or pip install -r requirements/dev.txt)"
)

# Defaults, chosen so that the conclusion does not depend on the machine: at 1.0 bare
# SGD goes non-finite in its first epoch with every seed tried (and max-norm never
# does), at 0.003-0.03 both train with every seed. The rates in between (about 0.1 to
# 0.3) are where the bare net's fate depends on the seed and on rounding, so they are
# left out of the default sweep. They are the defaults for SGD only; other optimizers
# get their own default learning rate unless --lrs is given.
SGD_LRS = (0.003, 0.01, 0.03, 1.0)  # docs_page() says how these were checked: keep it true
SGD_MOMENTUM = 0.9
SEEDS = 5
LR_DECAY = 0.9  # per epoch (ExponentialLR)
MAX_NORM = 1.0
EPOCHS = 20
BATCH_SIZE = 32
HIDDEN = 256
DROPOUT_IN = 0.2
DROPOUT_HIDDEN = 0.5
TEST_SHARE = 0.3
SPLIT_SEED = 0  # the train/test split is the same for every seed
THREADS = 1  # the matrices are small: one thread is fastest, and the numbers do not
# depend on the core count

TABLE_START = "<!-- demo-table:start -->"
TABLE_END = "<!-- demo-table:end -->"
DOCS_PAGE = Path("docs/demo-output.md")
DOCS_PLOT = Path("docs/img/demo.png")
DEFAULT_OUT = Path("maxnorm-demo.png")


class DemoError(Exception):
    """A problem with the options, reported as one line without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, no usage block.
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _require(name: str) -> ModuleType:
    """Import a module the demo needs, or fail with how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DemoError(
            f"the demo needs scikit-learn, matplotlib and tqdm ({name} is missing): {INSTALL_HINT}"
        ) from None


# -- options ------------------------------------------------------------------------------


def _checked(kind: type, ok: Callable[[Any], bool], requirement: str) -> Callable[[str], Any]:
    """An argparse ``type``: parse with ``kind``, then require ``ok(value)``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            article = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {article}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
_positive_int = _checked(int, lambda v: v >= 1, "at least 1")
_seed = _checked(int, lambda v: 0 <= v < 2**63, "in [0, 2**63)")
_momentum = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Train a dropout MLP on scikit-learn's handwritten digits at several learning "
            "rates and seeds, with the bare optimizer and wrapped in MaxNormWrapper, and "
            "report the test error per learning rate (median and range over seeds) and "
            "how many seeds diverged."
        ),
    )
    parser.add_argument(
        "--optimizer",
        default="SGD",
        help="a name in torch.optim (e.g. SGD, Adam) or, if installed, in torch_optimizer "
        "(e.g. Lamb); default: %(default)s",
    )
    parser.add_argument(
        "--max-norm",
        type=_positive_float,
        default=MAX_NORM,
        metavar="C",
        help="the bound on each unit's incoming weight norm; default: %(default)s",
    )
    parser.add_argument(
        "--lrs",
        type=_positive_float,
        nargs="+",
        default=None,
        metavar="LR",
        help=f"initial learning rates (each decayed by {LR_DECAY} per epoch); default: "
        f"{' '.join(f'{lr:g}' for lr in SGD_LRS)} for SGD, the optimizer's own default "
        "otherwise",
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=SEEDS,
        metavar="N",
        help="seeds per learning rate; default: %(default)s",
    )
    parser.add_argument(
        "--first-seed",
        type=_seed,
        default=0,
        metavar="S",
        help="the seeds are S, S+1, ...; default: %(default)s",
    )
    parser.add_argument("--epochs", type=_positive_int, default=EPOCHS, help="default: %(default)s")
    parser.add_argument(
        "--momentum",
        type=_momentum,
        default=None,
        help=f"momentum, for optimizers that take one; default: {SGD_MOMENTUM} for SGD",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write the PNG plot; default: {DEFAULT_OUT} ({DOCS_PLOT} with --write-docs)",
    )
    parser.add_argument(
        "--device", default="cpu", help="a torch device, e.g. cpu or cuda; default: %(default)s"
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"also rewrite the demo table in README.md (between {TABLE_START} and "
        f"{TABLE_END}), {DOCS_PAGE} and {DOCS_PLOT} from this run",
    )
    parser.add_argument(
        "--docs-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="the checkout --write-docs writes into; default: the one this module is in",
    )
    return parser


def resolve_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """An optimizer class from ``torch.optim`` (case-insensitive) or ``torch_optimizer``."""
    candidates = {
        attr.lower(): obj
        for attr in dir(torch.optim)
        if isinstance(obj := getattr(torch.optim, attr), type)
        and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
    }
    if name.lower() in candidates:
        cls = candidates[name.lower()]
    else:
        try:
            torch_optimizer = importlib.import_module("torch_optimizer")
        except ImportError:
            raise DemoError(
                f"--optimizer {name!r} is not in torch.optim, and torch_optimizer is not "
                "installed to look further (pip install torch-optimizer)"
            ) from None
        try:
            cls = torch_optimizer.get(name)
        except ValueError:
            raise DemoError(
                f"--optimizer {name!r} is neither in torch.optim nor in torch_optimizer"
            ) from None
    if cls is torch.optim.LBFGS:
        raise DemoError(
            "--optimizer LBFGS is not supported by the demo: it needs a closure that "
            "re-evaluates the loss several times per step and accepts only one param group, "
            "while the demo takes one mini-batch step at a time and constrains the weights "
            "but not the biases (two groups)"
        )
    return cls


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DemoError(f"--device {name!r} cannot be used: {first}") from None
    return device


def resolve_lrs(cls: type[torch.optim.Optimizer], lrs: Sequence[float] | None) -> list[float]:
    """The learning rates to sweep: ``--lrs``, else SGD's defaults or ``cls``'s own."""
    params = inspect.signature(cls.__init__).parameters
    if "lr" not in params:
        raise DemoError(
            f"--optimizer {cls.__name__} takes no learning rate, and the demo sweeps learning rates"
        )
    if lrs is not None:
        return sorted(set(lrs))
    if cls is torch.optim.SGD:
        return list(SGD_LRS)
    default = params["lr"].default
    if isinstance(default, Tensor):
        default = default.item()
    if not isinstance(default, (int, float)) or isinstance(default, bool) or default <= 0:
        raise DemoError(f"--lrs: {cls.__name__} has no default learning rate; give --lrs")
    return [float(default)]


def optimizer_kwargs(cls: type[torch.optim.Optimizer], momentum: float | None) -> dict[str, Any]:
    """The keyword arguments the demo passes to ``cls``, besides ``lr``."""
    params = inspect.signature(cls.__init__).parameters
    if momentum is None and cls is torch.optim.SGD:
        momentum = SGD_MOMENTUM
    if momentum is None:
        return {}
    if "momentum" not in params:
        raise DemoError(f"--momentum: {cls.__name__} takes no momentum")
    return {"momentum": momentum}


# -- data and model -----------------------------------------------------------------------


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(device: torch.device) -> Data:
    """Digits (8x8 images, 10 classes), split 70/30, standardised with train statistics."""
    datasets = _require("sklearn.datasets")
    model_selection = _require("sklearn.model_selection")
    x, y = datasets.load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=TEST_SHARE, random_state=SPLIT_SEED, stratify=y
    )
    x_train = torch.tensor(x_tr, dtype=torch.float32) / 16.0
    x_test = torch.tensor(x_te, dtype=torch.float32) / 16.0
    mean = x_train.mean(0)
    std = x_train.std(0).clamp(min=0.1)  # some border pixels are (almost) always 0
    return Data(
        ((x_train - mean) / std).to(device),
        torch.tensor(y_tr).to(device),
        ((x_test - mean) / std).to(device),
        torch.tensor(y_te).to(device),
    )


def build_model(n_in: int, n_out: int) -> nn.Sequential:
    """An MLP with dropout on the input and on both hidden layers."""
    return nn.Sequential(
        nn.Dropout(DROPOUT_IN),
        nn.Linear(n_in, HIDDEN),
        nn.ReLU(),
        nn.Dropout(DROPOUT_HIDDEN),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Dropout(DROPOUT_HIDDEN),
        nn.Linear(HIDDEN, n_out),
    )


def max_unit_norm(model: nn.Module) -> Tensor:
    """The largest incoming weight norm of any unit of any ``Linear`` layer (0-d)."""
    return torch.stack(
        [m.weight.detach().norm(dim=1).max() for m in model.modules() if isinstance(m, nn.Linear)]
    ).max()


def make_optimizer(
    model: nn.Module,
    opt_cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    max_norm: float | None,
) -> torch.optim.Optimizer:
    """The bare optimizer, or the max-norm-wrapped one (with ``track_stats``)."""
    if max_norm is None:
        return opt_cls(model.parameters(), **kwargs)
    # Weights of the Linear layers: one bound per unit; biases unconstrained.
    groups = max_norm_param_groups(model, max_norm)
    return MaxNormWrapper(opt_cls(groups, **kwargs), track_stats=True)


def check_optimizer(
    data: Data,
    opt_cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    lr: float,
    max_norm: float,
) -> None:
    """One step of both set-ups on a throwaway model, so that an optimizer that cannot
    train this model is reported before the runs start."""
    for bound in (None, max_norm):
        model = build_model(data.x_train.shape[1], 10).to(data.x_train.device)
        try:
            optimizer = make_optimizer(model, opt_cls, {**kwargs, "lr": lr}, bound)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[:8]), data.y_train[:8])
            loss.backward()
            optimizer.step()
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as err:
            text = str(err).strip()
            reason = text.splitlines()[0] if text else type(err).__name__
            setup = "bare" if bound is None else "wrapped in MaxNormWrapper"
            raise DemoError(
                f"--optimizer {opt_cls.__name__} cannot train the demo's MLP ({setup}): {reason}"
            ) from None


# -- training -----------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: one learning rate, one seed, bare or max-norm."""

    lr: float
    seed: int
    max_norm: float | None
    test_error: float | None = None  # None when the run diverged
    diverged_epoch: int | None = None  # first epoch (1-based) with a non-finite loss/weight
    projected: int = 0  # slices the projection scaled, all steps (max-norm runs)
    slices: int = 0  # slices it looked at, all steps
    epochs_run: int = 0
    seconds: float = 0.0
    # Per step, for the run whose norms are plotted: the largest unit norm after the step
    # and (max-norm) the largest before the projection, from constraint_stats().
    norm_after: list[float] = field(default_factory=list)
    norm_before: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Classification error of ``model`` on ``(x, y)``."""
    model.eval()
    return (model(x).argmax(1) != y).float().mean().item()


def train(
    data: Data,
    opt_cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    lr: float,
    seed: int,
    epochs: int,
    max_norm: float | None,
    trace: bool = False,
) -> Run:
    """Train a fresh model from ``seed``; max-norm-wrapped when ``max_norm`` is set.

    The run stops at the first non-finite loss or weight (it has diverged). With
    ``trace`` the largest unit norm is recorded after every step.
    """
    device = data.x_train.device
    run = Run(lr, seed, max_norm)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(data.x_train.shape[1], 10).to(device)
    optimizer = make_optimizer(model, opt_cls, {**kwargs, "lr": lr}, max_norm)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=LR_DECAY)
    batches = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    projected = torch.zeros((), dtype=torch.int64, device=device)
    slices = torch.zeros((), dtype=torch.int64, device=device)
    after: list[Tensor] = []
    before: list[Tensor] = []

    for epoch in range(1, epochs + 1):
        run.epochs_run = epoch
        model.train()
        order = torch.randperm(n, generator=batches).to(device)
        for first in range(0, n, BATCH_SIZE):
            idx = order[first : first + BATCH_SIZE]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if not math.isfinite(loss.item()):
                run.diverged_epoch = epoch
                break
            loss.backward()
            optimizer.step()
            if isinstance(optimizer, MaxNormWrapper):
                stats = [s for s in optimizer.constraint_stats() if s is not None]
                for s in stats:
                    projected += s["projected"]
                    slices += s["slices"]
                if trace:
                    before.append(torch.stack([s["max_norm_before"] for s in stats]).max())
            if trace:
                after.append(max_unit_norm(model))
        if run.diverged_epoch is None and not all(
            bool(torch.isfinite(p).all()) for p in model.parameters()
        ):
            run.diverged_epoch = epoch
        if run.diverged_epoch is not None:
            break
        scheduler.step()
    if run.diverged_epoch is None:
        run.test_error = evaluate(model, data.x_test, data.y_test)
    run.projected, run.slices = int(projected.item()), int(slices.item())
    run.norm_after = [float(v) for v in after]
    run.norm_before = [float(v) for v in before]
    run.seconds = time.perf_counter() - start
    return run


# -- summary ------------------------------------------------------------------------------


@dataclass
class Cell:
    """The runs of one set-up (bare or max-norm) at one learning rate, over the seeds."""

    runs: list[Run]

    @property
    def errors(self) -> list[float]:
        return sorted(r.test_error for r in self.runs if r.test_error is not None)

    @property
    def diverged(self) -> int:
        return sum(r.diverged_epoch is not None for r in self.runs)

    @property
    def projected(self) -> int:
        return sum(r.projected for r in self.runs)

    @property
    def share_projected(self) -> float:
        return self.projected / max(sum(r.slices for r in self.runs), 1)

    def error_text(self) -> str:
        errors = self.errors
        if not errors:
            return "–"
        median = f"{100 * statistics.median(errors):.2f}%"
        if len(errors) == 1:
            return median
        return f"{median} ({100 * errors[0]:.2f}–{100 * errors[-1]:.2f}%)"

    def diverged_text(self) -> str:
        text = f"{self.diverged}/{len(self.runs)}"
        epochs = sorted({r.diverged_epoch for r in self.runs if r.diverged_epoch is not None})
        if epochs:
            word = "epoch" if len(epochs) == 1 else "epochs"
            span = f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]}"
            text += f" (in {word} {span})"
        return text

    def projected_text(self) -> str:
        if self.projected == 0:
            return "0 (bound never reached)"
        return f"{100 * self.share_projected:.2g}%"


@dataclass
class Sweep:
    """Every run of the demo, and what it was run with."""

    name: str  # the optimizer's class name
    max_norm: float
    lrs: list[float]
    seeds: list[int]
    epochs: int
    kwargs: dict[str, Any]
    device: torch.device
    bare: dict[float, Cell]
    wrapped: dict[float, Cell]
    trace: tuple[Run, Run]  # (bare, max-norm) at the highest rate, first seed
    seconds: float

    @property
    def bare_label(self) -> str:
        return self.name

    @property
    def wrapped_label(self) -> str:
        return f"{self.name} + max-norm (c={self.max_norm:g})"

    def is_default(self) -> bool:
        """Whether this sweep was run with the default options (on the CPU)."""
        return (
            self.name == "SGD"
            and self.kwargs == {"momentum": SGD_MOMENTUM}
            and self.lrs == list(SGD_LRS)
            and self.seeds == list(range(SEEDS))
            and self.epochs == EPOCHS
            and self.max_norm == MAX_NORM
            and self.device.type == "cpu"
        )

    def never_reached(self) -> list[float]:
        """The learning rates at which no unit ever reached the bound (nothing projected)."""
        return [lr for lr in self.lrs if self.wrapped[lr].projected == 0]


def run_sweep(
    data: Data,
    opt_cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    lrs: list[float],
    seeds: list[int],
    epochs: int,
    max_norm: float,
) -> Sweep:
    tqdm = _require("tqdm").tqdm
    bare: dict[float, Cell] = {lr: Cell([]) for lr in lrs}
    wrapped: dict[float, Cell] = {lr: Cell([]) for lr in lrs}
    traced = (max(lrs), seeds[0])
    trace: list[Run] = []
    start = time.perf_counter()
    with tqdm(total=2 * len(lrs) * len(seeds), desc="runs", unit="run", file=sys.stderr) as bar:
        for lr in lrs:
            for seed in seeds:
                for bound, cells in ((None, bare), (max_norm, wrapped)):
                    bar.set_postfix_str(f"lr={lr:g} seed={seed}{'' if bound is None else ' +mn'}")
                    traces = (lr, seed) == traced
                    run = train(data, opt_cls, kwargs, lr, seed, epochs, bound, trace=traces)
                    cells[lr].runs.append(run)
                    if traces:
                        trace.append(run)
                    bar.update()
    return Sweep(
        name=opt_cls.__name__,
        max_norm=max_norm,
        lrs=lrs,
        seeds=seeds,
        epochs=epochs,
        kwargs=kwargs,
        device=data.x_train.device,
        bare=bare,
        wrapped=wrapped,
        trace=(trace[0], trace[1]),
        seconds=time.perf_counter() - start,
    )


# -- report -------------------------------------------------------------------------------


def _lr_list(lrs: Sequence[float]) -> str:
    texts = [f"{lr:g}" for lr in lrs]
    if len(texts) <= 2:
        return " and ".join(texts)
    return ", ".join(texts[:-1]) + " and " + texts[-1]


def table(sweep: Sweep) -> str:
    """A Markdown table: per learning rate, the test error and divergences of both set-ups."""
    bare, wrapped = sweep.bare_label, sweep.wrapped_label
    lines = [
        f"| learning rate | {bare}: test error, median (min–max) | {bare}: diverged "
        f"| {wrapped}: test error, median (min–max) | {wrapped}: diverged "
        "| units projected per step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for lr in sweep.lrs:
        b, w = sweep.bare[lr], sweep.wrapped[lr]
        lines.append(
            f"| {lr:g} | {b.error_text()} | {b.diverged_text()} | {w.error_text()} "
            f"| {w.diverged_text()} | {w.projected_text()} |"
        )
    return "\n".join(lines)


def conclusions(sweep: Sweep) -> list[str]:
    """What the table shows, in sentences (computed from the runs)."""
    n = len(sweep.seeds)
    bare, wrapped = sweep.bare_label, sweep.wrapped_label
    seeds = {1: f"seed {sweep.seeds[0]}", 2: "both seeds"}.get(n, f"all {n} seeds")
    out = []
    rescued = [
        lr for lr in sweep.lrs if sweep.bare[lr].diverged == n and sweep.wrapped[lr].diverged == 0
    ]
    both = [
        lr for lr in sweep.lrs if sweep.bare[lr].diverged == 0 and sweep.wrapped[lr].diverged == 0
    ]
    mixed = [lr for lr in sweep.lrs if lr not in rescued and lr not in both]
    if rescued:
        out.append(
            f"At learning {'rate' if len(rescued) == 1 else 'rates'} {_lr_list(rescued)}, "
            f"{bare} diverged (non-finite loss or "
            f"weights) with {seeds}, and {wrapped} with none."
        )
    if both:
        out.append(f"At {_lr_list(both)} both set-ups trained with {seeds}.")
    for lr in mixed:
        out.append(
            f"At {lr:g} the seeds that diverged were {sweep.bare[lr].diverged_text()} for "
            f"{bare} and {sweep.wrapped[lr].diverged_text()} for {wrapped}."
        )
    best = []
    for label, cells in ((bare, sweep.bare), (wrapped, sweep.wrapped)):
        medians = {lr: statistics.median(c.errors) for lr, c in cells.items() if c.errors}
        if medians:
            lr = min(medians, key=medians.__getitem__)
            best.append(f"{label} {100 * medians[lr]:.2f}% (at {lr:g})")
    if best:
        out.append("Lowest median test error: " + "; ".join(best) + ".")
    return out


def bound_notes(sweep: Sweep) -> list[str]:
    """Says where the bound was never reached, i.e. max-norm changed nothing."""
    never = sweep.never_reached()
    c = f"{sweep.max_norm:g}"
    if not never:
        return []
    if len(never) == len(sweep.lrs):
        return [
            f"The bound c={c} was never reached (no unit was projected, at any learning rate): "
            f"the max-norm runs are the bare runs. Try a smaller --max-norm or larger --lrs."
        ]
    return [
        f"At {_lr_list(never)} the bound c={c} was never reached (no unit was projected): "
        "there the max-norm runs are the bare runs."
    ]


def settings_line(
    name: str,
    kwargs: dict[str, Any],
    lrs: list[float],
    seeds: list[int],
    epochs: int,
    device: torch.device,
    data: Data,
) -> str:
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}"
    rates = "rate" if len(lrs) == 1 else "rates"
    extra = "".join(f", {k}={v:g}" for k, v in kwargs.items())
    return (
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test images; "
        f"MLP 64-{HIDDEN}-{HIDDEN}-10, dropout {DROPOUT_IN} (input) / {DROPOUT_HIDDEN} "
        f"(hidden); {name}{extra}, learning {rates} {_lr_list(lrs)} (decayed by {LR_DECAY} "
        f"per epoch); {epochs} epoch{'s' if epochs != 1 else ''}, batch {BATCH_SIZE}, "
        f"{seed_text}, device {device}"
    )


def timing_line(sweep: Sweep) -> str:
    runs = [r for cells in (sweep.bare, sweep.wrapped) for c in cells.values() for r in c.runs]
    epochs = sum(r.epochs_run for r in runs)
    return (
        f"{len(runs)} runs ({epochs} epochs in all; a diverged run stops) in "
        f"{sweep.seconds:.1f} s, {THREADS} CPU thread"
    )


def plot(sweep: Sweep, out: Path) -> list[str]:
    """Test error against learning rate, and the norms of one run; returns the notes drawn
    on the figure (where the bound was never reached)."""
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    ticker = importlib.import_module("matplotlib.ticker")
    transforms = importlib.import_module("matplotlib.transforms")
    notes: list[str] = []
    n = len(sweep.seeds)
    c = sweep.max_norm
    setups = (
        (sweep.bare_label, sweep.bare, "tab:red", "o"),
        (sweep.wrapped_label, sweep.wrapped, "tab:blue", "s"),
    )
    fig, (ax_err, ax_norm) = plt.subplots(1, 2, figsize=(13, 4.8))

    # Left: test error against learning rate; median line, min-max band, divergences.
    # x in data coordinates, y as a share of the axes' height
    mixed = transforms.blended_transform_factory(ax_err.transData, ax_err.transAxes)
    for i, (label, cells, color, marker) in enumerate(setups):
        med, lo, hi = [], [], []
        for lr in sweep.lrs:
            errors = cells[lr].errors
            med.append(100 * statistics.median(errors) if errors else math.nan)
            lo.append(100 * errors[0] if errors else math.nan)
            hi.append(100 * errors[-1] if errors else math.nan)
        ax_err.plot(
            sweep.lrs,
            med,
            marker=marker,
            color=color,
            linewidth=2.5 - i,
            markersize=8 - 3 * i,
            label=f"{label}: median over {n} seed{'s' if n != 1 else ''}",
        )
        ax_err.fill_between(sweep.lrs, lo, hi, color=color, alpha=0.2, linewidth=0)
        # The same range as bars, which also show where the band has a single point.
        ax_err.errorbar(
            sweep.lrs,
            med,
            yerr=[[m - v for m, v in zip(med, lo)], [v - m for m, v in zip(med, hi)]],
            fmt="none",
            ecolor=color,
            elinewidth=1,
            capsize=4 - i,
            alpha=0.7,
        )
        for lr in sweep.lrs:
            k = cells[lr].diverged
            if k:
                ax_err.plot(
                    [lr],
                    [0.93 - 0.1 * i],
                    marker="x",
                    ms=10,
                    mew=2.5,
                    color=color,
                    transform=mixed,
                    clip_on=False,
                )
                ax_err.annotate(
                    f"{k}/{n} diverged",
                    (lr, 0.93 - 0.1 * i),
                    xycoords=mixed,
                    xytext=(-8, 0),
                    textcoords="offset points",
                    ha="right",
                    va="center",
                    color=color,
                    fontsize="small",
                )
    never = sweep.never_reached()
    for lr in never:
        ax_err.annotate(
            "bound never\nreached",
            (lr, 0.03),
            xycoords=mixed,
            ha="center",
            va="bottom",
            fontsize="x-small",
            color="0.3",
        )
    notes.extend(bound_notes(sweep))
    ax_err.fill_between([], [], [], color="0.5", alpha=0.2, label="min–max over seeds")
    ax_err.set_xscale("log")
    ax_err.set_yscale("log")
    ax_err.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_err.yaxis.set_major_formatter(
        ticker.FuncFormatter(lambda v, _: f"{v:g}" if v <= 100 else "")  # an error is <= 100%
    )
    ax_err.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    ax_err.yaxis.set_minor_formatter(ticker.NullFormatter())
    span = math.log10(sweep.lrs[-1] / sweep.lrs[0])
    pad = 10 ** (0.08 * span) if span else 3.0
    ax_err.set_xlim(sweep.lrs[0] / pad, sweep.lrs[-1] * pad)
    ax_err.set_xticks(sweep.lrs)
    ax_err.set_xticks([], minor=True)
    shown = [100 * e for cells in (sweep.bare, sweep.wrapped) for c in cells.values()
             for e in c.errors]  # fmt: skip
    bottom, top = (min(shown) / 1.3, min(max(shown) * 1.3, 100.0)) if shown else (1.0, 100.0)
    widen = math.sqrt(max(4 * bottom / top, 1.0))  # at least a factor 4 from bottom to top
    ax_err.set_ylim(bottom / widen, top * widen * 3)  # and room for the divergence marks
    ax_err.set_xlabel("initial learning rate (log scale)")
    ax_err.set_ylabel("final test error (%, log scale)")
    ax_err.set_title("Test error against learning rate (× = seeds that diverged)")
    ax_err.grid(True, which="both", alpha=0.3)
    # Below the axes: inside, it would hide points or divergence marks.
    ax_err.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)

    # Right: the largest unit norm per step of one seed at the highest rate.
    bare_run, wrapped_run = sweep.trace

    def steps(values: list[float]) -> range:
        return range(1, len(values) + 1)

    finite = [v for v in bare_run.norm_after if math.isfinite(v)]
    ax_norm.plot(steps(finite), finite, color="tab:red", label=f"{sweep.bare_label}")
    if bare_run.diverged_epoch is not None and finite:
        ax_norm.plot([len(finite)], [finite[-1]], marker="x", ms=10, mew=2.5, color="tab:red")
        ax_norm.annotate(
            f"non-finite after step {len(finite)}",
            (len(finite), finite[-1]),
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
            color="tab:red",
            fontsize="small",
        )
    ax_norm.plot(
        steps(wrapped_run.norm_before),
        wrapped_run.norm_before,
        color="tab:blue",
        alpha=0.45,
        linewidth=0.8,
        label=f"{sweep.wrapped_label}: before projection",
    )
    ax_norm.plot(
        steps(wrapped_run.norm_after),
        wrapped_run.norm_after,
        color="tab:blue",
        label=f"{sweep.wrapped_label}: after",
    )
    ax_norm.axhline(c, color="black", linestyle="--", linewidth=1, label=f"bound c = {c:g}")
    if wrapped_run.projected == 0:
        note = f"bound c = {c:g} never reached in this run: nothing was projected"
        ax_norm.text(
            0.5,
            0.5,
            note,
            transform=ax_norm.transAxes,
            ha="center",
            fontsize="medium",
            color="0.25",
            bbox={"facecolor": "white", "edgecolor": "0.6"},
        )
        notes.append(note)
    ax_norm.set_xscale("log")
    ax_norm.set_yscale("log")
    ax_norm.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_norm.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    bottom, top = ax_norm.get_ylim()
    # A narrow range has few decades to label: label the minor ticks too.
    minor = ticker.FormatStrFormatter("%g") if top / bottom < 20 else ticker.NullFormatter()
    ax_norm.yaxis.set_minor_formatter(minor)
    ax_norm.set_xlabel("optimizer step (log scale)")
    ax_norm.set_ylabel("largest incoming weight norm of any unit")
    ax_norm.set_title(f"Unit norms during training, lr {bare_run.lr:g}, seed {bare_run.seed}")
    ax_norm.grid(True, which="both", alpha=0.3)
    ax_norm.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)

    epochs = f"{sweep.epochs} epoch{'s' if sweep.epochs != 1 else ''}"
    title = f"{sweep.name} on scikit-learn digits, {epochs}: bare vs. max-norm (c = {c:g})"
    if len(never) == len(sweep.lrs):
        title += ": the bound was never reached, max-norm changed nothing"
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return notes


# -- docs ---------------------------------------------------------------------------------


def replace_between_markers(
    text: str, block: str, start: str = TABLE_START, end: str = TABLE_END
) -> str:
    """``text`` with what lies between the ``start`` and ``end`` lines replaced by ``block``."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise DemoError(f"--write-docs: README.md needs one {start} line before one {end} line")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block.strip()}\n{end}{tail}"


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or f"{platform.machine()} CPU"
    return f"{os.cpu_count()}-core {model}"


def readme_block(sweep: Sweep, command: str) -> str:
    return "\n".join(
        [
            f"A real run of `{command}` ({_machine()}, torch {torch.__version__}; the runs "
            f"took {sweep.seconds:.0f} s); `docs/demo-output.md` has its full output and what "
            "in it depends on the machine:",
            "",
            table(sweep),
            "",
            " ".join(conclusions(sweep) + bound_notes(sweep)),
        ]
    )


def docs_page(sweep: Sweep, command: str, printed: str) -> str:
    n = len(sweep.seeds)
    lrs = _lr_list(sweep.lrs)
    alt = (
        "Left: final test error against the initial learning rate, median and min-max over "
        f"the seeds, bare {sweep.name} vs. {sweep.name} with max-norm. Right: the largest "
        "unit norm per step of one seed at the highest rate."
    )
    not_default = (
        ""
        if sweep.is_default()
        else "\nThese are not the default options: what is said below about the default "
        "rates was checked with the defaults, not with this run.\n"
    )
    return f"""# Demo output

<!-- Generated by `python -m maxnorm_optim.demo --write-docs`: edit the template in
maxnorm_optim/demo.py, not this page. -->

`{command}` on a {_machine()} (torch {torch.__version__}, Python
{platform.python_version()}) printed:

```text
{printed.strip()}
```
{not_default}
![{alt}](img/demo.png)

## What it does

For every learning rate ({lrs}) and every seed ({n} seeds), the demo trains the same
MLP (64–{HIDDEN}–{HIDDEN}–10, ReLU, dropout {DROPOUT_IN} on the input and {DROPOUT_HIDDEN}
on the hidden layers) on scikit-learn's bundled handwritten digits (1,797 8×8 images,
split 70/30, stratified, the same split for every seed; inputs standardised with the
training statistics) for {sweep.epochs} epochs with mini-batches of {BATCH_SIZE}, the
learning rate decayed by {LR_DECAY} per epoch, twice: with the bare optimizer, and with
the incoming weight vector of every unit of the three `Linear` layers kept inside
`‖w‖ ≤ {sweep.max_norm:g}` (`MaxNormWrapper` over `max_norm_param_groups`; biases are
not constrained). The seed fixes the initial weights, the batch order and the dropout
masks, so the two runs of a seed differ only in the projection.

The columns:

* **test error, median (min–max)**: classification error on the 540 test images after
  the last epoch, over the seeds whose run did not diverge (`–`: none left);
* **diverged**: the seeds whose loss or weights became non-finite, and in which epoch
  (a run stops there);
* **units projected per step**: from `constraint_stats()` (`track_stats=True`), the
  slices the projection scaled over the slices it looked at, summed over all steps and
  seeds; `0 (bound never reached)` means max-norm changed nothing at that rate.

The plot's right panel follows the first seed at the highest rate step by step: the
largest incoming weight norm of any unit, and for the max-norm run also the largest norm
the optimizer step produced before the projection (`max_norm_before`).

## What depends on the machine, and what does not

* **Timings** depend on the CPU and on what else runs on it at the same time. The demo
  trains on
  {THREADS} thread (the matrices are small), which also keeps the results independent
  of the core count.
* **The exact error values** (medians, ranges, the share projected) are reproducible on
  one machine with one torch build, but not across CPUs, builds or torch versions:
  training is chaotic, so a difference in the last bit of one matrix product (another
  vector instruction set, another BLAS kernel) gives another trajectory, and the test
  error of a seed can move by a few tenths of a percent.
* **The conclusion does not**: the default rates lie away from the edge of stability, so
  that it survives such changes. With the default options, at 1.0 bare SGD's loss
  overflowed within the first epoch in each of 30 runs checked (seeds 0–19, and seeds 0–9
  again with the initial weights scaled by 1 + 10⁻⁶, which changes every rounding), and
  no max-norm run diverged (test error 2.8–7.2%); at 0.003, 0.01 and 0.03
  all 30 runs of both set-ups trained. The epoch in which a run diverges and the exact
  errors may differ on another machine; the divergence counts at the default rates
  should not.

Between 0.03 and 1.0 lies the bare net's edge of stability, left out of the default sweep
on purpose (try `--lrs 0.1 0.3`). In the same checks, at 0.1 no bare run overflowed but
their test errors spread from 8% to 90% over 20 seeds; at 0.3 most bare runs went
non-finite and the others ended at chance level (about 90%). Which seed does what there
depends on rounding, so those rows would not be the same on two machines. The max-norm
runs trained normally at both rates (1.3–3.2%).

## Reading it honestly

Max-norm does not make this small network better at a learning rate that already works:
at the low rates the bound mostly clips units that would have grown a little beyond it,
and the errors of both set-ups are close (max-norm's slightly higher when `c` is below
the norms the bare net reaches). What it buys is stability: with the default options the
bare net's usable learning rates end between 0.03 and 0.3 and it blows up above them,
while the max-norm net keeps training, with a bounded weight norm, at 1 — the finding of
the dropout paper, which paired max-norm with large learning rates. That is not without
limit either: in the same checks (5 seeds each) the max-norm runs ended at 10–20% test
error at 2 and at 64–90% at 3, though none diverged. Where
no unit reaches the bound (a large `c`, a small rate, or an optimizer whose default rate
is small), nothing is projected and the max-norm run is the bare run; the demo says so.
"""


def demo_command(argv: Sequence[str]) -> str:
    """The demo's command line for ``argv``, without the options that only write docs."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--docs-root":
            skip = True
        elif arg != "--write-docs" and not arg.startswith("--docs-root="):
            kept.append(arg)
    return shlex.join(["python", "-m", "maxnorm_optim.demo", *kept])


def docs_root(given: Path | None) -> Path:
    root = given if given is not None else Path(__file__).resolve().parent.parent
    if not (root / "README.md").is_file() or not (root / "docs").is_dir():
        raise DemoError(
            f"--write-docs needs a checkout of the repository (README.md and docs/ in {root}); "
            "give --docs-root"
        )
    # The markers are checked now, not after the runs.
    replace_between_markers((root / "README.md").read_text(encoding="utf-8"), "")
    return root


def write_docs(root: Path, sweep: Sweep, command: str, printed: str) -> list[Path]:
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    readme.write_text(replace_between_markers(text, readme_block(sweep, command)), encoding="utf-8")
    page = root / DOCS_PAGE
    page.write_text(docs_page(sweep, command, printed), encoding="utf-8")
    return [readme, page]


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (errors exit through ``SystemExit``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    printed: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        printed.append(line)

    try:
        # Everything that can be wrong with the options is checked before training.
        for module in ("sklearn", "matplotlib", "tqdm"):
            _require(module)
        opt_cls = resolve_optimizer(args.optimizer)
        lrs = resolve_lrs(opt_cls, args.lrs)
        kwargs = optimizer_kwargs(opt_cls, args.momentum)
        if args.first_seed + args.seeds > 2**63:
            raise DemoError("--first-seed plus --seeds must stay below 2**63")
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        device = resolve_device(args.device)
        root = None
        if args.write_docs:
            if args.out is not None:
                raise DemoError(f"--out: with --write-docs the plot goes to {DOCS_PLOT}")
            root = docs_root(args.docs_root)
            out = root / DOCS_PLOT
        elif args.docs_root is not None:
            raise DemoError("--docs-root is only used with --write-docs")
        else:
            out = args.out if args.out is not None else DEFAULT_OUT
        if out.is_dir():
            raise DemoError(f"--out {str(out)!r} is a directory")
        data = load_data(device)
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            check_optimizer(data, opt_cls, kwargs, lrs[0], args.max_norm)
            if args.lrs is None and opt_cls is not torch.optim.SGD:
                say(
                    f"(no --lrs: {opt_cls.__name__}'s own default learning rate only; the "
                    "default sweep is for SGD)"
                )
            say(settings_line(opt_cls.__name__, kwargs, lrs, seeds, args.epochs, device, data))
            sweep = run_sweep(data, opt_cls, kwargs, lrs, seeds, args.epochs, args.max_norm)
        finally:
            torch.set_num_threads(threads)
    except DemoError as err:
        parser.error(str(err))
    say()
    say(table(sweep))
    say()
    for line in conclusions(sweep) + bound_notes(sweep):
        say(line)
    say(timing_line(sweep))
    plot(sweep, out)
    shown = out
    if root is not None:
        shown = out.relative_to(root)
    say(f"plot written to {shown}")
    if root is not None:
        command = demo_command(sys.argv[1:] if argv is None else argv)
        for path in write_docs(root, sweep, command, "\n".join(printed)):
            print(f"wrote {path.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

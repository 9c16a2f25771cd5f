"""Train a dropout MLP on scikit-learn's digits twice: bare optimizer vs. max-norm.

Run ``python -m maxnorm_optim.demo --help`` (or ``maxnorm-optim-demo --help``). The
demo needs the ``demo`` extra: ``pip install 'maxnorm-optim[demo]'``.

Both runs use the same seed: the same initial weights, the same mini-batch order and
the same dropout masks; the projection draws no random numbers. In the spirit of
Srivastava et al. (2014, "Dropout: a simple way to prevent neural networks from
overfitting"), the default learning rate is high; the max-norm run bounds the norm of
every unit's incoming weight vector by ``--max-norm``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from . import MaxNormWrapper, max_norm_param_groups

__all__ = ["main"]

PROG = "maxnorm-optim-demo"
DEMO_EXTRA = "pip install 'maxnorm-optim[demo]'"

# Defaults. The learning rate is only the default for SGD; other optimizers get their
# own default learning rate unless --lr is given.
SGD_LR = 0.1
SGD_MOMENTUM = 0.9
LR_DECAY = 0.9  # per epoch (ExponentialLR)
MAX_NORM = 2.0
EPOCHS = 20
BATCH_SIZE = 32
HIDDEN = 512
DROPOUT_IN = 0.2
DROPOUT_HIDDEN = 0.5
TEST_SHARE = 0.3
SPLIT_SEED = 0  # the train/test split is the same for every --seed


class DemoError(Exception):
    """A problem with the options, reported as one line without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, no usage block.
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _require(name: str) -> ModuleType:
    """Import a module of the ``demo`` extra, or fail with the install command."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DemoError(
            f"the demo needs scikit-learn, matplotlib and tqdm ({name} is missing): {DEMO_EXTRA}"
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
            "Train a dropout MLP on scikit-learn's handwritten digits twice with the same "
            "seed, once with the bare optimizer and once wrapped in MaxNormWrapper, and "
            "compare them."
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
    parser.add_argument("--epochs", type=_positive_int, default=EPOCHS, help="default: %(default)s")
    parser.add_argument("--seed", type=_seed, default=0, help="default: %(default)s")
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"initial learning rate (decayed by {LR_DECAY} per epoch); default: "
        f"{SGD_LR} for SGD, the optimizer's own default otherwise",
    )
    parser.add_argument(
        "--momentum",
        type=_momentum,
        default=None,
        help=f"momentum, for optimizers that take one; default: {SGD_MOMENTUM} for SGD",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("maxnorm-demo.png"),
        help="where to write the PNG plot; default: %(default)s",
    )
    parser.add_argument(
        "--device", default="cpu", help="a torch device, e.g. cpu or cuda; default: %(default)s"
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
        return candidates[name.lower()]
    try:
        torch_optimizer = importlib.import_module("torch_optimizer")
    except ImportError:
        raise DemoError(
            f"--optimizer {name!r} is not in torch.optim, and torch_optimizer is not "
            "installed to look further (pip install 'maxnorm-optim[torch-optimizer]')"
        ) from None
    try:
        return torch_optimizer.get(name)
    except ValueError:
        raise DemoError(
            f"--optimizer {name!r} is neither in torch.optim nor in torch_optimizer"
        ) from None


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DemoError(f"--device {name!r} cannot be used: {first}") from None
    return device


def optimizer_kwargs(
    cls: type[torch.optim.Optimizer], lr: float | None, momentum: float | None
) -> dict[str, Any]:
    """The keyword arguments the demo passes to ``cls``."""
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    is_sgd = cls is torch.optim.SGD
    if lr is None and is_sgd:
        lr = SGD_LR
    if lr is not None:
        if "lr" not in params:
            raise DemoError(f"--lr: {cls.__name__} takes no learning rate")
        kwargs["lr"] = lr
    if momentum is None and is_sgd:
        momentum = SGD_MOMENTUM
    if momentum is not None:
        if "momentum" not in params:
            raise DemoError(f"--momentum: {cls.__name__} takes no momentum")
        kwargs["momentum"] = momentum
    return kwargs


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


def unit_norms(model: nn.Module) -> Tensor:
    """The incoming weight norm of every unit of every ``Linear`` layer (on the CPU)."""
    return torch.cat(
        [m.weight.detach().norm(dim=1).cpu() for m in model.modules() if isinstance(m, nn.Linear)]
    )


# -- training -----------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    test_error: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    max_unit_norm: list[float] = field(default_factory=list)  # per epoch, nan if non-finite
    norms: Tensor | None = None  # per-unit norms at the end
    snapshot: Tensor | None = None  # per-unit norms at the last epoch with finite weights
    snapshot_epoch: int = 0
    clipped_share: float | None = None  # slices projected / slices looked at, all steps
    diverged_epoch: int | None = None  # first epoch (1-based) ending with non-finite weights


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
    data: Data, opt_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], max_norm: float
) -> None:
    """One step of both set-ups on a throwaway model, so that an optimizer that cannot
    train this model is reported before the runs start."""
    for bound in (None, max_norm):
        model = build_model(data.x_train.shape[1], 10).to(data.x_train.device)
        try:
            optimizer = make_optimizer(model, opt_cls, kwargs, bound)

            def closure(model: nn.Module = model, optimizer: Any = optimizer) -> Tensor:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(data.x_train[:8]), data.y_train[:8])
                loss.backward()
                return loss

            optimizer.step(closure)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DemoError(f"--optimizer {opt_cls.__name__} with {kwargs}: {err}") from None


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Classification error of ``model`` on ``(x, y)``."""
    model.eval()
    return (model(x).argmax(1) != y).float().mean().item()


def train(
    data: Data,
    args: argparse.Namespace,
    opt_cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    max_norm: float | None,
) -> Result:
    """Train a fresh model from ``args.seed``; max-norm-wrapped when ``max_norm`` is set."""
    tqdm = _require("tqdm").tqdm
    name = opt_cls.__name__
    label = name if max_norm is None else f"{name} + max-norm (c={max_norm:g})"
    torch.manual_seed(args.seed)
    model = build_model(data.x_train.shape[1], 10).to(data.x_train.device)
    optimizer = make_optimizer(model, opt_cls, kwargs, max_norm)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=LR_DECAY)
    batches = torch.Generator().manual_seed(args.seed)
    n = data.x_train.shape[0]
    result = Result(label)
    projected = torch.zeros((), dtype=torch.int64, device=data.x_train.device)
    slices = torch.zeros((), dtype=torch.int64, device=data.x_train.device)

    bar = tqdm(range(1, args.epochs + 1), desc=f"{label:<32}", unit="epoch", file=sys.stderr)
    for epoch in bar:
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n, generator=batches).to(data.x_train.device)
        for first in range(0, n, BATCH_SIZE):
            idx = order[first : first + BATCH_SIZE]
            xb, yb = data.x_train[idx], data.y_train[idx]

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            optimizer.step(closure)
            if isinstance(optimizer, MaxNormWrapper):
                stats = optimizer.constraint_stats()
                for s in stats:
                    if s is not None:
                        projected += s["projected"]
                        slices += s["slices"]
        scheduler.step()
        if data.x_train.device.type == "cuda":
            torch.cuda.synchronize(data.x_train.device)
        result.epoch_seconds.append(time.perf_counter() - start)
        result.test_error.append(evaluate(model, data.x_test, data.y_test))
        norms = unit_norms(model)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if finite:
            result.snapshot, result.snapshot_epoch = norms, epoch
        elif result.diverged_epoch is None:
            result.diverged_epoch = epoch
        result.max_unit_norm.append(norms.max().item() if finite else math.nan)
        bar.set_postfix(test_error=f"{result.test_error[-1]:.2%}")
    bar.close()
    result.norms = unit_norms(model)
    if max_norm is not None:
        result.clipped_share = projected.item() / max(slices.item(), 1)
    return result


# -- report -------------------------------------------------------------------------------


def _fmt_norm(norms: Tensor) -> str:
    finite = norms[torch.isfinite(norms)]
    if finite.numel() < norms.numel():
        return "non-finite"
    return f"{finite.max().item():.3f}"


def table(results: list[Result]) -> str:
    """A Markdown table comparing the runs."""
    header = (
        "| run | final test error | best test error (epoch) | max unit norm "
        "| share of units clipped per step | time per epoch |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        best = min(range(len(r.test_error)), key=r.test_error.__getitem__)
        clipped = "–" if r.clipped_share is None else f"{r.clipped_share:.1%}"
        per_epoch = sum(r.epoch_seconds) / len(r.epoch_seconds)
        assert r.norms is not None
        lines.append(
            f"| {r.label} | {r.test_error[-1]:.2%} | {r.test_error[best]:.2%} ({best + 1}) "
            f"| {_fmt_norm(r.norms)} | {clipped} | {per_epoch * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def plot(results: list[Result], max_norm: float, out: Path, title: str) -> None:
    """Test error per epoch and the distribution of per-unit norms, bound drawn in."""
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    ticker = importlib.import_module("matplotlib.ticker")
    colors = ("tab:red", "tab:blue")
    fig, (ax_err, ax_max, ax_norm) = plt.subplots(1, 3, figsize=(15, 4.4))
    for r, color in zip(results, colors):
        epochs = range(1, len(r.test_error) + 1)
        ax_err.plot(epochs, [100 * e for e in r.test_error], marker=".", color=color, label=r.label)
        ax_max.plot(epochs, r.max_unit_norm, marker=".", color=color, label=r.label)
    ax_err.set_yscale("log")
    ax_err.set_ylabel("test error (%, log scale)")
    ax_err.set_title("Test error per epoch")
    ax_max.set_yscale("log")
    ax_max.axhline(max_norm, color="black", linestyle="--", label=f"bound c = {max_norm:g}")
    ax_max.set_ylabel("largest unit norm (log scale; gap: non-finite)")
    ax_max.set_title("Largest per-unit weight norm per epoch")
    for ax in (ax_err, ax_max):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")

    shown = [r.snapshot for r in results if r.snapshot is not None]
    values = torch.cat(shown) if shown else torch.empty(0)
    values = values[values > 0]
    lo = min(values.min().item(), max_norm) if values.numel() else max_norm / 10
    hi = max(values.max().item(), max_norm) if values.numel() else max_norm * 10
    bins = torch.logspace(math.log10(lo * 0.9), math.log10(hi * 1.1), 60).tolist()
    for r, color in zip(results, colors):
        if r.snapshot is None:
            continue
        label = r.label
        if r.snapshot_epoch != len(r.test_error):
            label += f" (epoch {r.snapshot_epoch}, its last with finite weights)"
        ok = r.snapshot[r.snapshot > 0]
        ax_norm.hist(ok.tolist(), bins=bins, alpha=0.6, color=color, label=label)
    ax_norm.axvline(max_norm, color="black", linestyle="--", label=f"bound c = {max_norm:g}")
    ax_norm.set_xscale("log")
    ax_norm.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_norm.set_xlabel("incoming weight norm per unit (log scale)")
    ax_norm.set_ylabel("units")
    ax_norm.set_title("Distribution of per-unit norms after training")
    ax_norm.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (errors exit through ``SystemExit``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Everything that can be wrong with the options is checked before training.
        for module in ("sklearn", "matplotlib", "tqdm"):
            _require(module)
        opt_cls = resolve_optimizer(args.optimizer)
        kwargs = optimizer_kwargs(opt_cls, args.lr, args.momentum)
        device = resolve_device(args.device)
        if args.out.exists() and args.out.is_dir():
            raise DemoError(f"--out {str(args.out)!r} is a directory")
        data = load_data(device)
        check_optimizer(data, opt_cls, kwargs, args.max_norm)
        settings = ", ".join(
            [f"{k}={v:g}" for k, v in kwargs.items()]
            + [
                f"lr decay {LR_DECAY}/epoch",
                f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}",
                f"batch {BATCH_SIZE}",
                f"seed {args.seed}",
                f"device {device}",
            ]
        )
        print(
            f"digits: {len(data.y_train)} train / {len(data.y_test)} test images; "
            f"MLP 64-{HIDDEN}-{HIDDEN}-10, dropout {DROPOUT_IN} (input) / {DROPOUT_HIDDEN} "
            f"(hidden); {opt_cls.__name__}: {settings}",
            flush=True,
        )
        # The matrices are small: one thread is as fast as several (much faster on a
        # busy machine) and keeps the results independent of the core count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = [
                train(data, args, opt_cls, kwargs, max_norm=None),
                train(data, args, opt_cls, kwargs, max_norm=args.max_norm),
            ]
        finally:
            torch.set_num_threads(threads)
    except DemoError as err:
        parser.error(str(err))
    print()
    print(table(results))
    print()
    for r in results:
        if r.diverged_epoch is not None:
            print(f"{r.label}: the weights became non-finite in epoch {r.diverged_epoch}.")
    title = f"{opt_cls.__name__} on digits, seed {args.seed}: bare vs. max-norm"
    plot(results, args.max_norm, args.out, title)
    print(f"plot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

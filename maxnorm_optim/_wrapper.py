r"""`MaxNormWrapper`: a drop-in optimizer that projects weights after every update."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _projection as proj
from ._kernels import ProjectionStats
from ._options import (
    OPTION_KEYS,
    PER_UNIT,
    SKIP,
    MaxNormOptions,
    NormDim,
    parse_arguments,
    parse_options,
    show,
    slice_dims,
)
from ._plans import Plan, fingerprint, is_dtensor, make_plan, plan_key
from ._sparse import sparse_rows_only

__all__ = ["MaxNormWrapper"]

_MISSING = object()
_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _ensure_hook_dicts(optimizer: Optimizer) -> None:
    """Give a base that never ran `Optimizer.__init__` (e.g. `torch_optimizer.Lookahead`)
    the hook registries, as `Optimizer.__setstate__` does."""
    for name in _HOOK_DICTS:
        if not isinstance(getattr(optimizer, name, None), dict):
            setattr(optimizer, name, OrderedDict())


def _is_flattened(p: Tensor) -> bool:
    """FSDP1's `FlatParameter` and the views `use_orig_params=True` hands out."""
    return bool(getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False))


class _Group(NamedTuple):
    """What the wrapper checked of one param group before a step."""

    options: MaxNormOptions
    values: tuple[Any, ...]  # the group's option objects, compared by identity
    layout: tuple[Any, ...] | None  # the fingerprint of all its parameters


class _Certificate(NamedTuple):
    """Every row of a parameter was in bound after a projection under `options`, with
    the parameter at `layout` and `version`; until either changes, a step that touches
    only some rows needs to look only at those."""

    options: MaxNormOptions
    layout: tuple[Any, ...]
    version: int


def _layout(p: Tensor) -> tuple[Any, ...]:
    """Where and how a parameter's values are laid out."""
    return (p.data_ptr(), p.shape, p.stride(), p.dtype)


class MaxNormWrapper(Optimizer):
    r"""Wrap an optimizer so that weights are projected onto a max-norm ball after each update.

    Right after every update of the wrapped `optimizer`, every slice $v$ (as given by
    `norm_dim`) of every parameter with a gradient in a constrained param group is
    projected: a slice with $\|v\|_p > c$ is scaled to just inside $c$, and every other
    slice is left bitwise unchanged. The options are param-group keys, so each group can
    have its own; the keyword arguments are defaults for the groups that do not set a key
    (they are written into those groups, and so show in `param_groups` and
    `state_dict()`). A group is constrained when its `max_norm` is not `None`.

    The projection runs as a step post-hook of the wrapped optimizer, so stepping the
    wrapped optimizer directly (`opt.optimizer.step()`, `scaler.step(opt.optimizer)`)
    projects too, exactly once per update; every check runs before its update (a
    rejected step changes nothing). `param_groups`, `state` and `defaults` are the
    wrapped optimizer's own objects, and `state_dict()` is its state dict, so LR
    schedulers (built on either), checkpoints and `torch.amp.GradScaler` work as with
    the bare optimizer.

    Args:
        optimizer: the optimizer to wrap (any `torch.optim.Optimizer`).
        max_norm: the bound $c > 0$, `math.inf` (no-op) or `None` (unconstrained).
            Default: `None`.
        norm_dim: the dims each norm runs over, as `dim` of `torch.linalg.vector_norm`;
            `None` for the whole tensor. Default `"per_unit"`: every dim but dim 0 of
            tensors with two or more dims (one norm per output unit of a `Linear`,
            `Conv` or `Embedding` weight); biases and other 1-d tensors are left alone.
        norm_type: $p$ of the p-norm, `>= 1` or `math.inf`. Default: 2.
        min_norm: lower bound; slices with $0 < n < c_{\min}$ are scaled up. Default: 0.
        rate: the share of the way to the bound a slice is moved (Keras `MinMaxNorm`).
            Default: 1.
        error_if_nonfinite: raise `RuntimeError` naming the parameter when a slice holds
            NaN or inf, before any slice is scaled (else such slices are left as they
            are). Default: `False`.
        track_stats: record, per group, what the last projection did; read it with
            [`constraint_stats`][maxnorm_optim.MaxNormWrapper.constraint_stats].
            Default: `False`.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        >>> _ = model[1].weight.data.fill_(10.0)  # a LayerNorm gain of norm 17
        >>> opt = MaxNormWrapper(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> opt.step()
        >>> bool(model[0].weight.norm(dim=1).max() <= 1.0)  # one norm per output unit
        True
        >>> bool(model[1].weight.norm() > 1.0)  # 1-d gains and biases: not constrained
        True
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        max_norm: float | None = None,
        norm_dim: NormDim = PER_UNIT,
        norm_type: float = 2.0,
        min_norm: float = 0.0,
        rate: float = 1.0,
        error_if_nonfinite: bool = False,
        track_stats: bool = False,
    ) -> None:
        if isinstance(optimizer, MaxNormWrapper):
            raise ValueError("MaxNormWrapper: the optimizer is already a MaxNormWrapper")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "MaxNormWrapper: optimizer must be a torch.optim.Optimizer, but got "
                f"{type(optimizer).__name__}"
            )
        if getattr(optimizer, "_maxnorm_wrapper", None) is not None:
            raise ValueError(
                f"MaxNormWrapper: this {type(optimizer).__name__} is already wrapped by a "
                "MaxNormWrapper; wrap each optimizer once"
            )
        if not isinstance(track_stats, bool):
            raise TypeError(f"MaxNormWrapper: track_stats must be a bool, got {show(track_stats)}")
        defaults = parse_arguments(
            "MaxNormWrapper",
            max_norm=max_norm,
            norm_dim=norm_dim,
            norm_type=norm_type,
            min_norm=min_norm,
            rate=rate,
            error_if_nonfinite=error_if_nonfinite,
        )
        self.optimizer = optimizer
        self.max_norm_defaults: dict[str, Any] = defaults.as_group()
        self.track_stats = track_stats
        self._reset_caches()
        self._groups: list[tuple[dict[str, Any], _Group]] = self._validate_groups()
        self._attach()

    # -- set-up, pickling ------------------------------------------------------------------
    def _reset_caches(self) -> None:
        self._validated: dict[int, _Group] = {}  # by id of the group dict
        self._plans: dict[int, tuple[Any, Plan]] = {}
        self._certs: dict[int, _Certificate] = {}  # by id of the parameter
        self._versions: dict[int, int] = {}  # parameter versions just before the update
        self._stats: list[ProjectionStats | None] = []
        self._groups = []
        self._ndims: dict[int, int] = {}  # parameter dims when first seen
        self._state_init = False
        self._checked = False  # the checks of the coming update have run
        self._projections = 0

    def _attach(self) -> None:
        """What `Optimizer.__init__` would set up (it cannot run: it would reset the
        base), and the hooks on the base that run the checks and the projection."""
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        base = self.optimizer
        _ensure_hook_dicts(base)
        base._maxnorm_wrapper = self  # type: ignore[attr-defined]
        base.register_step_pre_hook(_before_base_step)
        post = base.register_step_post_hook(_after_base_step)
        # First among the post-hooks: every later hook sees projected weights.
        hooks = base._optimizer_step_post_hooks
        assert isinstance(hooks, OrderedDict)
        hooks.move_to_end(post.id, last=False)
        base.register_load_state_dict_pre_hook(_keep_option_keys)
        base.register_load_state_dict_post_hook(_loaded)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "max_norm_defaults": self.max_norm_defaults,
            "track_stats": self.track_stats,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()
        self._attach()

    # -- live views onto the base ------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's own `defaults` (the max-norm defaults are in
        `max_norm_defaults`)."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # GradScaler hands a fused optimizer `grad_scale` / `found_inf` as attributes of the
    # object it was given: forward them to the base, which is the one that reads them.
    @property
    def _step_supports_amp_scaling(self) -> bool:
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def _forwarded(name: str) -> property:  # type: ignore[misc]
        def get(self: MaxNormWrapper) -> Any:
            try:
                return getattr(self.optimizer, name)
            except AttributeError:
                raise AttributeError(name) from None

        def set_(self: MaxNormWrapper, value: Any) -> None:
            setattr(self.optimizer, name, value)

        def del_(self: MaxNormWrapper) -> None:
            delattr(self.optimizer, name)

        return property(get, set_, del_)

    grad_scale = _forwarded("grad_scale")
    found_inf = _forwarded("found_inf")
    del _forwarded

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    # -- the optimizer API ---------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the wrapped optimizer; its max-norm keys are checked
        first (missing ones are filled from `max_norm_defaults`)."""
        if isinstance(param_group, dict):
            params = param_group.get("params")
            probe = dict(param_group)
            if isinstance(params, Tensor):
                probe["params"] = [params]
            elif params is not None and not isinstance(params, set):
                params = list(params)
                param_group = {**param_group, "params": params}
                probe["params"] = [p[1] if isinstance(p, tuple) else p for p in params]
            options = self._parse_group(len(self.param_groups), probe)
            self._check_params(len(self.param_groups), probe, options)
            param_group = {**param_group, **options.as_group()}
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's `zero_grad` (`set_to_none` passed on)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (the max-norm keys ride in its
        `param_groups`)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a wrapper's or a bare optimizer's state dict.

        Max-norm keys missing from the checkpoint keep the values the groups had; keys
        present in it win. The result is checked before anything is loaded.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.optimizer.load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Run the wrapped optimizer's step (`closure` and keyword arguments passed on),
        which projects right after its update.

        The parameters of constrained groups that have a gradient are projected, and
        every `DTensor` parameter (FSDP2, tensor parallel) of those groups whether or
        not it has one: its projection may need a collective, so every rank must call
        `step()` (see `docs/distributed.md`).

        Returns:
            what the wrapped optimizer's step returns (the loss, with a closure).
        """
        args: tuple[Any, ...] = () if closure is None else (closure,)
        for pre_hook in self._optimizer_step_pre_hooks.values():
            result = pre_hook(self, args, kwargs)
            if result is not None:
                args, kwargs = result
        self._before_step()
        self._checked = True  # the base's pre-hook need not check again
        done = self._projections
        try:
            out = self.optimizer.step(*args, **kwargs)
        finally:
            self._checked = False
        if self._projections == done:
            # The base has no step hooks (e.g. torch_optimizer.Lookahead), or a patch of
            # its step bypassed them: project here, once.
            self._after_step()
        for post_hook in self._optimizer_step_post_hooks.values():
            post_hook(self, args, kwargs)
        return out

    @torch.no_grad()
    def project(self) -> None:
        """Project every parameter of every constrained group now (e.g. initial weights)."""
        self._groups = self._validate_groups()
        self._project(only_with_grad=False, skip=None)

    def constraint_stats(self) -> list[dict[str, Tensor] | None]:
        """Per param group, what the last projection (`step()` or `project()`) did.

        Needs `track_stats=True`. Each constrained group gets a dict of tensors on its
        parameters' device (read them with `.item()`, which is when the host waits for
        the device): `projected` (slices scaled), `slices` (slices looked at: tensors
        with fewer than two dims hold none under `"per_unit"`), `max_norm_before`
        (largest slice norm before projection) and `share_projected`
        (`projected / slices`). Unconstrained groups, and every group before the first
        projection, give `None`.
        """
        if not self.track_stats:
            raise RuntimeError("constraint_stats() needs MaxNormWrapper(..., track_stats=True)")
        out: list[dict[str, Tensor] | None] = []
        for i in range(len(self.param_groups)):
            s = self._stats[i] if i < len(self._stats) else None
            if s is None:
                out.append(None)
                continue
            share = s.projected.to(torch.float32) / s.slices.clamp(min=1).to(torch.float32)
            out.append(
                {
                    "projected": s.projected,
                    "slices": s.slices,
                    "max_norm_before": s.max_norm_before,
                    "share_projected": share,
                }
            )
        return out

    # -- checks ------------------------------------------------------------------------------
    def _parse_group(self, index: int, group: dict[str, Any]) -> MaxNormOptions:
        values = {k: group.get(k, self.max_norm_defaults[k]) for k in OPTION_KEYS}
        return parse_options(index, values)

    def _check_params(self, index: int, group: dict[str, Any], options: MaxNormOptions) -> None:
        """Each parameter of a constrained group: a dense (or DTensor) floating tensor,
        not flattened by FSDP1, and `norm_dim` fits it."""
        if options.max_norm is None:
            return
        params = group.get("params", [])
        labels = group.get("param_names") or range(len(params))
        for label, p in zip(labels, params):
            if not isinstance(p, Tensor):
                continue  # the base optimizer reports it
            where = f"param group {index}: parameter {label!r} (shape {tuple(p.shape)})"
            if _is_flattened(p):
                raise ValueError(
                    f"{where} is a flattened FSDP1 parameter: its rows are not the "
                    "layer's units, so max-norm cannot be applied to it. Shard the model "
                    "with FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor "
                    "parameters keep their shape"
                )
            proj.check_tensor(p, where)
            try:
                dims = slice_dims(options.norm_dim, p.dim())
            except IndexError as err:
                raise ValueError(
                    f"{where}: norm_dim={show(options.norm_dim)} does not fit ({err})"
                ) from None
            first = self._ndims.setdefault(id(p), p.dim())
            if first >= 2 and p.dim() == 1 and (dims is SKIP or dims is None):
                raise ValueError(
                    f"{where} was {first}-d when first seen and is now a flat 1-d shard "
                    "(as FSDP1 or ZeRO hand to optimizers): its units cannot be seen. "
                    "Use FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor "
                    "parameters keep their shape"
                )

    def _validate_groups(self) -> list[tuple[dict[str, Any], _Group]]:
        """Check every group (its max-norm keys, type-strict, and its parameters), then
        write the canonical values into the groups checked afresh. A group whose option
        objects and parameters are the very ones checked last time is not checked again
        (compared by identity, so an edit, even to an equal value, is checked)."""
        checked: list[tuple[dict[str, Any], _Group, bool]] = []
        for i, group in enumerate(self.param_groups):
            values = tuple(group.get(k, _MISSING) for k in OPTION_KEYS)
            try:
                layout = fingerprint(group["params"])
            except (AttributeError, RuntimeError, TypeError, KeyError):
                layout = None  # not all dense tensors: _check_params says which
            old = self._validated.get(id(group))
            if (
                old is not None
                and layout is not None
                and old.layout == layout
                and all(a is b for a, b in zip(values, old.values))
            ):
                checked.append((group, old, False))
                continue
            options = self._parse_group(i, group)
            self._check_params(i, group, options)
            checked.append((group, _Group(options, (), layout), True))
        # Everything is valid: only now write anything.
        out = []
        for group, entry, fresh in checked:
            if fresh:
                group.update(entry.options.as_group())
                entry = entry._replace(values=tuple(group[k] for k in OPTION_KEYS))
                self._validated[id(group)] = entry
            out.append((group, entry))
        return out

    # -- the step --------------------------------------------------------------------------------
    def _before_step(self) -> None:
        """Right before an update: every check, and the versions of the parameters that
        a sparse step may project on touched rows only."""
        self._groups = self._validate_groups()
        base = self.optimizer
        self._versions = {}
        if self._certs:
            for group, checked in self._groups:
                if checked.options.active:
                    for p in group["params"]:
                        if id(p) in self._certs:
                            self._versions[id(p)] = p._version
        # torch.distributed.checkpoint initialises optimizer state with a step at
        # lr = 0 on zero gradients; it must leave the weights as they are.
        self._state_init = not base.state and all(
            _is_zero(g.get("lr", 1.0)) for g in self.param_groups
        )

    def _after_step(self) -> None:
        self._projections += 1
        if self._state_init and self._all_grads_zero():
            return
        skip = getattr(self.optimizer, "found_inf", None)
        self._project(only_with_grad=True, skip=skip if isinstance(skip, Tensor) else None)

    def _all_grads_zero(self) -> bool:
        """Whether every gradient of a constrained group is zero. With DTensor
        gradients each rank sees only its shard: the answer is agreed on by all ranks
        (one all-reduce), so that every rank projects, or none."""
        nonzero = False
        dtensors = False
        for group, checked in self._groups:
            if checked.options.active:
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    if is_dtensor(g):
                        dtensors = True
                        g = g.to_local()  # type: ignore[attr-defined]
                    if g.is_sparse:
                        g = g._values()
                    nonzero = nonzero or bool(g.any())
        if dtensors and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(float(nonzero), device=self._flag_device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            nonzero = bool(flag.item())
        return not nonzero

    def _flag_device(self) -> torch.device:
        """Where the process group's collectives run (its backend's device)."""
        backend = torch.distributed.get_backend()
        if "nccl" in str(backend) and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @torch.no_grad()
    def _project(self, only_with_grad: bool, skip: Tensor | None) -> None:
        # A named range in torch.profiler traces: "maxnorm_optim.project".
        with torch.autograd.profiler.record_function("maxnorm_optim.project"):
            self._project_groups(only_with_grad, skip)

    def _project_groups(self, only_with_grad: bool, skip: Tensor | None) -> None:
        work: list[Any] = []
        self._full: dict[int, tuple[Any, ...] | None] = {}
        for i, (group, checked) in enumerate(self._groups):
            options = checked.options
            if not options.active:
                work.append(None)
                continue
            tensors: list[Tensor] = []
            rows: dict[int, Tensor] = {}
            seen: set[int] = set()
            for p in group["params"]:
                if id(p) in seen:  # listed twice (torch.optim warns): projected once
                    continue
                seen.add(id(p))
                grad = p.grad
                if grad is None:
                    # DTensors are projected by group membership (see step()).
                    if only_with_grad and not is_dtensor(p):
                        continue
                elif grad.is_sparse and only_with_grad and self._rows_only(group, p, options):
                    rows[len(tensors)] = grad.coalesce().indices()[0]
                tensors.append(p)
            work.append((i, group, options, tensors, rows))
            if len(tensors) == len(seen) and not rows:
                self._full[i] = checked.layout
        # error_if_nonfinite is all-or-nothing: every check before any slice is scaled.
        for item in work:
            if item is not None and item[2].error_if_nonfinite:
                i, group, options, tensors, rows = item
                plan = self._plan(i, group, options, tensors, rows)
                proj.raise_if_nonfinite(plan, tensors, options, rows)
        stats: list[ProjectionStats | None] = []
        for item in work:
            if item is None:
                stats.append(None)
                continue
            i, group, options, tensors, rows = item
            plan = self._plan(i, group, options, tensors, rows)
            stats.append(
                proj.project_(
                    tensors,
                    options,
                    rows=rows or None,
                    track_stats=self.track_stats,
                    skip=skip,
                    plan=plan,
                )
            )
            for p in tensors:
                grad = p.grad
                if grad is not None and grad.is_sparse and not is_dtensor(p):
                    # Touched rows or all, every row is now in bound under these options.
                    self._certs[id(p)] = _Certificate(options, _layout(p), p._version)
        if self.track_stats:
            self._stats = stats

    def _rows_only(self, group: dict[str, Any], p: Tensor, options: MaxNormOptions) -> bool:
        """Whether a sparse step may project only the touched rows of `p`: the base
        changes only those, and every other row has been in bound, under the current
        options and layout, since the last projection (no write in between)."""
        cert = self._certs.get(id(p))
        return (
            cert is not None
            and cert.options == options
            and cert.layout == _layout(p)
            and self._versions.get(id(p)) == cert.version
            and sparse_rows_only(self.optimizer, group, p)
        )

    def _plan(
        self,
        index: int,
        group: dict[str, Any],
        options: MaxNormOptions,
        tensors: list[Tensor],
        rows: dict[int, Tensor],
    ) -> Plan:
        """The group's plan, rebuilt only when what it depends on changes."""
        prints = self._full.get(index)  # every parameter: the fingerprint checked before
        key = (plan_key(tensors, options.norm_dim, rows, prints), options.error_if_nonfinite)
        cached = self._plans.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        labels = group.get("param_names") or range(len(group["params"]))
        by_id = {id(p): label for label, p in zip(labels, group["params"])}
        names = [
            f"parameter {by_id.get(id(t), '?')!r} of param group {index} (shape {tuple(t.shape)})"
            for t in tensors
        ]
        plan = make_plan(tensors, options.norm_dim, names, rows)
        if not torch.compiler.is_compiling():
            self._plans[index] = (key, plan)
        return plan

    def _forget(self) -> None:
        """After a load: nothing cached is trusted."""
        self._validated.clear()
        self._plans.clear()
        self._certs.clear()


def _is_zero(lr: Any) -> bool:
    if isinstance(lr, Tensor):
        return bool(lr == 0)
    return lr == 0


# -- hooks registered on the wrapped optimizer -----------------------------------------------
@torch.compiler.disable
def _before_base_step(base: Optimizer, args: Any, kwargs: Any) -> None:
    wrapper: MaxNormWrapper = base._maxnorm_wrapper  # type: ignore[attr-defined]
    if not wrapper._checked:  # stepped directly, not through the wrapper
        wrapper._before_step()


@torch.compiler.disable
def _after_base_step(base: Optimizer, args: Any, kwargs: Any) -> None:
    base._maxnorm_wrapper._after_step()  # type: ignore[attr-defined]


def _keep_option_keys(base: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """`load_state_dict` pre-hook on the wrapped optimizer.

    `Optimizer.load_state_dict` replaces each param group by the checkpoint's, so a
    checkpoint written by a bare optimizer would drop the max-norm keys. This fills every
    max-norm key the checkpoint lacks from the group it replaces (a key present in the
    checkpoint wins) and checks the result before anything is loaded.
    """
    wrapper: MaxNormWrapper = base._maxnorm_wrapper  # type: ignore[attr-defined]
    saved = state_dict["param_groups"]
    current = base.param_groups
    if len(saved) != len(current):
        return state_dict  # the base raises its own error
    merged = []
    for i, (old, new) in enumerate(zip(current, saved)):
        group = dict(new)
        for key in OPTION_KEYS:
            if key not in group and key in old:
                group[key] = old[key]
        options = wrapper._parse_group(i, {**group, "params": old["params"]})
        wrapper._check_params(i, {**group, "params": old["params"]}, options)
        merged.append({**group, **options.as_group()})
    return {**state_dict, "param_groups": merged}


def _loaded(base: Optimizer) -> None:
    base._maxnorm_wrapper._forget()  # type: ignore[attr-defined]


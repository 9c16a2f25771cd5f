"""``MaxNormWrapper``: a drop-in optimizer that projects weights after every step."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .param_groups import sparse_rows_only
from .projection import Plan, ProjectionStats, _is_dtensor, make_plan, project_
from .validation import GROUP_DEFAULTS, PER_UNIT, NormDim, normalize_options, validate_group

__all__ = ["MaxNormWrapper"]


def _keep_max_norm_keys(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``load_state_dict`` pre-hook registered on the wrapped base.

    ``Optimizer.load_state_dict`` replaces each param group by the checkpoint's, so a
    checkpoint written by a bare optimizer would drop the max-norm keys. This fills
    every max-norm key the checkpoint lacks from the group it replaces (a key present
    in the checkpoint wins) and validates the result before anything is loaded.
    """
    saved = state_dict["param_groups"]
    current = optimizer.param_groups
    if len(saved) != len(current):
        return state_dict  # the base raises its own error
    merged = []
    for i, (old, new) in enumerate(zip(current, saved)):
        group = dict(new)
        for key in GROUP_DEFAULTS:
            if key not in group and key in old:
                group[key] = old[key]
        validate_group(i, {**group, "params": old["params"]}, optimizer.defaults)
        merged.append(group)
    return {**state_dict, "param_groups": merged}


def _ensure_hook_dicts(optimizer: Optimizer) -> None:
    """Give a base that never ran ``Optimizer.__init__`` (e.g. ``torch_optimizer.Lookahead``)
    the hook registries, as ``Optimizer.__setstate__`` does."""
    for name in (
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    ):
        if not isinstance(getattr(optimizer, name, None), dict):
            setattr(optimizer, name, OrderedDict())


def _is_wrapped(optimizer: Optimizer) -> bool:
    hooks = getattr(optimizer, "_optimizer_load_state_dict_pre_hooks", {})
    return any(h is _keep_max_norm_keys for h in hooks.values())


class MaxNormWrapper(Optimizer):
    r"""Wrap an optimizer so that weights are projected onto a max-norm ball after each step.

    After every ``step()`` of the wrapped ``optimizer``, each slice :math:`v` of every
    parameter (with a gradient) of a constrained param group is projected:

    .. math::
        v \leftarrow v \cdot \min\left(1, \frac{c}{\|v\|_p}\right)

    with slices inside the bound left bitwise unchanged. The options are param-group
    keys, so each group can have its own; the keyword arguments below are defaults
    written into the groups that do not set a key (they show in ``param_groups`` and
    ``state_dict()``). A group is constrained when its ``max_norm`` is not ``None``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own
    objects, and ``state_dict()`` is its state dict, so LR schedulers, checkpoints and
    :class:`torch.amp.GradScaler` work as with the bare optimizer.

    Args:
        optimizer: the optimizer to wrap (any :class:`torch.optim.Optimizer`).
        max_norm: the bound :math:`c > 0`, ``math.inf`` (no-op) or ``None``
            (unconstrained). Default: ``None``.
        norm_dim: the dims each norm runs over, as ``dim`` of
            :func:`torch.linalg.vector_norm`; ``None`` for the whole tensor. Default
            ``"per_unit"``: every dim but dim 0 (one norm per output unit of a
            ``Linear``/``Conv``/``Embedding`` weight); a 0-d or 1-d tensor is one vector.
        norm_type: p of the p-norm, ``>= 1`` or ``math.inf``. Default: 2.
        min_norm: lower bound; slices with ``0 < n < min_norm`` are scaled up. Default: 0.
        rate: fraction of the way to the bound a slice is moved (Keras ``MinMaxNorm``).
            Default: 1.
        error_if_nonfinite: raise ``RuntimeError`` naming the parameter when a slice
            norm is NaN or inf (else such slices are left as they are). Default: ``False``.
        track_stats: record, per group, how many slices the last step projected and
            the largest norm before projection; read them with :meth:`constraint_stats`.
            Default: ``False``.

    Examples:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = MaxNormWrapper(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> opt.step()
        >>> bool(model.weight.norm(dim=1).max() <= 1.0)
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
        if _is_wrapped(optimizer):
            raise ValueError(
                f"MaxNormWrapper: this {type(optimizer).__name__} is already wrapped by "
                "a MaxNormWrapper; wrap each optimizer once"
            )
        if not isinstance(track_stats, bool):
            raise TypeError(f"MaxNormWrapper: track_stats must be a bool, got {track_stats!r}")
        defaults = normalize_options(
            "MaxNormWrapper defaults",
            {
                "max_norm": max_norm,
                "min_norm": min_norm,
                "rate": rate,
                "norm_dim": norm_dim,
                "norm_type": norm_type,
                "error_if_nonfinite": error_if_nonfinite,
            },
        )
        checked = [validate_group(i, g, defaults) for i, g in enumerate(optimizer.param_groups)]
        # Everything is valid: only now write anything.
        _ensure_hook_dicts(optimizer)
        for key, value in defaults.items():
            optimizer.defaults.setdefault(key, value)
        for group, options in zip(optimizer.param_groups, checked):
            group.update(options)
        self.optimizer = optimizer
        self.track_stats = track_stats
        self._stats: list[ProjectionStats | None] = []
        self._plans: dict[int, tuple[Any, Plan]] = {}
        # Groups (by identity) seen by the last step, with the indices of their params
        # whose every row has been projected since (for the sparse touched-rows rule)
        # and the max-norm options validated then.
        self._seen: list[tuple[dict[str, Any], set[int], dict[str, Any]]] = []
        self._init_optimizer_attributes()

    # -- what Optimizer.__init__ would set up (it cannot run: it would reset the base) --
    def _init_optimizer_attributes(self) -> None:
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()
        if not _is_wrapped(self.optimizer):
            _ensure_hook_dicts(self.optimizer)
            self.optimizer.register_load_state_dict_pre_hook(_keep_max_norm_keys)

    def __getstate__(self) -> dict[str, Any]:
        # Like Optimizer, hooks are not pickled.
        return {
            "optimizer": self.optimizer,
            "track_stats": self.track_stats,
            "_seen": self._seen,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stats = []
        self._plans = {}
        self._init_optimizer_attributes()

    # -- live views onto the base ------------------------------------------------------
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
        """Add a param group to the base (validated first; max-norm keys may be set)."""
        if isinstance(param_group, dict):
            params = param_group.get("params")
            probe = dict(param_group)
            if isinstance(params, Tensor):
                probe["params"] = [params]
            elif params is not None and not isinstance(params, set):
                params = list(params)
                param_group = {**param_group, "params": params}
                probe["params"] = [p[1] if isinstance(p, tuple) else p for p in params]
            options = validate_group(len(self.param_groups), probe, self.defaults)
            param_group = {**param_group, **options}
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict (the max-norm keys ride in its ``param_groups``)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a wrapper's or a bare base's state dict.

        Max-norm keys missing from the checkpoint keep the values the groups had; keys
        present in it win. The result is validated before anything is loaded.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.optimizer.load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Run the base step (``closure`` passed through), then project.

        The parameters of constrained groups that have a gradient are projected, and
        every ``DTensor`` parameter (FSDP2, tensor parallel) of those groups whether or
        not it has one: its projection may need a collective, so all ranks must project
        the same parameters. With ``DTensor`` parameters every rank must call
        ``step()`` (see ``docs/distributed.md``).

        Returns:
            the loss returned by the base step.
        """
        groups = self._check_new_groups()
        loss = self._base_step(closure)
        # A fused base given `found_inf` by GradScaler skips its own update on inf; the
        # projection is gated on the same flag (no host sync).
        skip = getattr(self.optimizer, "found_inf", None)
        if not self._no_update():
            self._project(groups, only_with_grad=True, skip=skip)
        return loss

    def _no_update(self) -> bool:
        """Whether every group has ``lr == 0``: the base then updates nothing, and
        nothing is projected. (``torch.distributed.checkpoint`` initialises optimizer
        state by such a step with zero grads; it must not move the weights.) Only
        Python numbers and CPU tensors are read, so this never waits for a device.
        """
        for group in self.param_groups:
            lr = group.get("lr")
            if isinstance(lr, Tensor):
                if lr.device.type != "cpu" or torch.compiler.is_compiling() or lr.item() != 0:
                    return False
            elif lr != 0:
                return False
        return bool(self.param_groups)

    @torch.no_grad()
    def project(self) -> None:
        """Project every parameter of every constrained group now (e.g. initial weights)."""
        self._project(self._check_new_groups(), only_with_grad=False)

    def constraint_stats(self) -> list[dict[str, Tensor] | None]:
        """Per param group, what the last projection (``step()`` or ``project()``) did.

        Needs ``track_stats=True``.

        Each constrained group gets a dict of tensors on its parameters' device (read
        them with ``.item()``, which is when the host waits for the device):
        ``projected`` (slices scaled), ``slices`` (slices looked at),
        ``max_norm_before`` (largest slice norm before projection) and
        ``share_projected`` (``projected / slices``). Unconstrained groups, and every
        group before the first projection, give ``None``.
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

    # -- internals -----------------------------------------------------------------------
    def _check_new_groups(self) -> list[tuple[dict[str, Any], set[int], dict[str, Any]]]:
        """Validate, before the base steps, groups the wrapper has not seen (added or
        loaded on the base itself) and groups whose max-norm keys were edited."""
        seen = {id(g): (done, options) for g, done, options in self._seen}
        records = []
        for i, group in enumerate(self.param_groups):
            done, checked = seen.get(id(group), (None, None))
            current = {key: group.get(key) for key in GROUP_DEFAULTS}
            if done is None or current != checked:
                current = validate_group(i, group, self.defaults)
                group.update(current)  # canonical values, as at construction
                done = set() if done is None else done
            records.append((group, done, current))
        return records

    def _base_step(self, closure: Callable[[], float] | None) -> float | None:
        """Call the base step with its own hooks, but not the global ones (they ran once,
        for the wrapper)."""
        base = self.optimizer
        step = type(base).step
        raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
        if raw is None:
            return base.step(closure) if closure is not None else base.step()
        args: tuple[Any, ...] = (base,) if closure is None else (base, closure)
        kwargs: dict[str, Any] = {}
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(base).__name__}.step"):
            for pre_hook in base._optimizer_step_pre_hooks.values():
                result = pre_hook(base, args, kwargs)
                if result is not None:
                    args, kwargs = result
            out = raw(*args, **kwargs)
            base._optimizer_step_code()
            for post_hook in base._optimizer_step_post_hooks.values():
                post_hook(base, args, kwargs)
        return out

    def _plan(
        self,
        index: int,
        group: dict[str, Any],
        tensors: list[Tensor],
        rows: dict[int, Tensor],
        options: dict[str, Any],
    ) -> Plan:
        """The group's projection plan, rebuilt only when its tensors or options change."""
        key = (
            tuple(map(id, tensors)),
            tuple(t.data_ptr() for t in tensors),
            options["norm_dim"],
            tuple(rows),
            options["error_if_nonfinite"],
        )
        cached = self._plans.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        names = None
        if options["error_if_nonfinite"]:
            labels = group.get("param_names") or range(len(group["params"]))
            by_id = {id(p): label for label, p in zip(labels, group["params"])}
            names = [
                f"parameter {by_id[id(t)]!r} of param group {index} (shape {tuple(t.shape)})"
                for t in tensors
            ]
        plan = make_plan(tensors, options["norm_dim"], names, rows)
        self._plans[index] = (key, plan)
        return plan

    @torch.no_grad()
    def _project(
        self,
        records: list[tuple[dict[str, Any], set[int], dict[str, Any]]],
        only_with_grad: bool,
        skip: Tensor | None = None,
    ) -> None:
        stats: list[ProjectionStats | None] = []
        for i, (group, done, options) in enumerate(records):
            if options["max_norm"] is None or (
                options["max_norm"] == math.inf and options["min_norm"] == 0.0
            ):
                stats.append(None)
                continue
            tensors, rows = [], {}
            for j, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    # DTensors are projected by group membership (see step()).
                    if only_with_grad and not _is_dtensor(p):
                        continue
                elif grad.is_sparse and only_with_grad:
                    if j in done and sparse_rows_only(self.optimizer, group, p):
                        rows[len(tensors)] = grad.coalesce().indices()[0]
                    done.add(j)
                tensors.append(p)
            if not only_with_grad:
                done.update(range(len(group["params"])))
            stats.append(
                project_(
                    tensors,
                    options,
                    rows=rows or None,
                    track_stats=self.track_stats,
                    skip=skip,
                    plan=None
                    if torch.compiler.is_compiling()
                    else self._plan(i, group, tensors, rows, options),
                )
            )
        self._seen = records
        if self.track_stats:
            self._stats = stats

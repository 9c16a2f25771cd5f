"""Build max-norm param groups for a whole model, with per-module overrides."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

from ._options import PER_UNIT, SKIP, NormDim, parse_options, slice_dims

__all__ = ["max_norm_param_groups"]

_WHERE = "max_norm_param_groups"

#: The option keys an override may set (``norm_dim`` is chosen per layer).
_OVERRIDE_KEYS = ("max_norm", "norm_type", "min_norm", "rate", "error_if_nonfinite")

_PER_UNIT_LAYERS = (
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.conv._ConvNd,
)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")


# -- which tensors of a layer hold one row (slice) per output unit --------------------------
def _unit_tensors(module: nn.Module) -> dict[str, NormDim]:
    """Names of ``module``'s own weights that get one norm per output unit, with the
    ``norm_dim`` giving it. Empty for layers this helper does not know."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # (in, out / groups, *kernel): the output unit is dim 1.
        return {"weight": (0, *range(2, len(module.kernel_size) + 2))}
    if isinstance(module, _PER_UNIT_LAYERS):
        return {"weight": PER_UNIT}
    if isinstance(module, nn.MultiheadAttention):
        return dict.fromkeys(_MHA_WEIGHTS, PER_UNIT)
    if isinstance(module, nn.RNNBase):
        names = [*module._parameters, *_parametrized_names(module), *_legacy_norms(module)]
        return {name: PER_UNIT for name in names if _RNN_WEIGHT.fullmatch(name)}
    if isinstance(module, nn.RNNCellBase):
        return {"weight_ih": PER_UNIT, "weight_hh": PER_UNIT}
    return {}


def _parametrized_names(module: nn.Module) -> list[str]:
    if not parametrize.is_parametrized(module):
        return []
    plists: Any = module.parametrizations
    return list(plists)


def _legacy_norms(module: nn.Module) -> dict[str, Any]:
    """The legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` hooks, by tensor name."""
    return {
        hook.name: hook
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, (_LegacyWeightNorm, _LegacySpectralNorm))
    }


def _unit_dim(norm_dim: NormDim, ndim: int) -> int:
    """The one dim that ``norm_dim`` leaves out (the output-unit dim)."""
    found = slice_dims(norm_dim, ndim)
    dims = () if found is None or found is SKIP else found
    assert isinstance(dims, tuple)
    (unit,) = set(range(ndim)) - set(dims)
    return unit


def _weight_norm_problem(
    kind: str, tensor: str, norm_dim: NormDim, dim: int, v: Tensor
) -> str | None:
    """Why bounding the magnitude g of a weight-normed ``tensor`` (direction ``v``, ``dim``
    as stored by ``weight_norm``) with ``norm_dim`` is not its per-unit max-norm; ``None``
    if it is (g then has the weight's shape with every dim but the unit dim of size 1)."""
    unit = _unit_dim(norm_dim, v.dim())
    have = None if dim == -1 else dim % v.dim()  # torch's weight_norm: -1 = the whole tensor
    if have == unit:
        return None
    over = "the whole tensor" if have is None else f"dim={have}"
    return (
        f"its {tensor} is weight-normalised ({kind}) over {over}, so its magnitude g is "
        f"not one norm per output unit; apply weight_norm with dim={unit}"
    )


@dataclass
class _Units:
    """A module's unit weights: ``(qualified name, tensor, norm_dim)``; and why a unit
    weight cannot be bounded through a parameter (``None`` when it can)."""

    entries: list[tuple[str, Tensor, NormDim]] = field(default_factory=list)
    problem: str | None = None


def _collect_units(module: nn.Module, prefix: str) -> _Units:
    units = _Units()
    legacy = _legacy_norms(module)
    for tensor, norm_dim in _unit_tensors(module).items():
        qual = f"{prefix}{tensor}"
        if tensor in module._parameters:
            param = module._parameters[tensor]
            if param is not None:
                units.entries.append((qual, param, norm_dim))
        elif parametrize.is_parametrized(module, tensor):
            plists: Any = module.parametrizations
            plist = plists[tensor]
            if len(plist) == 1 and isinstance(plist[0], _WeightNorm):
                problem = _weight_norm_problem(
                    "torch.nn.utils.parametrizations.weight_norm",
                    tensor,
                    norm_dim,
                    plist[0].dim,
                    plist.original1,
                )
                if problem is None:
                    units.entries.append(
                        (f"{prefix}parametrizations.{tensor}.original0", plist.original0, norm_dim)
                    )
                else:
                    units.problem = problem
            else:
                names = ", ".join(type(p).__name__ for p in plist)
                units.problem = (
                    f"its {tensor} is computed by the parametrization(s) {names}, so the "
                    "effective weight is not a parameter that a max-norm step could project"
                )
        elif isinstance(legacy.get(tensor), _LegacyWeightNorm):
            hook = legacy[tensor]
            problem = _weight_norm_problem(
                "torch.nn.utils.weight_norm",
                tensor,
                norm_dim,
                hook.dim,
                getattr(module, f"{tensor}_v"),
            )
            if problem is None:
                units.entries.append(
                    (f"{prefix}{tensor}_g", getattr(module, f"{tensor}_g"), norm_dim)
                )
            else:
                units.problem = problem
        elif getattr(module, tensor, None) is not None:
            how = (
                "the legacy torch.nn.utils.spectral_norm"
                if isinstance(legacy.get(tensor), _LegacySpectralNorm)
                else "a hook or attribute, not a parameter"
            )
            units.problem = (
                f"its {tensor} is not a parameter (it is recomputed from other tensors by "
                f"{how}), so a max-norm step could not project it"
            )
    return units


# -- overrides -----------------------------------------------------------------------------
def _literals(pattern: str) -> int:
    """Characters of an fnmatch pattern that match only themselves."""
    count, i = 0, 0
    while i < len(pattern):
        char = pattern[i]
        if char in "*?":
            i += 1
            continue
        if char == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j != -1:  # a character class: one wildcard character
                i = j + 1
                continue
        count += 1
        i += 1
    return count


def _label(key: str | type) -> str:
    return repr(key) if isinstance(key, str) else key.__qualname__


def _check_overrides(
    overrides: Mapping[Any, Any] | None, base: dict[str, Any]
) -> dict[str | type, dict[str, Any] | None]:
    """Validate every override; return its resolved options (``None``: unconstrained)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"{_WHERE}: overrides must be a mapping from module-name patterns or module "
            f"types to option dicts, but got {type(overrides).__name__}"
        )
    out: dict[str | type, dict[str, Any] | None] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) and not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(
                f"{_WHERE}: override keys must be module-name patterns (str) or "
                f"nn.Module subclasses, but got {key!r} ({type(key).__name__})"
            )
        where = f"{_WHERE} overrides[{_label(key)}]"
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{where}: the value must be a dict of max-norm options such as "
                f"{{'max_norm': 0.5}}, but got {value!r} ({type(value).__name__})"
            )
        for option in value:
            if option == "norm_dim":
                raise ValueError(
                    f"{where}: 'norm_dim' cannot be overridden: max_norm_param_groups "
                    "picks the per-unit norm_dim of each layer; build a param group by "
                    "hand for another norm_dim"
                )
            if option not in _OVERRIDE_KEYS:
                raise ValueError(
                    f"{where}: {option!r} is not a max-norm option; an override may set "
                    f"{', '.join(_OVERRIDE_KEYS)}"
                )
        merged = {**base, **value}
        if merged["max_norm"] is None:
            # An exclusion does not inherit the keyword arguments' min_norm.
            merged["min_norm"] = value.get("min_norm", 0.0)
        options = parse_options(where, merged).as_group()
        out[key] = None if options["max_norm"] is None else options
    return out


@dataclass
class _Resolution:
    options: dict[str, Any] | None  # None: unconstrained
    winner: str | type | None  # the override that applies; None: the keyword arguments
    candidates: list[str | type]  # every override that matched the module or an ancestor


def _resolve(
    chain: list[tuple[str, nn.Module]],
    resolved: dict[str | type, dict[str, Any] | None],
    base: dict[str, Any] | None,
) -> _Resolution:
    """The options for the module at the end of ``chain`` (root first)."""
    target = repr(chain[-1][0]) if chain[-1][0] else "the root module"
    names: dict[str, tuple[int, bool, int]] = {}
    types: dict[type, int] = {}
    for depth, (name, mod) in enumerate(chain):
        for key in resolved:
            if isinstance(key, str):
                if fnmatchcase(name, key):
                    literals = _literals(key)
                    names[key] = (literals, literals == len(key), depth)
            elif isinstance(mod, key):
                types[key] = depth
    candidates: list[str | type] = [*names, *types]

    def pick(best: list[Any], why: str) -> _Resolution:
        first = resolved[best[0]]
        for other in best[1:]:
            if resolved[other] != first:
                raise ValueError(
                    f"{_WHERE}: overrides {_label(best[0])} and {_label(other)} both match "
                    f"{target} {why} but set different options; make one more specific"
                )
        return _Resolution(first, best[0], candidates)

    if names:
        top = max(names.values())
        return pick(
            [k for k, v in names.items() if v == top],
            "with the same specificity (literal characters, exact or glob, depth)",
        )
    if types:
        deepest = max(types.values())
        at = [k for k, v in types.items() if v == deepest]
        most_derived = [k for k in at if not any(o is not k and issubclass(o, k) for o in at)]
        return pick(most_derived, "as types of the same module, neither a subclass of the other")
    return _Resolution(base, None, candidates)


# -- the helper ----------------------------------------------------------------------------
def max_norm_param_groups(
    module: nn.Module,
    max_norm: float | None,
    *,
    overrides: Mapping[str | type[nn.Module], Mapping[str, Any]] | None = None,
    norm_type: float = 2.0,
    min_norm: float = 0.0,
    rate: float = 1.0,
    error_if_nonfinite: bool = False,
) -> list[dict[str, Any]]:
    """Split `module`'s parameters into max-norm param groups, one norm per output unit.

    Every weight that has one slice per output unit is constrained with the `norm_dim`
    giving one norm per unit:

    | layer | constrained tensors | `norm_dim` |
    |---|---|---|
    | `Linear`, `Bilinear`, `Embedding`, `EmbeddingBag`, `ConvNd` | `weight` | `"per_unit"` |
    | `ConvTransposeNd`: weight `(in, out / groups, *kernel)` | `weight` | `(0, 2, ...)` |
    | `MultiheadAttention` | `in_proj_weight`, `q/k/v_proj_weight` | `"per_unit"` |
    | `RNN`, `LSTM`, `GRU` | `weight_ih_l*`, `weight_hh_l*`, `weight_hr_l*` | `"per_unit"` |
    | `RNNCell`, `LSTMCell`, `GRUCell` | `weight_ih`, `weight_hh` | `"per_unit"` |

    (`"per_unit"`: one norm per dim-0 slice, i.e. per row.) The RNN weights include the
    `_reverse` ones of bidirectional layers and the `weight_hr_l*` projections of an
    `LSTM` with `proj_size`; the `out_proj` of a `MultiheadAttention` is a `Linear`.
    Biases, normalisation-layer gains and every parameter of other layers go into one
    unconstrained group (`max_norm=None`). For a `ConvTransposeNd` with `groups > 1`,
    the slice `[:, j]` holds output unit `j` of every group, so the bound is on their
    joint norm.

    **Weight normalisation.** For a layer under
    `torch.nn.utils.parametrizations.weight_norm` (parameters
    `parametrizations.weight.original0` = g and `original1` = v) or the legacy
    `torch.nn.utils.weight_norm` (`weight_g`, `weight_v`), the per-unit norm of the
    effective weight is `|g|`, so g is the constrained tensor (one norm per unit, over
    g's size-1 dims) and v goes to the unconstrained group. This needs the weight-norm
    dim to be the unit dim (`dim=0`, the default, or `dim=1` for `ConvTransposeNd`). Any
    other parametrization of a constrained weight (`orthogonal`, `spectral_norm`, your
    own) raises `ValueError`, since the effective weight is then not a parameter;
    exclude such a layer with an override `{"max_norm": None}`.

    **Overrides.** `overrides` maps module-name patterns (matched with
    `fnmatch.fnmatchcase` against the names of `module.named_modules()`, such as
    `"classifier"`, `"features.0"` or `"blocks.*.attn"`) and module types (such as
    `nn.Conv2d`) to option dicts, e.g. `{"max_norm": 0.25}`, `{"max_norm": None}` to
    leave the layers unconstrained, or `{"norm_type": math.inf}`. An override applies to
    the layers it matches and to every layer inside them. The keys of the winning
    override are combined with this function's keyword arguments (not with a less
    specific override); `{}` means "the keyword arguments", e.g. to re-include a layer
    inside an excluded block. When several overrides match a layer, the most specific
    wins:

    1. a name pattern beats a type;
    2. between name patterns, the one with more literal (non-wildcard) characters wins,
       so `"encoder.head"` beats `"encoder"`, which beats `"*"`; at equal count an exact
       name beats a glob, then the pattern that matches the module nearer the layer
       (itself before its parent) wins;
    3. between types, the one matching the module nearer the layer wins (a type that
       matches the layer itself beats one matching a block around it); on the same
       module, a subclass beats its base class.

    Overrides still tied that set different options raise `ValueError` naming both.

    **Tied weights.** A shared parameter appears once, in the position where
    `module.named_parameters()` first meets it. Its options come from the layers that
    use it as a unit weight (an override beats the keyword arguments); if those
    disagree, `ValueError` names both.

    **Sparse embeddings.** The weights of `Embedding` / `EmbeddingBag` layers with
    `sparse=True` go into groups of their own (same options otherwise), placed after
    all dense groups, so that they can go to an optimizer for sparse gradients. Every
    group is either all-sparse or all-dense, so the first parameter tells which:

    ```python
    sparse = {id(m.weight) for m in model.modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    groups = max_norm_param_groups(model, 1.0)
    dense_opt = MaxNormWrapper(torch.optim.Adam(
        [g for g in groups if id(g["params"][0]) not in sparse], lr=1e-3))
    sparse_opt = MaxNormWrapper(torch.optim.SparseAdam(
        [g for g in groups if id(g["params"][0]) in sparse], lr=1e-3))
    ```

    Args:
        module: the model. Lazy modules must have been initialised first (run a forward
            pass on a sample batch), else `ValueError`.
        max_norm: the bound for every constrained layer that no override covers;
            `None` constrains only the layers that an override gives a `max_norm`.
        overrides: per-layer options, by module-name pattern or module type (see above).
        norm_type: $p$ of the p-norm, as for [`MaxNormWrapper`][maxnorm_optim.MaxNormWrapper].
        min_norm: lower bound, as for [`MaxNormWrapper`][maxnorm_optim.MaxNormWrapper].
        rate: fraction of the way to the bound, as for
            [`MaxNormWrapper`][maxnorm_optim.MaxNormWrapper].
        error_if_nonfinite: as for [`MaxNormWrapper`][maxnorm_optim.MaxNormWrapper].

    Returns:
        Param-group dicts for any `torch.optim.Optimizer` and for `MaxNormWrapper`,
            each parameter in exactly one group, empty groups left out. Constrained
            groups carry `max_norm`, `norm_dim`, `norm_type`, `min_norm`, `rate` and
            `error_if_nonfinite`; unconstrained ones `max_norm=None` only. Order: the
            constrained dense groups (one per distinct combination of options and
            `norm_dim`, in the order their first parameter is met), then the
            unconstrained dense group, then the sparse groups in the same order.
            Within a group, parameters are in `named_parameters()` order.

    Raises:
        TypeError: `module` is not an `nn.Module`, or an option, override key or
            override value has the wrong type.
        ValueError: a bad option value; an override key that is not a max-norm option
            (`norm_dim` included); an override that matches no module, or only modules
            without a constrained weight; tied overrides or tied weights with different
            options; an uninitialised lazy parameter; a constrained weight that is not a
            parameter (a parametrization other than weight norm, the legacy
            `spectral_norm`) or weight-normalised over another dim. Each message names the
            override, the module or the parameter.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> [(g["max_norm"], len(g["params"])) for g in max_norm_param_groups(model, 3.0)]
        [(3.0, 2), (None, 4)]

        Per-layer bounds (EEGNet: 1.0 on the depthwise conv, 0.25 on the classifier,
        nothing on the other layers):

        >>> model = nn.Sequential()
        >>> model.add_module("temporal", nn.Conv2d(1, 8, (1, 33), bias=False))
        >>> model.add_module("depthwise", nn.Conv2d(8, 16, (4, 1), groups=8, bias=False))
        >>> model.add_module("flatten", nn.Flatten())
        >>> model.add_module("classifier", nn.Linear(16 * 32, 3))
        >>> groups = max_norm_param_groups(
        ...     model, None, overrides={"depthwise": {"max_norm": 1.0},
        ...                             "classifier": {"max_norm": 0.25}})
        >>> [(g["max_norm"], [tuple(p.shape) for p in g["params"]]) for g in groups]
        [(1.0, [(16, 1, 4, 1)]), (0.25, [(3, 512)]), (None, [(8, 1, 1, 33), (3,)])]
        >>> from torch.optim import Adam
        >>> from maxnorm_optim import MaxNormWrapper
        >>> opt = MaxNormWrapper(Adam(groups, lr=1e-3))
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"{_WHERE}: module must be an nn.Module, but got {type(module).__name__}")
    keywords = {
        "max_norm": max_norm,
        "min_norm": min_norm,
        "rate": rate,
        "norm_dim": PER_UNIT,
        "norm_type": norm_type,
        "error_if_nonfinite": error_if_nonfinite,
    }
    base_options = parse_options(_WHERE, keywords).as_group()
    base = base_options if base_options["max_norm"] is not None else None
    resolved = _check_overrides(overrides, keywords)

    named_params = list(module.named_parameters(remove_duplicate=False))
    for qual, param in named_params:
        if is_lazy(param):
            raise ValueError(
                f"{_WHERE}: parameter {qual!r} is not initialised yet (a lazy module): run "
                "a forward pass on a sample batch first, so that every lazy module "
                "gets its shape"
            )
    modules = list(module.named_modules(remove_duplicate=False))
    _check_matches(resolved, modules, named_params)

    by_name = dict(modules)
    claims: dict[int, list[_Claim]] = {}
    used: set[str | type] = set()  # overrides matching a module with a unit weight
    for name, mod in modules:
        units = _collect_units(mod, f"{name}." if name else "")
        if not units.entries and units.problem is None:
            continue
        parts = name.split(".") if name else []
        chain = [(".".join(parts[:i]), by_name[".".join(parts[:i])]) for i in range(len(parts) + 1)]
        res = _resolve(chain, resolved, base)
        used.update(res.candidates)
        if units.problem is not None and res.options is not None:
            kind = parametrize.type_before_parametrizations(mod).__name__
            label = repr(name) if name else "(the root module)"
            raise ValueError(
                f"{_WHERE}: {kind} {label} cannot be constrained: {units.problem}. Remove "
                "that, or leave the layer unconstrained with "
                f"overrides={{{name!r}: {{'max_norm': None}}}}"
            )
        for qual, weight, norm_dim in units.entries:
            options = None if res.options is None else {**res.options, "norm_dim": norm_dim}
            claim_key = None if options is None else _group_key(options)
            claims.setdefault(id(weight), []).append(_Claim(claim_key, qual, res.winner))
    for pattern in resolved:
        if pattern not in used:
            raise ValueError(
                f"{_WHERE}: override {_label(pattern)} matches only modules without a weight "
                "that max_norm_param_groups constrains (biases, norm-layer gains and "
                "unknown layers are never constrained); build that param group by hand"
            )

    sparse = {
        id(m.weight)
        for _, m in modules
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        and m.sparse
        and isinstance(m._parameters.get("weight"), Tensor)
    }
    buckets: dict[tuple[bool, tuple[tuple[str, Any], ...] | None], list[Tensor]] = {}
    seen: set[int] = set()
    for _, param in named_params:
        if id(param) in seen:
            continue
        seen.add(id(param))
        key = _decide(claims.get(id(param), []))
        buckets.setdefault((id(param) in sparse, key), []).append(param)

    groups: list[dict[str, Any]] = []
    for want_sparse in (False, True):
        for (is_sparse, key), params in buckets.items():
            if is_sparse == want_sparse and key is not None:
                options = dict(key)
                groups.append({"params": params, **{k: options[k] for k in base_options}})
        rest = buckets.get((want_sparse, None))
        if rest:
            groups.append({"params": rest, "max_norm": None})
    return groups


@dataclass
class _Claim:
    """A layer's claim on one of its unit weights."""

    key: tuple[tuple[str, Any], ...] | None  # its options (None: unconstrained)
    name: str  # the parameter's qualified name there
    override: str | type | None  # the override that gave them; None: the keyword arguments


def _group_key(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))


def _decide(claims: list[_Claim]) -> tuple[tuple[str, Any], ...] | None:
    """The options of a (possibly tied) parameter from every layer's claim on it."""
    if not claims:
        return None
    strongest = [c for c in claims if c.override is not None] or claims
    first = strongest[0]
    for other in strongest[1:]:
        if other.key != first.key:

            def via(c: _Claim) -> str:
                return "" if c.override is None else f" (override {_label(c.override)})"

            raise ValueError(
                f"{_WHERE}: a tied parameter is both {first.name!r}{via(first)} and "
                f"{other.name!r}{via(other)}, which give it different options; give both "
                "layers the same options"
            )
    return first.key


def _check_matches(
    resolved: Mapping[str | type, Any],
    modules: list[tuple[str, nn.Module]],
    named_params: Sequence[tuple[str, Tensor]],
) -> None:
    """Every override must match some module."""
    for key in resolved:
        if isinstance(key, str):
            if any(fnmatchcase(name, key) for name, _ in modules):
                continue
            hint = ""
            if any(fnmatchcase(q, key) for q, _ in named_params):
                hint = " (patterns match module names, not parameter names)"
            names = [name for name, _ in modules if name][:8]
            raise ValueError(
                f"{_WHERE}: override {key!r} matches no module of the model{hint}; module "
                f"names look like {names}"
            )
        if not any(isinstance(mod, key) for _, mod in modules):
            raise ValueError(f"{_WHERE}: override {_label(key)}: the model has no {key.__name__}")

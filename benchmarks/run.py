"""The benchmark sections: dense cells against peers, scaling sweeps, the sparse
embedding step and full training steps.

Dense cells (one list of weights, one share of slices over the bound): the
projections work in place, so every timed statement but the floor starts with
``rearm()``, which writes the saved out-of-bound rows back (one ``index_copy_`` per
slice length); ``rearm()`` alone is timed in the same rounds and subtracted, round by
round. Every method is first run once from the armed state and checked (largest norm
after, in-bound slices unchanged, over-bound slices at the bound), and ``rearm()`` is
checked to restore the weights bitwise.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maxnorm_optim import MaxNormWrapper, max_norm_

from .models import (
    DENSE_FAMILIES,
    MAX_NORM,
    TRAIN_MAX_NORM,
    Family,
    build_dense,
    build_embedding_sparse,
    build_family,
    build_training_model,
    sweep_sizes,
)
from .peers import (
    DENSE_PEERS,
    compile_snippet,
    read_floor,
    renorm_each_,
    snippet_,
    touched_rows_snippet_,
)
from .timing import Settings, diff, peak_extra_bytes, ratio, rounds_ms, spread

__all__ = ["FRACTIONS", "METHODS", "OURS", "SECTIONS", "Settings", "machine_info", "run_all"]

FRACTIONS = (0.0, 0.01, 0.5)
SWEEP_FRACTION = 0.01
SPARSE_FRACTIONS = (0.01, 0.5)
TOUCHED_ROWS = 4096
OURS = ("wrapper", "max_norm_")  # wrapper: opt.project() on a MaxNormWrapper built once
METHODS = ("floor", *DENSE_PEERS, "max_norm_", "wrapper")
SECTIONS = ("families", "scaling", "sparse", "training")
TRAIN_LR = 1e-3
# The sparse and training sections compare small differences between two step times:
# they run this many times the rounds.
STEP_ROUNDS_FACTOR = 3
# Relative tolerance of the result checks (float32 norms).
RTOL = 1e-5


def machine_info(settings: Settings) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        commit = ""
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(settings.device),
        "threads": settings.threads,
        "quick": settings.quick,
        "min_run_time_s": settings.min_run_time,
        "rounds": settings.rounds,
        "clock": settings.clock,
        "compile": settings.compile,
        "compile_max_tensors": settings.compile_max_tensors,
        "git_commit": commit,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if settings.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(settings.device)
    return info


def _split(params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Constrained weights (2-d and more) and the other parameters."""
    return [p for p in params if p.dim() > 1], [p for p in params if p.dim() <= 1]


def _wrapper_groups(weights: list[Tensor], others: list[Tensor], c: float) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = [{"params": weights, "max_norm": c}]
    if others:
        groups.append({"params": others})
    return groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loglog_slope(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(y) against log(x) over the resolved points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def _median(s: dict[str, Any] | None) -> float | None:
    return None if s is None else s["median"]


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.compiles = 0  # compiled peers built so far (for --compile first)
        self.compile_startup_s: float | None = None

    def _compile_startup(self) -> float:
        """Compile the snippet once for a tiny tensor, so that the one-time start-up of
        the compiler (imports, worker processes) is not charged to the first cell."""
        fn = compile_snippet(MAX_NORM)
        start = time.perf_counter()
        fn([torch.randn(4, 4, device=self.device)])
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.log(f"  torch.compile start-up (a 4x4 tensor): {elapsed:.2f} s")
        return elapsed

    @property
    def device(self) -> torch.device:
        return self.s.device

    def log(self, msg: str) -> None:
        self.s.log(msg)

    # -- dense -------------------------------------------------------------------------
    def _compile_for(self, fam: Family) -> tuple[Callable[[], None] | None, dict[str, Any]]:
        """The compiled peer for ``fam.weights`` and what its first call (compile) took."""
        n = len(fam.weights)
        if self.s.compile == "none" or (self.s.compile == "first" and self.compiles):
            return None, {"skipped": f"--compile {self.s.compile}"}
        if n > self.s.compile_max_tensors:
            return None, {"skipped": f"{n} tensors > --compile-max-tensors"}
        if not self.compiles:
            self.compile_startup_s = self._compile_startup()
        self.compiles += 1
        fn = compile_snippet(MAX_NORM)
        ws = fam.weights
        fam.rearm()
        try:
            start = time.perf_counter()
            fn(ws)
            _sync(self.device)
            first = time.perf_counter() - start
            start = time.perf_counter()
            fn(ws)
            _sync(self.device)
            second = time.perf_counter() - start
        except Exception as exc:  # a peer that fails is a result, not a harness error
            self.log(f"  {fam.name}: torch.compile peer failed: {exc!r}")
            return None, {"error": repr(exc)[:2000]}
        fam.rearm()
        self.log(f"  {fam.name}: torch.compile first call {first:.2f} s")
        return (lambda: fn(ws)), {"first_call_s": first, "second_call_ms": second * 1e3}

    def _check(self, fam: Family, op: Callable[[], object], before: list[Tensor]) -> dict[str, Any]:
        """Run ``op`` once from the armed state; what it did to the slices."""
        fam.rearm()
        op()
        worst, over_err, changed, in_bound_changed = 0.0, 0.0, 0, 0
        # How far under the bound a scaled slice may land: the methods' own rounding
        # (RTOL), and max_norm_'s aim, which stays under c by up to about length * u
        # where its factors come from the check norm and that norm's proven error bound.
        rtol = RTOL
        for buf in fam.buffers:
            rtol = max(rtol, 1e-5 + buf.shape[1] * torch.finfo(buf.dtype).eps)
        for buf, idx, ref in zip(fam.buffers, fam.over, before):
            rows_changed = (buf != ref).any(dim=1)
            mask = torch.zeros(buf.shape[0], dtype=torch.bool, device=buf.device)
            mask[idx] = True
            changed += int(rows_changed.sum())
            in_bound_changed += int((rows_changed & ~mask).sum())
            norms = torch.linalg.vector_norm(buf, dim=1)
            worst = max(worst, float(norms.max()))
            if idx.numel():
                over_err = max(over_err, float((norms[idx] - MAX_NORM).abs().max()) / MAX_NORM)
        fam.rearm()
        if not all(torch.equal(b, r) for b, r in zip(fam.buffers, before)):
            raise AssertionError(f"{fam.name}: rearm() does not restore the weights")
        ok = worst <= MAX_NORM * (1 + RTOL) and in_bound_changed == 0 and over_err <= rtol
        return {
            "max_norm_after": worst,
            "slices_changed": changed,
            "in_bound_slices_changed": in_bound_changed,
            "over_bound_max_rel_err": over_err,
            "correct": ok,
        }

    def bench_family(
        self, fam: Family, fractions: Sequence[float], kind: str = "dense"
    ) -> dict[str, Any]:
        ws = fam.weights
        opt = MaxNormWrapper(torch.optim.SGD(_wrapper_groups(ws, fam.others, MAX_NORM), lr=0.0))
        opt.project()  # built once, as in training: its cached state is reused
        ops: dict[str, Callable[[], object]] = {
            "floor": lambda: read_floor(ws),
            "renorm_": lambda: renorm_each_(ws, MAX_NORM),
            "snippet": lambda: snippet_(ws, MAX_NORM),
        }
        compiled, compile_info = self._compile_for(fam)
        if compiled is not None:
            ops["compiled"] = compiled
        ops["max_norm_"] = lambda: max_norm_(ws, MAX_NORM)
        ops["wrapper"] = opt.project
        cases = [self._cell(fam, f, ops) for f in fractions]
        shapes = sorted({tuple(w.shape) for w in ws})
        return {
            "kind": kind,
            "num_weights": len(ws),
            "weight_shapes": [list(s) for s in shapes],
            "slices": fam.slices,
            "weight_bytes": fam.weight_bytes,
            "numel": sum(w.numel() for w in ws),
            "compile": compile_info,
            "cases": cases,
        }

    def _cell(
        self, fam: Family, fraction: float, ops: dict[str, Callable[[], object]]
    ) -> dict[str, Any]:
        fam.set_fraction(fraction)
        before = [b.clone() for b in fam.buffers]
        checks = {m: self._check(fam, op, before) for m, op in ops.items() if m != "floor"}
        del before
        for m in OURS:
            if not checks[m]["correct"]:
                raise AssertionError(f"{fam.name} {fraction:.0%}: {m} result wrong: {checks[m]}")
        for m, chk in checks.items():
            if not chk["correct"]:
                self.log(f"  {fam.name} {fraction:.0%}: peer {m} result differs: {chk}")
        peaks = {}
        for m, op in ops.items():
            fam.rearm()
            peaks[m] = peak_extra_bytes(op, self.device)
        fam.rearm()
        fns: dict[str, Callable[[], object]] = {"rearm": fam.rearm, "floor": ops["floor"]}
        for m, op in ops.items():
            if m != "floor":
                fns[m] = lambda op=op: (fam.rearm(), op())
        raw = rounds_ms(fns, self.s)
        fam.rearm()
        methods = list(ops)
        net = {m: diff(raw[m], raw["rearm"]) for m in methods if m != "floor"}
        net["floor"] = list(raw["floor"])
        time_ms = {m: spread(net[m]) for m in methods}
        peers = [p for p in DENSE_PEERS if p in methods and time_ms[p] is not None]
        best = min(peers, key=lambda p: time_ms[p]["median"]) if peers else None
        ratios = {o: {p: spread(ratio(net[o], net[p])) for p in peers} for o in OURS}
        cell = {
            "fraction": fraction,
            "slices_over": fam.slices_over,
            "rearm_ms": spread(raw["rearm"]),
            "time_ms": time_ms,
            "x_floor": {m: spread(ratio(net[m], net["floor"])) for m in methods if m != "floor"},
            "ratios": ratios,
            "best_peer": best,
            "vs_best_peer": {o: ratios[o][best] if best else None for o in OURS},
            "peak_extra_bytes": peaks,
            "checks": checks,
            "rounds_ms": raw,
        }
        self.log(
            f"  {fam.name} {fraction:>4.0%}: "
            + ", ".join(f"{m} {_median(time_ms[m]) or 0:.3f}" for m in methods)
            + " ms; wrapper / best peer "
            + (f"{cell['vs_best_peer']['wrapper']['median']:.2f}" if best and
               cell["vs_best_peer"]["wrapper"] else "-")
        )  # fmt: skip
        return cell

    def families(self, names: Sequence[str]) -> dict[str, Any]:
        out = {}
        for name in names:
            start = time.perf_counter()
            fam = build_dense(name, self.device, self.s.quick)
            out[name] = self.bench_family(fam, FRACTIONS)
            del fam
            self.log(f"  ({name}: {time.perf_counter() - start:.1f} s)")
        return out

    def scaling(self) -> dict[str, Any]:
        sides, counts = sweep_sizes(self.s.quick)
        single, many = [], []
        for n in sides:
            start = time.perf_counter()
            fam = build_family(f"single {n}x{n}", [(n, n)], [], self.device)
            single.append({"side": n, **self.bench_family(fam, (SWEEP_FRACTION,), "sweep")})
            del fam
            self.log(f"  (single {n}^2: {time.perf_counter() - start:.1f} s)")
        for k in counts:
            start = time.perf_counter()
            fam = build_family(f"{k} x 64x64", [(64, 64)] * k, [], self.device)
            many.append({"count": k, **self.bench_family(fam, (SWEEP_FRACTION,), "sweep")})
            del fam
            self.log(f"  ({k} x 64^2: {time.perf_counter() - start:.1f} s)")
        slopes = {}
        for key, rows, xkey in (("single", single, "numel"), ("many", many, "count")):
            slopes[key] = {
                m: _loglog_slope(
                    [r[xkey] for r in rows],
                    [_median(r["cases"][0]["time_ms"].get(m)) for r in rows],
                )
                for m in METHODS
            }
        return {"fraction": SWEEP_FRACTION, "single": single, "many": many, "loglog_slope": slopes}

    # -- sparse ------------------------------------------------------------------------
    def sparse(self) -> dict[str, Any]:
        """SparseAdam on Embedding(1e6, 64), 4096 touched rows, in a steady state: a
        bare step, a wrapper step, and a bare step + the hand-written touched-rows
        projection, each on its own copy of the table (a write by anything but a copy's
        own optimizer would, rightly, make the wrapper project the whole table)."""
        touched = TOUCHED_ROWS
        cases = []
        for fraction in SPARSE_FRACTIONS:
            (wb, ww, ws), idx = build_embedding_sparse(
                self.device, self.s.quick, touched, fraction
            )
            w = wb
            bare = torch.optim.SparseAdam([wb], lr=1e-3)
            wrapped = MaxNormWrapper(torch.optim.SparseAdam([ww], lr=1e-3), max_norm=MAX_NORM)
            snip = torch.optim.SparseAdam([ws], lr=1e-3)
            wrapped.step()  # the first step projects the whole table; later ones the touched rows

            def snippet_step(opt: torch.optim.Optimizer = snip, w: Tensor = ws) -> None:
                opt.step()
                touched_rows_snippet_(w, MAX_NORM)

            probe = wb.detach().clone()
            probe.grad = wb.grad
            torch.optim.SparseAdam([probe], lr=1e-3).step()
            rows_over = int((torch.linalg.vector_norm(probe[idx], dim=1) > MAX_NORM).sum())
            del probe
            worst = {}
            for name, fn, t in (("wrapper", wrapped.step, ww), ("snippet", snippet_step, ws)):
                fn()
                worst[name] = float(torch.linalg.vector_norm(t.detach()[idx], dim=1).max())
                if worst[name] > MAX_NORM * (1 + RTOL):
                    raise AssertionError(f"sparse: {name} leaves a norm {worst[name]} > bound")
            bare.step()  # its state exists before the peak is measured, as the others'
            peaks = {
                name: peak_extra_bytes(op, self.device)
                for name, op in (("bare", bare.step), ("wrapper", wrapped.step),
                                 ("snippet", snippet_step))
            }  # fmt: skip
            raw = rounds_ms(
                {"bare": bare.step, "wrapper": wrapped.step, "snippet": snippet_step},
                self.s,
                STEP_ROUNDS_FACTOR * self.s.rounds,
            )
            step = raw["bare"]
            added = {
                m: [a - b for a, b in zip(raw[m], raw["bare"])] for m in ("wrapper", "snippet")
            }
            case = {
                "fraction": fraction,
                "touched_rows": touched,
                "rows_over_after_step": rows_over,
                "step_ms": spread(step),
                "added_ms": {m: spread(v) for m, v in added.items()},
                "added_vs_step": {m: spread(ratio(v, step)) for m, v in added.items()},
                "wrapper_vs_snippet": spread(
                    ratio(diff(raw["wrapper"], raw["bare"]), diff(raw["snippet"], raw["bare"]))
                ),
                "max_norm_after": worst,
                "peak_extra_bytes": peaks,
                "rounds_ms": raw,
            }
            self.log(
                f"  sparse {fraction:>4.0%}: SparseAdam step {_median(case['step_ms']) or 0:.3f}"
                f" ms, added: wrapper {_median(case['added_ms']['wrapper']):.3f} ms, "
                f"snippet {_median(case['added_ms']['snippet']):.3f} ms"
            )
            cases.append(case)
            del wb, ww, ws, bare, wrapped, snip
        return {
            "weight_shape": list(w.shape),
            "weight_bytes": w.numel() * w.element_size(),
            "optimizer": "SparseAdam(lr=1e-3)",
            "cases": cases,
        }

    # -- training ----------------------------------------------------------------------
    def training(self, name: str) -> dict[str, Any]:
        """Forward, backward, ``step()``, ``zero_grad()`` with fused Adam: bare, wrapped,
        and bare with the corrected snippet after ``step()`` (three identical models,
        each cycling through the same few random batches)."""
        c = TRAIN_MAX_NORM
        models, batches = build_training_model(name, self.device, self.s.quick, copies=3)
        bare = torch.optim.Adam(models[0].parameters(), lr=TRAIN_LR, fused=True)
        weights, others = _split(list(models[1].parameters()))
        wrapped = MaxNormWrapper(
            torch.optim.Adam(_wrapper_groups(weights, others, c), lr=TRAIN_LR, fused=True)
        )
        snip_weights, _ = _split(list(models[2].parameters()))
        snip = torch.optim.Adam(models[2].parameters(), lr=TRAIN_LR, fused=True)

        def make_step(
            model: nn.Module, opt: torch.optim.Optimizer, after: Callable[[], None] | None = None
        ) -> Callable[[], None]:
            data = itertools.cycle(batches)

            def train_step() -> None:
                x, y = next(data)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if after is not None:
                    after()
                opt.zero_grad()

            return train_step

        fns: dict[str, Callable[[], object]] = {
            "bare": make_step(models[0], bare),
            "wrapper": make_step(models[1], wrapped),
            "snippet": make_step(models[2], snip, lambda: snippet_(snip_weights, c)),
        }
        for fn in fns.values():
            for _ in range(3):
                fn()
        raw = rounds_ms(fns, self.s, STEP_ROUNDS_FACTOR * self.s.rounds)
        # What the constraint did at the end of the run: one more step of the snippet
        # model, counting the rows over the bound before its projection.
        x, y = batches[0]
        F.cross_entropy(models[2](x), y).backward()
        snip.step()
        with torch.no_grad():
            over = sum(int((w.flatten(1).norm(dim=1) > c).sum()) for w in snip_weights)
        snippet_(snip_weights, c)
        snip.zero_grad()
        worst = max(float(w.detach().flatten(1).norm(dim=1).max()) for w in weights)
        if worst > c * (1 + RTOL):
            raise AssertionError(f"training {name}: wrapper leaves a norm {worst} > {c}")
        slices = sum(w.shape[0] for w in weights)
        overhead = {m: [(a - b) / b for a, b in zip(raw[m], raw["bare"])] for m in ("wrapper",
                    "snippet")}  # fmt: skip
        out = {
            "batch": int(x.shape[0]),
            "input_shape": list(x.shape[1:]),
            "base": f"Adam(lr={TRAIN_LR}, fused=True)",
            "max_norm": c,
            "constrained_weights": len(weights),
            "slices": slices,
            "slices_over_per_step": over,
            "time_ms": {m: spread(v) for m, v in raw.items()},
            "overhead": {m: spread(v) for m, v in overhead.items()},
            "wrapper_vs_snippet_overhead": spread(
                ratio(diff(raw["wrapper"], raw["bare"]), diff(raw["snippet"], raw["bare"]))
            ),
            "rounds_ms": raw,
        }
        self.log(
            f"  training {name}: bare {_median(out['time_ms']['bare']):.2f} ms, overhead "
            f"wrapper {100 * _median(out['overhead']['wrapper']):.2f} %, snippet "
            f"{100 * _median(out['overhead']['snippet']):.2f} %"
        )
        return out


def _brief(s: dict[str, Any] | None) -> dict[str, float] | None:
    return None if s is None else {k: s[k] for k in ("median", "min", "max")}


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell: ours (wrapper and ``max_norm_``) / the fastest peer of that cell."""
    rows = []
    cells: list[tuple[str, dict[str, Any]]] = list(results.get("families", {}).items())
    scaling = results.get("scaling", {})
    cells += [(f"single {r['side']}^2", r) for r in scaling.get("single", [])]
    cells += [(f"{r['count']} x 64^2", r) for r in scaling.get("many", [])]
    for name, fam in cells:
        for c in fam["cases"]:
            best = c["best_peer"]
            rows.append(
                {
                    "cell": name,
                    "fraction": c["fraction"],
                    "best_peer": best,
                    "best_peer_ms": _median(c["time_ms"][best]) if best else None,
                    "wrapper_ms": _median(c["time_ms"]["wrapper"]),
                    "wrapper_x_floor": _brief(c["x_floor"]["wrapper"]),
                    "wrapper_vs_best_peer": _brief(c["vs_best_peer"]["wrapper"]),
                    "max_norm__vs_best_peer": _brief(c["vs_best_peer"]["max_norm_"]),
                }
            )
    return rows


def run_all(
    settings: Settings,
    sections: Sequence[str] = SECTIONS,
    families: Sequence[str] = DENSE_FAMILIES,
) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    bench = Bench(settings)
    results: dict[str, Any] = {"machine": machine_info(settings)}
    results["machine"]["sections"] = list(sections)
    timings: dict[str, float] = {}
    for section in SECTIONS:
        if section not in sections:
            continue
        start = time.perf_counter()
        settings.log(f"== {section}")
        if section == "families":
            results["families"] = bench.families(families)
        elif section == "scaling":
            results["scaling"] = bench.scaling()
        elif section == "sparse":
            results["sparse"] = bench.sparse()
        else:
            results["training"] = {n: bench.training(n) for n in ("mlp", "small_cnn")}
        timings[section] = round(time.perf_counter() - start, 1)
        settings.log(f"   ({section}: {timings[section]} s)")
    results["machine"]["section_wall_s"] = timings
    results["machine"]["compile_startup_s"] = bench.compile_startup_s
    results["summary"] = summary(results)
    return results

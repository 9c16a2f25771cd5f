"""Printed tables (``results.txt``), ``results.json`` and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .peers import DENSE_PEERS
from .run import METHODS

__all__ = ["PLOTS", "format_report", "write_json", "write_plots"]

PLOTS = ("families.png", "scaling.png", "overhead.png")
COLORS = {
    "floor": "0.55",
    "renorm_": "tab:orange",
    "snippet": "tab:green",
    "compiled": "tab:purple",
    "max_norm_": "tab:cyan",
    "wrapper": "tab:blue",
}

Stat = dict[str, Any] | None


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if abs(v) >= 10**digits:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def _med(s: Stat, digits: int = 3) -> str:
    return "-" if s is None else _num(s["median"], digits)


def _spread(s: Stat, digits: int = 3, scale: float = 1.0) -> str:
    """``median [min, max]``, or ``-``; unresolved rounds are counted after a ``?``."""
    if s is None:
        return "-"
    text = (
        f"{_num(scale * s['median'], digits)} "
        f"[{_num(scale * s['min'], digits)}, {_num(scale * s['max'], digits)}]"
    )
    return text + (f" ?{s['unresolved']}" if s.get("unresolved") else "")


def _range(s: Stat) -> str:
    return "-" if s is None else f"{_num(s['min'])}-{_num(s['max'])}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = [" | ".join(h.rjust(w) for h, w in zip(header, widths))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return out


def _compile_note(info: dict[str, Any]) -> str:
    if "first_call_s" in info:
        return f"torch.compile first call (compile) {info['first_call_s']:.2f} s"
    if "error" in info:
        return f"torch.compile peer FAILED: {info['error'][:200]}"
    return f"torch.compile peer skipped ({info.get('skipped', '?')})"


def _check_note(chk: dict[str, Any] | None) -> str:
    if chk is None:
        return ""
    if chk["correct"]:
        return "ok"
    return (
        f"max norm {chk['max_norm_after']:.6g}, {chk['in_bound_slices_changed']} in-bound "
        f"changed, over-bound rel. err {chk['over_bound_max_rel_err']:.2g}"
    )


def _header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    return [
        f"maxnorm-optim benchmarks ({'quick' if m['quick'] else 'full'} run, "
        f"{m['date_utc']} UTC, {m.get('wall_s', '?')} s)",
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", torch {m['torch']}, {m['threads']} thread(s), git {m['git_commit'] or '?'}",
        f"timing: torch.utils.benchmark blocked_autorange(min_run_time={m['min_run_time_s']})"
        f" medians, {m['rounds']} interleaved rounds, clock: {m['clock']}. A time is the median"
        " over rounds of (statement - re-arm) from the same round; a ratio is computed per"
        " round from that round's medians and shown as median [min, max] over rounds"
        " (?n: n rounds where a difference was not above zero).",
        "methods: floor = torch._foreach_norm(weights), one read, no write; renorm_ ="
        " w.renorm_(2, 0, c) per tensor (scales by c/(n+1e-7): a cost peer only); snippet ="
        " corrected forum snippet, eager, per tensor; compiled = torch.compile of the snippet"
        " over the list (compile time excluded, shown apart); max_norm_ = max_norm_(weights,"
        " c); wrapper = opt.project() on a MaxNormWrapper(SGD) built once. Best peer: the"
        " fastest of renorm_, snippet, compiled in the cell (by median).",
        *_compile_header(m),
        "",
    ]


def _compile_header(m: dict[str, Any]) -> list[str]:
    if m.get("compile_startup_s") is None:
        return []
    cache = m.get("compile_cache", {})
    return [
        f"torch.compile: start-up {m['compile_startup_s']:.2f} s (one compile of a 4x4 tensor"
        " first, charged to no cell); each cell's compile time is its first call, with "
        f"FX graph cache {cache.get('TORCHINDUCTOR_FX_GRAPH_CACHE', '?')}, AOTAutograd cache "
        f"{cache.get('TORCHINDUCTOR_AUTOGRAD_CACHE', '?')}, cache dir: "
        f"{cache.get('cache_dir', '?')}."
    ]


def _family_table(name: str, fam: dict[str, Any]) -> list[str]:
    shapes = ", ".join("x".join(map(str, s)) for s in fam["weight_shapes"])
    lines = [
        f"== {name}: {fam['num_weights']} weight(s) ({shapes}), {fam['slices']} slices, "
        f"{_bytes(fam['weight_bytes'])}; {_compile_note(fam['compile'])} =="
    ]
    header = ["over", "method", "ms", "ms min-max", "x floor", "wrapper / this",
              "max_norm_ / this", "peak extra", "result"]  # fmt: skip
    rows = []
    for c in fam["cases"]:
        for k, m in enumerate(c["time_ms"]):
            rows.append(
                [
                    f"{c['fraction']:.0%} ({c['slices_over']})" if k == 0 else "",
                    m + (" *" if m == c["best_peer"] else ""),
                    _med(c["time_ms"][m], 4),
                    _range(c["time_ms"][m]),
                    "1" if m == "floor" else _spread(c["x_floor"].get(m)),
                    _spread(c["ratios"]["wrapper"].get(m)) if m in DENSE_PEERS else "",
                    _spread(c["ratios"]["max_norm_"].get(m)) if m in DENSE_PEERS else "",
                    _bytes(c["peak_extra_bytes"][m]),
                    _check_note(c["checks"].get(m)),
                ]
            )
    lines += _table(header, rows)
    lines.append("(* best peer of the cell)")
    return lines


def _summary_table(results: dict[str, Any]) -> list[str]:
    lines = ["== ours / best peer, per cell (median [min, max] of the per-round ratio) =="]
    header = ["cell", "over", "best peer", "best peer ms", "wrapper ms", "wrapper / best peer",
              "max_norm_ / best peer", "wrapper x floor"]  # fmt: skip
    rows = [
        [
            r["cell"],
            f"{r['fraction']:.0%}",
            r["best_peer"] or "-",
            _num(r["best_peer_ms"], 4),
            _num(r["wrapper_ms"], 4),
            _spread(r["wrapper_vs_best_peer"]),
            _spread(r["max_norm__vs_best_peer"]),
            _spread(r["wrapper_x_floor"]),
        ]
        for r in results["summary"]
    ]
    return lines + _table(header, rows) if rows else []


def _scaling_tables(sc: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, label, xkey in (
        ("single", "one square tensor, side", "side"),
        ("many", "number of 64x64 tensors", "count"),
    ):
        lines.append(
            f"== scaling: {label} vs time (ms, {sc['fraction']:.0%} of slices over; "
            "last row: log-log slope of time against the numel / count) =="
        )
        header = [xkey, "MiB", *METHODS, "wrapper / best peer", "compile s"]
        rows = []
        for r in sc[key]:
            c = r["cases"][0]
            rows.append(
                [
                    str(r[xkey]),
                    f"{r['weight_bytes'] / 2**20:.3g}",
                    *[_med(c["time_ms"].get(m), 4) for m in METHODS],
                    _spread(c["vs_best_peer"]["wrapper"]),
                    _num(r["compile"].get("first_call_s"), 3),
                ]
            )
        slope = sc["loglog_slope"][key]
        rows.append(["slope", "", *[_num(slope.get(m), 2) for m in METHODS], "", ""])
        lines += [*_table(header, rows), ""]
    return lines


def _sparse_table(sp: dict[str, Any]) -> list[str]:
    lines = [
        f"== sparse: Embedding{tuple(sp['weight_shape'])}, {sp['optimizer']} touching "
        f"{sp['cases'][0]['touched_rows']} rows; added = (X - bare step) per round =="
    ]
    header = ["touched rows over", "SparseAdam step ms", "added by wrapper ms",
              "wrapper added / step", "added by snippet ms", "snippet added / step",
              "wrapper added / snippet added", "peak extra bare / wrapper / snippet"]  # fmt: skip
    rows = [
        [
            f"{c['fraction']:.0%} ({c['rows_over_after_step']}/{c['touched_rows']})",
            _spread(c["step_ms"], 4),
            _spread(c["added_ms"]["wrapper"]),
            _spread(c["added_vs_step"]["wrapper"]),
            _spread(c["added_ms"]["snippet"]),
            _spread(c["added_vs_step"]["snippet"]),
            _spread(c["wrapper_vs_snippet"]),
            " / ".join(_bytes(c["peak_extra_bytes"][k]) for k in ("bare", "wrapper", "snippet")),
        ]
        for c in sp["cases"]
    ]
    return lines + _table(header, rows)


def _training_table(tr: dict[str, Any]) -> list[str]:
    lines = [
        "== training step (forward, backward, step(), zero_grad()); overhead = (X - bare) / "
        "bare per round =="
    ]
    header = ["model", "batch", "base", "max_norm", "slices over / step", "bare ms",
              "wrapper ms", "snippet ms", "wrapper overhead %", "snippet overhead %",
              "wrapper ovh / snippet ovh"]  # fmt: skip
    rows = [
        [
            name,
            str(t["batch"]),
            t["base"],
            str(t["max_norm"]),
            f"{t['slices_over_per_step']}/{t['slices']}",
            _spread(t["time_ms"]["bare"], 4),
            _med(t["time_ms"]["wrapper"], 4),
            _med(t["time_ms"]["snippet"], 4),
            _spread(t["overhead"]["wrapper"], 3, 100.0),
            _spread(t["overhead"]["snippet"], 3, 100.0),
            _spread(t["wrapper_vs_snippet_overhead"]),
        ]
        for name, t in tr.items()
    ]
    return lines + _table(header, rows)


def format_report(results: dict[str, Any]) -> str:
    lines = _header(results)
    for name, fam in results.get("families", {}).items():
        lines += [*_family_table(name, fam), ""]
    if results.get("summary"):
        lines += [*_summary_table(results), ""]
    if "scaling" in results:
        lines += _scaling_tables(results["scaling"])
    if "sparse" in results:
        lines += [*_sparse_table(results["sparse"]), ""]
    if "training" in results:
        lines += [*_training_table(results["training"]), ""]
    return "\n".join(lines).rstrip()


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")


# -- plots -------------------------------------------------------------------------------
def _title(results: dict[str, Any]) -> str:
    m = results["machine"]
    return (
        f"maxnorm-optim on {m['device']} ({m['cpu']}, {m['threads']} thread(s), torch "
        f"{m['torch']}, git {m['git_commit'] or '?'}){' - QUICK run' if m['quick'] else ''}"
    )


def _err(stats: list[Stat]) -> tuple[list[float], list[list[float]]]:
    vals = [s["median"] if s else float("nan") for s in stats]
    lo = [s["median"] - s["min"] if s else 0.0 for s in stats]
    hi = [s["max"] - s["median"] if s else 0.0 for s in stats]
    return vals, [lo, hi]


def _plot_families(results: dict[str, Any], path: Path, plt: Any) -> None:
    from matplotlib.ticker import FormatStrFormatter

    fams = results["families"]
    cols = 3
    nrows = (len(fams) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.4 * cols, 4.2 * nrows), squeeze=False)
    flat = list(axes.flat)
    methods = [m for m in METHODS if m != "floor"]
    width = 0.8 / len(methods)
    for ax, (name, fam) in zip(flat, fams.items()):
        cases = fam["cases"]
        for k, m in enumerate(methods):
            xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(cases))]
            vals, err = _err([c["x_floor"].get(m) for c in cases])
            ax.bar(xs, vals, width, yerr=err, color=COLORS[m], label=m, capsize=2)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(cases)), [f"{c['fraction']:.0%} over" for c in cases])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("time / read floor")
        floor = cases[0]["time_ms"]["floor"]
        floor_ms = f", floor {floor['median']:.3g} ms" if floor else ""
        count = fam["num_weights"]
        ax.set_title(
            f"{name} ({count} weight{'s' * (count > 1)}, {_bytes(fam['weight_bytes'])}{floor_ms})",
            fontsize=9,
        )
    for extra in flat[len(fams) :]:
        extra.axis("off")
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(
        "projection time / one read of the weights (median over rounds, bars: min-max)\n"
        + _title(results),
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_scaling(results: dict[str, Any], path: Path, plt: Any) -> None:
    sc = results["scaling"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), squeeze=False)
    for ax, (key, xkey, label) in zip(
        axes.flat,
        (("single", "numel", "elements of one square tensor"),
         ("many", "count", "number of 64x64 tensors")),
    ):  # fmt: skip
        rows = sc[key]
        for m in METHODS:
            pts = [(r[xkey], r["cases"][0]["time_ms"].get(m)) for r in rows]
            pts = [(x, s) for x, s in pts if s is not None]
            if not pts:
                continue
            vals, err = _err([s for _, s in pts])
            slope = sc["loglog_slope"][key].get(m)
            ax.errorbar(
                [x for x, _ in pts], vals, yerr=err, marker="o", ms=4, capsize=2,
                color=COLORS[m], ls="--" if m == "floor" else "-",
                label=m + (f" (slope {slope:.2f})" if slope is not None else ""),
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("ms")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{sc['fraction']:.0%} of slices over", fontsize=9)
    fig.suptitle("scaling (log-log)\n" + _title(results), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_overhead(results: dict[str, Any], path: Path, plt: Any) -> None:
    panels = [k for k in ("sparse", "training") if k in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        if key == "sparse":
            groups = [(f"{c['fraction']:.0%} of touched\nrows over", c["added_vs_step"])
                      for c in results["sparse"]["cases"]]  # fmt: skip
            title = "sparse: added cost / SparseAdam step"
            scale = 1.0
        else:
            groups = [(n, t["overhead"]) for n, t in results["training"].items()]
            title = "training step: overhead over bare (%)"
            scale = 100.0
        for k, m in enumerate(("wrapper", "snippet")):
            stats = [g[1][m] for g in groups]
            vals, err = _err(stats)
            xs = [i + (k - 0.5) * 0.38 for i in range(len(groups))]
            ax.bar(
                xs, [scale * v for v in vals], 0.38, yerr=[[scale * e for e in es] for es in err],
                color=COLORS["wrapper" if m == "wrapper" else "snippet"], capsize=3,
                label="wrapper" if m == "wrapper" else "hand-written snippet",
            )  # fmt: skip
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)), [g[0] for g in groups])
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        "median over rounds of the per-round value, bars: min-max\n" + _title(results),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """The PNGs for the sections present in ``results``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, needs, fn in (
        ("families.png", ("families",), _plot_families),
        ("scaling.png", ("scaling",), _plot_scaling),
        ("overhead.png", ("sparse", "training"), _plot_overhead),
    ):
        if any(k in results for k in needs):
            fn(results, out / name, plt)
            written.append(out / name)
    return written

"""Printed tables, ``results.json`` and the ``results.png`` bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .run import STEPS

__all__ = ["format_report", "write_chart", "write_json"]


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = " | ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [line, "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return out


def format_report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"maxnorm-optim benchmarks  ({'quick' if m['quick'] else 'full'} run, {m['date_utc']} UTC)",
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", torch {m['torch']}, {m['threads']} thread(s), git {m['git_commit'] or '?'}",
        f"timing: torch.utils.benchmark blocked_autorange(min_run_time={m['min_run_time_s']}),"
        f" median, best of {m['rounds']} interleaved round(s), clock: {m['clock']}; times"
        " exclude the re-arm",
        "",
    ]
    for name, fam in results["families"].items():
        lines.append(
            f"== {name}: {fam['num_weights']} weight(s), {fam['slices']} slices, "
            f"{_bytes(fam['weight_bytes'])} =="
        )
        if fam["kind"] == "dense":
            steps = fam["steps_ms"]
            lines.append(
                "optimizer step (all params, ms): "
                + ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
            )
            lines.append(
                f"read floor: {fam['floor_ms']:.3f} ms ({fam['floor_method']}; the fastest of "
                "foreach_norm, per-tensor vector_norm and per-tensor row norms, over all cases)"
            )
            header = [
                "over", "ours ms", "case floor ms", "naive ms", "renorm ms", "ours/floor",
                "ours/floor re-armed",
                "naive/ours", "renorm/ours", *[f"ours/{k}" for k in STEPS], "peak extra",
                "% weights",
            ]  # fmt: skip
            rows = []
            for c in fam["cases"]:
                rows.append(
                    [
                        f"{c['fraction']:.0%} ({c['slices_over']})",
                        f"{c['ours_ms']:.3f}",
                        f"{min(c['floor_ms_this_case'].values()):.3f}",
                        f"{c['naive_ms']:.3f}",
                        f"{c['renorm_ms']:.3f}",
                        f"{c['ours_vs_floor']:.2f}x",
                        f"{c['ours_vs_floor_after_rearm']:.2f}x",
                        f"{c['naive_vs_ours']:.2f}x",
                        f"{c['renorm_vs_ours']:.2f}x",
                        *[f"{c['ours_vs_step'][k]:.2f}x" for k in STEPS],
                        _bytes(c["peak_extra_bytes"]),
                        f"{100 * c['peak_extra_vs_weights']:.3f}%",
                    ]
                )
            lines += _table(header, rows)
        else:
            header = [
                "touched over", "SparseAdam ms", "wrapper step ms", "projection ms",
                "proj/step", "full max_norm_ ms", "full/step", "full naive ms",
                "naive/step", "peak extra (bare / wrapper step)",
            ]  # fmt: skip
            rows = []
            for c in fam["cases"]:
                rows.append(
                    [
                        f"{c['fraction']:.0%} ({c['rows_over_after_step']}/{c['touched_rows']})",
                        f"{c['sparse_adam_step_ms']:.3f}",
                        f"{c['wrapper_step_ms']:.3f}",
                        f"{c['wrapper_projection_ms']:.3f}",
                        f"{c['wrapper_projection_vs_step']:.3f}x",
                        f"{c['full_table_max_norm_ms']:.3f}",
                        f"{c['full_table_vs_step']:.2f}x",
                        f"{c['full_table_naive_ms']:.3f}",
                        f"{c['full_naive_vs_step']:.2f}x",
                        f"{_bytes(c['peak_extra_bytes_bare_step'])} / "
                        f"{_bytes(c['peak_extra_bytes_wrapper_step'])}",
                    ]
                )
            lines += _table(header, rows)
        lines.append("")
    lines.append(
        "== wrapper overhead (base: Adam fused, 1% of slices over; ratios: median over "
        "rounds of the per-round ratio, times: best round) =="
    )
    header = [
        "family", "bare step ms", "bare + max_norm_ ms", "wrapper ms", "wrapper/(bare+max_norm_)",
        "track_stats ms", "track_stats on/off",
    ]  # fmt: skip
    rows = [
        [
            name,
            f"{w['bare_step_ms']:.3f}",
            f"{w['bare_plus_max_norm_ms']:.3f}",
            f"{w['wrapper_step_ms']:.3f}",
            f"{w['wrapper_vs_bare_plus_max_norm']:.3f}",
            f"{w['wrapper_track_stats_step_ms']:.3f}",
            f"{w['track_stats_vs_off']:.3f}",
        ]
        for name, w in results["wrapper"].items()
    ]
    lines += _table(header, rows)
    if "targets" in results:
        lines += ["", "== targets of issue 4 =="]
        rows = [
            [t["target"], f"{t['value']:.3f}", f"{t['op']} {t['bound']}",
             "met" if t["met"] else "MISSED"]
            for t in results["targets"]
        ]  # fmt: skip
        lines += _table(["target", "measured", "goal", ""], rows)
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = results["families"]
    panels = len(fams) + 1
    cols = 3
    nrows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.4 * nrows), squeeze=False)
    flat = list(axes.flat)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, (name, fam) in zip(flat, fams.items()):
        if fam["kind"] == "dense":
            floor = fam["floor_ms"]
            methods = [("ours", "ours_ms"), ("naive loop", "naive_ms"), ("renorm_", "renorm_ms")]
            n = len(fam["cases"])
            width = 0.8 / n
            for k, c in enumerate(fam["cases"]):
                xs = [i + (k - (n - 1) / 2) * width for i in range(len(methods))]
                ax.bar(
                    xs,
                    [c[key] / floor for _, key in methods],
                    width,
                    color=colors[k % len(colors)],
                    label=f"{c['fraction']:.0%} of slices over",
                )
            xs = [len(methods) + i for i in range(len(STEPS))]
            ax.bar(
                xs,
                [fam["steps_ms"][s] / floor for s in STEPS],
                0.6,
                color="0.6",
                label="optimizer step",
            )
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_ylabel(f"time / read floor ({floor:.3g} ms)")
            labels = [m for m, _ in methods] + [f"{s} step" for s in STEPS]
        else:
            labels = ["SparseAdam step", "wrapper projection", "full max_norm_", "full naive"]
            keys = [
                "sparse_adam_step_ms",
                "wrapper_projection_ms",
                "full_table_max_norm_ms",
                "full_table_naive_ms",
            ]
            n = len(fam["cases"])
            width = 0.8 / n
            for k, c in enumerate(fam["cases"]):
                xs = [i + (k - (n - 1) / 2) * width for i in range(len(labels))]
                ax.bar(
                    xs,
                    [c[key] for key in keys],
                    width,
                    color=colors[(k + 1) % len(colors)],
                    label=f"{c['fraction']:.0%} of touched rows over",
                )
            ax.set_ylabel("ms")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{name} ({fam['num_weights']} weights, {_bytes(fam['weight_bytes'])})")
        ax.legend(fontsize=7)
    ax = flat[len(fams)]
    wrap = results["wrapper"]
    labels, vals = [], []
    for name, w in wrap.items():
        labels += [f"{name}\nwrapper / (bare + max_norm_)", f"{name}\ntrack_stats on / off"]
        vals += [w["wrapper_vs_bare_plus_max_norm"], w["track_stats_vs_off"]]
    ax.bar(range(len(vals)), vals, 0.6, color="tab:purple")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(1.05, color="tab:red", lw=0.8, ls=":", label="target 1.05")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, max(1.2, *vals) * 1.1)
    ax.set_title("wrapper overhead (Adam fused, 1% over)")
    ax.legend(fontsize=7)
    for extra in flat[len(fams) + 1 :]:
        extra.axis("off")
    m = results["machine"]
    fig.suptitle(
        f"maxnorm-optim projection cost on {m['device']} ({m['cpu']}, {m['threads']} thread(s), "
        f"torch {m['torch']}, git {m['git_commit'] or '?'}){' - QUICK run' if m['quick'] else ''}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

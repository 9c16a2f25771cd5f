"""Write `docs/performance.md` (and its images) from a saved benchmark run.

    python -m benchmarks                  # -> benchmarks/results/
    python tools/performance_page.py      # -> docs/performance.md, docs/img/benchmark_*

Every number on the page comes from `benchmarks/results/results.json`; the prose
around the tables states only what the numbers show.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("renorm_", "snippet", "compiled")
LABELS = {
    "mlp": "MLP 784-1024-1024-10",
    "big_linear": "4 x Linear(4096, 4096)",
    "many_small": "300 x Linear(64, 64)",
    "small_cnn": "small CNN",
    "embedding": "Embedding(1e6, 64), dense",
}
IMAGES = {
    "families.png": "benchmark_families_cpu.png",
    "scaling.png": "benchmark_scaling_cpu.png",
    "overhead.png": "benchmark_overhead_cpu.png",
}


def _x(stat: dict[str, Any] | None) -> str:
    return "" if not stat or stat.get("median") is None else f"{stat['median']:.2f}"


def _spread(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("median") is None:
        return "n/a"
    return f"{stat['median']:.2f} [{stat['min']:.2f}, {stat['max']:.2f}]"


def _ms(stat: dict[str, Any] | None) -> str:
    return "" if not stat or stat.get("median") is None else f"{stat['median']:.3g}"


def families_table(d: dict[str, Any]) -> tuple[str, list[tuple[str, float, float, float]]]:
    """Two tables (time / floor; ours / best peer) and the cells for the summary."""
    times = [
        "| weights | % over | floor (ms) | `renorm_` | snippet | compiled | `max_norm_` | "
        "wrapper |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = [
        "| weights | % over | best peer | wrapper / best peer | `max_norm_` / best peer |",
        "|---|---:|---|---|---|",
    ]
    cells = []
    for name, fam in d["families"].items():
        for case in fam["cases"]:
            x = case["x_floor"]
            vs = case["vs_best_peer"]
            label = f"{LABELS.get(name, name)} | {case['fraction'] * 100:g}"
            times.append(
                f"| {label} | {_ms(case['time_ms'].get('floor'))} | "
                + " | ".join(_x(x.get(m)) for m in (*PEERS, "max_norm_", "wrapper"))
                + " |"
            )
            ratios.append(
                f"| {label} | `{case['best_peer']}` | {_spread(vs.get('wrapper'))} | "
                f"{_spread(vs.get('max_norm_'))} |"
            )
            w, m = vs.get("wrapper") or {}, vs.get("max_norm_") or {}
            cells.append(
                (
                    f"{LABELS.get(name, name)} at {case['fraction'] * 100:g} %",
                    w.get("median") or float("nan"),
                    m.get("median") or float("nan"),
                    (x.get("wrapper") or {}).get("median") or float("nan"),
                )
            )
    text = (
        "Time as a multiple of the floor (medians over rounds):\n\n"
        + "\n".join(times)
        + "\n\nOurs against the fastest peer of the cell (median [min, max] of the "
        "per-round ratio):\n\n"
        + "\n".join(ratios)
    )
    return text, cells


def compile_table(d: dict[str, Any]) -> str:
    rows = ["| weights | first call (compile) | later calls |", "|---|---:|---:|"]
    for name, fam in d["families"].items():
        c = fam.get("compile", {})
        if "first_call_s" in c:
            rows.append(
                f"| {LABELS.get(name, name)} | {c['first_call_s']:.2f} s | "
                f"{c['second_call_ms']:.3g} ms |"
            )
    return "\n".join(rows)


def scaling_table(d: dict[str, Any], kind: str) -> str:
    sc = d["scaling"]
    key = "side" if kind == "single" else "count"
    methods = ("floor", *PEERS, "max_norm_", "wrapper")
    head = "| side | " if kind == "single" else "| tensors | "
    rows = [head + " | ".join(f"`{m}` (ms)" for m in methods) + " |"]
    rows.append("|---:|" + "---:|" * len(methods))
    for item in sc[kind]:
        t = item["cases"][0]["time_ms"]
        label = f"{item[key]}^2" if kind == "single" else f"{item[key]} x 64x64"
        rows.append(f"| {label} | " + " | ".join(_ms(t.get(m)) for m in methods) + " |")
    slope = sc["loglog_slope"][kind]
    slopes = " | ".join(f"{slope.get(m, float('nan')):.2f}" for m in methods)
    rows.append(f"| log-log slope | {slopes} |")
    return "\n".join(rows)


def sparse_table(d: dict[str, Any]) -> str:
    sp = d["sparse"]
    rows = [
        "| rows over after the step | bare step (ms) | wrapper adds (ms) | "
        "touched-rows snippet adds (ms) | wrapper / snippet (added) |",
        "|---:|---:|---:|---:|---|",
    ]
    for c in sp["cases"]:
        rows.append(
            f"| {c['rows_over_after_step']} of {c['touched_rows']} | {_ms(c['step_ms'])} | "
            f"{_ms(c['added_ms']['wrapper'])} | {_ms(c['added_ms']['snippet'])} | "
            f"{_spread(c['wrapper_vs_snippet'])} |"
        )
    return "\n".join(rows)


def training_table(d: dict[str, Any]) -> str:
    rows = [
        "| model | rows over per step | bare step (ms) | wrapper overhead | "
        "snippet overhead | wrapper / snippet (overhead) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, t in d["training"].items():
        rows.append(
            f"| {LABELS.get(name, name)} (batch {t['batch']}) | {t['slices_over_per_step']} of "
            f"{t['slices']} | {_ms(t['time_ms']['bare'])} | "
            f"{t['overhead']['wrapper']['median'] * 100:.1f} % | "
            f"{t['overhead']['snippet']['median'] * 100:.1f} % | "
            f"{_spread(t['wrapper_vs_snippet_overhead'])} |"
        )
    return "\n".join(rows)


def page(d: dict[str, Any]) -> str:
    m = d["machine"]
    fam_table, cells = families_table(d)
    fastest = [c for c in cells if c[1] <= 1.0]
    slower = [c for c in cells if not c[1] <= 1.0]
    worst = max(slower, key=lambda c: c[1]) if slower else None
    summary = (
        f"On the wrapper's step path the projection is at most the best peer's time in "
        f"{len(fastest)} of {len(cells)} cells (median of the per-round ratios <= 1)."
    )
    if worst is not None:
        summary += (
            f" It is slower in {len(slower)}: "
            + ", ".join(f"{c[0]} ({c[1]:.2f}x)" for c in slower)
            + "."
        )
    return f"""# Performance

The projection runs after every optimizer step. This page compares its cost with what
a user would run instead, measured side by side in one process. Every number below is
from one run of

```bash
python -m benchmarks                  # about 10 minutes; writes benchmarks/results/
python tools/performance_page.py      # writes this page from benchmarks/results/results.json
```

on {m["cpu"]} ({m["logical_cpus"]} logical CPUs, {m["threads"]} thread), torch {m["torch"]},
Python {m["python"]}, commit `{m["git_commit"]}`, {m["date_utc"]} UTC, clock: {m["clock"]}
time. The harness, its options and its method (interleaved rounds, re-arm subtraction,
paired per-round ratios, cold compiles) are described in
[`benchmarks/README.md`](https://github.com/maxnorm-optim/maxnorm-optim/blob/main/benchmarks/README.md).

## What is compared

* **floor**: `torch._foreach_norm(weights)`, one read of the weights and no write;
  times below are multiples of it ("x floor").
* **`renorm_`**: `w.renorm_(2, 0, c)` per tensor. It scales every row over the bound by
  `c / (n + 1e-7)`, so it is a cost peer only.
* **snippet**: the corrected forum snippet per tensor,
  `n = w.norm(2, dim=(1, ...), keepdim=True).clamp(min=c / 2); w *= n.clamp(max=c) / n`.
* **compiled snippet**: `torch.compile` of that snippet over the whole list (its first
  call, the compile, is timed apart).
* **`max_norm_`** and **wrapper** (`MaxNormWrapper(...).project()`, the step path).

Every weight is projected per output unit, p = 2, `c = 1`, fp32, with 0 %, 1 % or 50 %
of its rows over the bound. "Best peer" is the fastest of the three peers in that cell;
ratios are medians of per-round ratios, with [min, max] over rounds.

## Model-shaped weights

{fam_table}

{summary}

![time / floor per family](img/benchmark_families_cpu.png)

First call of the compiled snippet (the compile itself, with a fresh cache; the
compiler's one-time start-up, {m.get("compile_startup_s", float("nan")):.1f} s, is not
included) and its later calls:

{compile_table(d)}

### Where the time goes

With no row over the bound the projection is one norm per row and a comparison, and
nothing is written. On fp32 rows of up to about 4096 elements and on fp64 rows (p in
{{1, 2, inf}}) the factors come from that same norm, aimed under the bound by its proven
rounding error, so that nothing needs checking afterwards, and the rows over are scaled
by one multiply (of the whole tensor, by exactly 1 elsewhere, where that costs less than
listing them): the work of `renorm_`, but in two passes where `renorm_` scales each row
right after its norm, while it is still in cache, plus some Python bookkeeping per
tensor (tens of microseconds), which is what small tensors pay. Longer fp32 rows take
their factors from a second, blocked norm (error about 1e-6) and are checked again with
`torch.linalg.vector_norm` after scaling (the few that fail are shrunk): up to three
norm passes over the rows over the bound, which the peers scale without checking.

## How the cost grows with the work

One square tensor of growing side, and a growing number of 64 x 64 tensors, at 1 % over:

{scaling_table(d, "single")}

{scaling_table(d, "many")}

![size vs time, log-log](img/benchmark_scaling_cpu.png)

## Sparse steps

`Embedding(1e6, 64)` with `SparseAdam`, 4096 rows touched per step: what the wrapper
adds to the bare step, against a hand-written projection of the touched rows
(`index_select`, norms, `min(c / n, 1)`, `index_copy_`). Each method steps its own copy
of the table in a steady state (the rows at the bound get a gradient that takes them
over it at every step, the other touched rows a zero one): a write by anything else
would, rightly, make the wrapper project the whole table at its next step.

{sparse_table(d)}

## A full training step

Forward, backward, `step()` and `zero_grad()` with `Adam(fused=True)`; bound 0.5, so
that the constraint binds from the first step:

{training_table(d)}

![sparse and training overhead](img/benchmark_overhead_cpu.png)

## GPU

Not measured: no GPU machine was available for this run. `tools/gpu_check.sh` runs the
CUDA tests (among them wrapper steps under `torch.cuda.set_sync_debug_mode("error")`)
and `python -m benchmarks --device cuda --quick` in one command; on CUDA the sync-free
path is taken (no host synchronisation in `step()`).

## Memory

The extra memory of a projection is bounded: the per-row norms and factors (O(slices))
and scratch buffers kept between calls (each at most 2^24 elements, per thread, dtype
and device), whatever the size of the weights. The peak extra bytes of every method in
every cell are in `results.json` (`peak_extra_bytes`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=ROOT / "benchmarks" / "results", type=Path)
    parser.add_argument("--out", default=ROOT / "docs", type=Path)
    args = parser.parse_args()
    d = json.loads((args.results / "results.json").read_text())
    (args.out / "performance.md").write_text(page(d))
    for src, dst in IMAGES.items():
        if (args.results / src).exists():
            shutil.copyfile(args.results / src, args.out / "img" / dst)
    print(f"wrote {args.out / 'performance.md'}")


if __name__ == "__main__":
    main()

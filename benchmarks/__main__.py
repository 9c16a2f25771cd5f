"""``python -m benchmarks``: time the max-norm projection against what a user would run
instead (see ``benchmarks/run.py`` for the method)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .models import DENSE_FAMILIES
from .report import format_report, write_json, write_plots
from .run import SECTIONS, run_all
from .timing import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, short timers (a smoke run)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--min-run-time", type=float, default=None, help="seconds per Timer measurement"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which parts to run (default: all)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=DENSE_FAMILIES,
        default=list(DENSE_FAMILIES),
        help="dense model families of the 'families' section (default: all)",
    )
    parser.add_argument(
        "--compile",
        choices=["all", "first", "none"],
        default=None,
        help="where the torch.compile peer runs: every cell, only the first list "
        "benchmarked, or nowhere (default: all; quick: first)",
    )
    parser.add_argument(
        "--compile-max-tensors",
        type=int,
        default=3000,
        help="skip the torch.compile peer for lists longer than this (its compile time "
        "grows with the list: about 100 s for 1000 tensors, 200 s for 3000 on a 2-core "
        "CPU; default: 3000, i.e. every list of the full run)",
    )
    parser.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="what the Timer reads: wall clock, or process CPU time (auto: cpu on a CPU "
        "device with one thread, which ignores time other processes take; else wall)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="run nothing: rewrite results.txt and the PNGs in --out from a saved results.json",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        write_outputs(results, args.out, json_too=False)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    if clock == "cpu" and (device.type != "cpu" or args.threads != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1")
    settings = Settings(
        device=device,
        quick=args.quick,
        threads=args.threads,
        min_run_time=args.min_run_time or (0.01 if args.quick else 0.15),
        rounds=args.rounds or (3 if args.quick else 5),
        clock=clock,
        compile=args.compile or ("first" if args.quick else "all"),
        compile_max_tensors=args.compile_max_tensors,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    # Compile times are those of a cold compile: a fresh inductor / Triton cache
    # directory for this run (unless the caller chose one), and no FX graph or
    # AOTAutograd cache, so that a list of the same shapes as one compiled earlier in
    # the run (many_small and the 300-tensor sweep) is compiled again. Set before the
    # compiler's config is first imported.
    cache = None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="maxnorm-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    for var in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        os.environ.setdefault(var, "0")
    start = time.perf_counter()
    try:
        results = run_all(settings, args.sections, args.families)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    results["machine"]["compile_cache"] = {
        "cache_dir": "fresh per run" if cache else "caller's TORCHINDUCTOR_CACHE_DIR",
        **{
            var: os.environ[var]
            for var in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")
        },
    }
    results["machine"]["wall_s"] = round(time.perf_counter() - start, 1)
    write_outputs(results, args.out)
    return 0


def write_outputs(results: dict[str, Any], out: Path, json_too: bool = True) -> None:
    """``results.json`` (unless ``json_too`` is false), ``results.txt`` and the PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if json_too:
        write_json(results, out / "results.json")
        written.append(out / "results.json")
    report = format_report(results)
    (out / "results.txt").write_text(report + "\n")
    written += [out / "results.txt", *write_plots(results, out)]
    print(report)
    print(f"\nwrote {', '.join(map(str, written))} (run: {results['machine']['wall_s']} s)")


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks``: time the max-norm projection against its baselines."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .models import DENSE_FAMILIES
from .report import format_report, write_chart, write_json
from .run import Settings, run_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--quick", action="store_true", help="small sizes, < 1 minute")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per Timer")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved repeats")
    parser.add_argument(
        "--families",
        nargs="+",
        choices=[*DENSE_FAMILIES, "embedding_sparse"],
        default=None,
        help="run only these (the targets table needs all)",
    )
    parser.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="what the Timer reads: wall clock, or process CPU time (auto: cpu on a CPU "
        "device with one thread, which ignores time other processes take; else wall)",
    )
    args = parser.parse_args(argv)
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
        min_run_time=args.min_run_time or (0.02 if args.quick else 0.3),
        rounds=args.rounds or (1 if args.quick else 5),
        clock=clock,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    start = time.perf_counter()
    results = run_all(settings, args.families)
    results["machine"]["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(results, args.out / "results.json")
    write_chart(results, args.out / "results.png")
    report = format_report(results)
    (args.out / "results.txt").write_text(report + "\n")
    print(report)
    print(
        f"\nwrote {args.out / 'results.json'}, {args.out / 'results.png'}, "
        f"{args.out / 'results.txt'} in {results['machine']['wall_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

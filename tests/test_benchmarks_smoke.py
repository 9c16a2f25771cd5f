"""Smoke test of the benchmark harness: ``python -m benchmarks --quick`` runs every
section and writes its JSON, its tables and its PNGs. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"mlp", "big_linear", "many_small", "small_cnn", "embedding"}
METHODS = {"floor", "renorm_", "snippet", "max_norm_", "wrapper"}
PLOTS = ("families.png", "scaling.png", "overhead.png")
TABLES = (
    *(f"== {name}:" for name in sorted(FAMILIES)),
    "== ours / best peer, per cell",
    "== scaling: one square tensor",
    "== scaling: number of 64x64 tensors",
    "== sparse:",
    "== training step",
)


def test_quick_run_writes_json_tables_and_plots(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"machine", "families", "scaling", "sparse", "training", "summary"}
    assert results["machine"]["quick"] is True
    assert set(results["families"]) == FAMILIES

    cells = list(results["families"].values())
    cells += results["scaling"]["single"] + results["scaling"]["many"]
    for fam in cells:
        assert fam["cases"], fam
        for case in fam["cases"]:
            assert METHODS <= set(case["time_ms"]), case["time_ms"].keys()
            assert set(case["rounds_ms"]) == {"rearm", *case["time_ms"]}
            rounds = results["machine"]["rounds"]
            assert all(len(v) == rounds for v in case["rounds_ms"].values())
            assert case["best_peer"] in {"renorm_", "snippet", "compiled"}
            for ours in ("wrapper", "max_norm_"):
                assert set(case["ratios"][ours]) >= {"renorm_", "snippet"}
                assert case["checks"][ours]["correct"], (ours, case["checks"][ours])
            assert set(case["peak_extra_bytes"]) == set(case["time_ms"])
    # --compile first (the quick default): the first family has the compiled peer.
    first = results["families"]["mlp"]
    assert first["compile"]["first_call_s"] > 0
    assert "compiled" in first["cases"][0]["time_ms"]

    assert [r["side"] for r in results["scaling"]["single"]] == [256, 512, 1024]
    assert [r["count"] for r in results["scaling"]["many"]] == [10, 30, 100]
    assert set(results["scaling"]["loglog_slope"]) == {"single", "many"}
    assert [c["fraction"] for c in results["sparse"]["cases"]] == [0.01, 0.5]
    for case in results["sparse"]["cases"]:
        assert set(case["added_ms"]) == {"wrapper", "snippet"}
        assert "wrapper_vs_snippet" in case
    assert set(results["training"]) == {"mlp", "small_cnn"}
    for t in results["training"].values():
        assert set(t["overhead"]) == {"wrapper", "snippet"}
        assert "wrapper_vs_snippet_overhead" in t
    assert len(results["summary"]) == 3 * len(FAMILIES) + 6

    text = (tmp_path / "results.txt").read_text()
    for table in TABLES:
        assert table in text and table in proc.stdout, table
    for word in ("target", "issue"):
        assert word not in text.lower(), word
    for name in PLOTS:
        png = tmp_path / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # The tables and plots can be rewritten from the JSON alone.
    again = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--from-json", str(tmp_path / "results.json"),
         "--out", str(again)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (again / "results.txt").read_text() == text
    assert all((again / name).exists() for name in PLOTS)
    assert not (again / "results.json").exists()

"""Smoke test of the benchmark harness: ``python -m benchmarks --quick`` runs and writes
its JSON (every family) and PNG. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"mlp", "big_linear", "many_small", "small_cnn", "embedding_sparse"}


def test_quick_run_writes_json_and_png(tmp_path: Path) -> None:
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
    assert set(results["families"]) == FAMILIES
    for name, fam in results["families"].items():
        assert fam["cases"], name
        for case in fam["cases"]:
            assert all(v is not None for v in case.values()), (name, case)
    assert set(results["wrapper"]) == {"mlp", "many_small"}
    assert results["targets"]
    assert results["machine"]["quick"] is True
    png = tmp_path / "results.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== mlp" in proc.stdout

"""The demo: runs end to end with tiny settings, is reproducible, rejects bad options."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from maxnorm_optim import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed Markdown table as ``{run label: [cells after the label]}``."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| run "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def run_demo(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    assert demo.main(list(argv)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_demo_runs_and_writes_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_png = tmp_path / "plots" / "demo.png"  # the folder does not exist yet
    stdout, stderr = run_demo(capsys, "--epochs", "2", "--out", str(out_png))

    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert f"plot written to {out_png}" in stdout
    rows = table_rows(stdout)
    assert set(rows) == {"SGD", "SGD + max-norm (c=2)"}, stdout
    for cells in rows.values():
        final, best, _, _, per_epoch = cells
        assert re.fullmatch(r"\d+\.\d\d%", final)
        assert re.fullmatch(r"\d+\.\d\d% \([12]\)", best)
        assert re.fullmatch(r"\d+ ms", per_epoch)
    # The bound holds for the constrained run; its clipped share comes from constraint_stats.
    assert float(rows["SGD + max-norm (c=2)"][2]) <= 2.0
    assert re.fullmatch(r"\d+\.\d%", rows["SGD + max-norm (c=2)"][3])
    assert rows["SGD"][3] == "–"
    assert "2/2" in stderr  # the tqdm progress bars


def test_same_seed_same_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def numbers(seed: str) -> dict[str, list[str]]:
        stdout, _ = run_demo(
            capsys,
            "--epochs",
            "1",
            "--seed",
            seed,
            "--max-norm",
            "3",
            "--out",
            str(tmp_path / f"{seed}.png"),
        )
        return {label: cells[:-1] for label, cells in table_rows(stdout).items()}  # no time

    first = numbers("7")
    assert set(first) == {"SGD", "SGD + max-norm (c=3)"}
    assert numbers("7") == first


def test_other_optimizer_uses_its_own_default_lr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stdout, _ = run_demo(
        capsys, "--optimizer", "adam", "--epochs", "1", "--out", str(tmp_path / "adam.png")
    )
    assert "Adam: lr=" not in stdout  # no lr passed: Adam's default
    assert set(table_rows(stdout)) == {"Adam", "Adam + max-norm (c=2)"}


def test_torch_optimizer_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch_optimizer")
    stdout, _ = run_demo(
        capsys,
        "--optimizer",
        "Lamb",
        "--lr",
        "0.01",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "lamb.png"),
    )
    assert set(table_rows(stdout)) == {"Lamb", "Lamb + max-norm (c=2)"}


def expect_one_line_error(
    argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str
) -> str:
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("maxnorm-optim-demo: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--max-norm", "-1"], "--max-norm"),
        (["--max-norm", "nan"], "--max-norm"),
        (["--max-norm", "inf"], "--max-norm"),
        (["--optimizer", "NoSuchOpt"], "NoSuchOpt"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--seed", "-1"], "--seed"),
        (["--lr", "0"], "--lr"),
        (["--momentum", "1.5"], "--momentum"),
        (["--optimizer", "Adadelta", "--momentum", "0.9"], "--momentum"),
        (["--optimizer", "Muon", "--lr", "0.02"], "Muon"),  # 2-d parameters only
        (["--optimizer", "SparseAdam"], "SparseAdam"),  # fails on its first (dense) step
        (["--device", "no-such-device"], "--device"),
        (["--unknown-flag"], "unrecognized"),
    ],
)
def test_bad_options(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Later options win: the defaults keep a wrongly accepted run short.
    defaults = ["--epochs", "1", "--out", str(tmp_path / "x.png")]
    expect_one_line_error([*defaults, *argv], capsys, fragment)
    assert not (tmp_path / "x.png").exists()


def test_out_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_one_line_error(["--epochs", "1", "--out", str(tmp_path)], capsys, "--out")


def test_missing_torch_optimizer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch_optimizer", None)  # import fails as if absent
    line = expect_one_line_error(["--optimizer", "Lamb"], capsys, "Lamb", "not installed")
    assert "torch-optimizer" in line
    # torch.optim names do not need it.
    assert demo.resolve_optimizer("sgd").__name__ == "SGD"


def test_missing_demo_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    expect_one_line_error(["--epochs", "1"], capsys, "matplotlib", "maxnorm-optim[demo]")

"""The demo: real runs at tiny sizes, the generated docs, the option checks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from maxnorm_optim import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent
ERROR_CELL = r"–|\d+\.\d\d%( \(\d+\.\d\d–\d+\.\d\d%\))?"
DIVERGED_CELL = r"\d+/\d+( \(in epochs? \d+(–\d+)?\))?"


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed Markdown table as ``{learning rate: [cells after it]}``."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| learning rate "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def run_demo(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    assert demo.main(list(argv)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def tiny(tmp_path: Path, *argv: str) -> list[str]:
    """Options for a run of a second or so; later options win."""
    return ["--epochs", "1", "--seeds", "2", "--out", str(tmp_path / "demo.png"), *argv]


def test_sweep_runs_and_writes_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_png = tmp_path / "plots" / "demo.png"  # the folder does not exist yet
    stdout, stderr = run_demo(capsys, *tiny(tmp_path, "--lrs", "1", "0.01", "--out", str(out_png)))

    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert f"plot written to {out_png}" in stdout
    assert "SGD, momentum=0.9, learning rates 0.01 and 1" in stdout
    rows = table_rows(stdout)
    assert list(rows) == ["0.01", "1"], stdout  # sorted
    for bare_error, bare_div, mn_error, mn_div, projected in rows.values():
        for cell in (bare_error, mn_error):
            assert re.fullmatch(ERROR_CELL, cell), cell
        for cell in (bare_div, mn_div):
            assert re.fullmatch(DIVERGED_CELL, cell), cell
        assert re.fullmatch(r"[\d.]+%|0 \(bound never reached\)", projected), projected
    # The demo's claim, at its size: at lr 1 the bare net's loss overflows within a few
    # dozen steps for every seed, the max-norm net's never does.
    assert rows["1"][:2] == ["–", "2/2 (in epoch 1)"], stdout
    assert rows["1"][3] == "0/2"
    assert "SGD diverged (non-finite loss or weights) with both seeds" in stdout
    assert "\n8 runs (" in stdout  # 2 rates x 2 seeds x bare/max-norm
    assert "8/8" in stderr  # the tqdm progress bar


def test_same_options_same_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = tiny(tmp_path, "--seeds", "1", "--first-seed", "7", "--lrs", "0.05", "--max-norm", "0.8")
    first = table_rows(run_demo(capsys, *argv)[0])
    assert list(first) == ["0.05"]
    assert table_rows(run_demo(capsys, *argv)[0]) == first


def test_bound_never_reached_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The initial unit norms are about 0.6; nothing gets near 100 at this rate.
    stdout, _ = run_demo(
        capsys, *tiny(tmp_path, "--seeds", "1", "--max-norm", "100", "--lrs", "0.001")
    )
    (row,) = table_rows(stdout).values()
    assert row[4] == "0 (bound never reached)"
    assert "The bound c=100 was never reached" in stdout
    # No unit projected: in-bound weights are left alone, so the runs are the same run.
    assert row[0] == row[2]


def test_plot_notes_where_the_bound_was_never_reached(tmp_path: Path) -> None:
    data = demo.load_data(torch.device("cpu"))
    sweep = demo.run_sweep(data, torch.optim.SGD, {}, [1e-4, 1.0], [0], 1, 2.0)
    assert sweep.never_reached() == [1e-4]
    notes = demo.plot(sweep, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert any("0.0001" in note and "never reached" in note for note in notes), notes

    # Nowhere reached: the plot of the traced run says so too.
    sweep = demo.run_sweep(data, torch.optim.SGD, {}, [1e-4], [0], 1, 2.0)
    notes = demo.plot(sweep, tmp_path / "q.png")
    assert any("never reached in this run" in note for note in notes), notes
    assert any("at any learning rate" in note for note in notes), notes


def test_other_optimizer_uses_its_own_default_lr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stdout, _ = run_demo(capsys, *tiny(tmp_path, "--optimizer", "adam", "--seeds", "1"))
    assert "Adam's own default learning rate only" in stdout
    assert "momentum" not in stdout.splitlines()[1]
    assert list(table_rows(stdout)) == ["0.001"]


def test_torch_optimizer_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch_optimizer")
    stdout, _ = run_demo(capsys, *tiny(tmp_path, "--optimizer", "Lamb", "--lrs", "0.01"))
    assert "Lamb + max-norm (c=1)" in stdout
    assert list(table_rows(stdout)) == ["0.01"]


# -- generated docs -----------------------------------------------------------------------

START, END = demo.TABLE_START, demo.TABLE_END


def test_replace_between_markers() -> None:
    text = f"# Title\n\nbefore\n{START}\nold table\nold line\n{END}\n\nafter\n"
    new = demo.replace_between_markers(text, "| new |\n|---|\n")
    assert new == f"# Title\n\nbefore\n{START}\n| new |\n|---|\n{END}\n\nafter\n"
    assert demo.replace_between_markers(new, "| new |\n|---|\n") == new  # idempotent
    for broken in (
        "no markers",
        f"{END}\n{START}\n",
        f"{START}\n{START}\n{END}\n",
        f"{START}\nonly a start\n",
    ):
        with pytest.raises(demo.DemoError, match="demo-table:start"):
            demo.replace_between_markers(broken, "x")


def test_write_docs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    readme = root / "README.md"
    readme.write_text(f"# maxnorm-optim\n\nintro\n\n{START}\nstale\n{END}\n\n![plot](x)\n")
    argv = ["--epochs", "1", "--seeds", "1", "--lrs", "0.02", "1"]
    stdout, _ = run_demo(capsys, *argv, "--write-docs", "--docs-root", str(root))

    text = readme.read_text()
    assert "stale" not in text
    head, rest = text.split(START)
    block, tail = rest.split(END)
    assert head == "# maxnorm-optim\n\nintro\n\n" and tail == "\n\n![plot](x)\n"
    assert "`python -m maxnorm_optim.demo --epochs 1 --seeds 1 --lrs 0.02 1`" in block
    assert "--write-docs" not in block and str(root) not in block
    assert block.count("| learning rate |") == 1
    assert list(table_rows(block)) == ["0.02", "1"]
    assert table_rows(block) == table_rows(stdout)
    assert demo.replace_between_markers(text, block) == text  # same block: same README

    page = (root / "docs" / "demo-output.md").read_text()
    assert table_rows(page) == table_rows(stdout)
    assert "## What depends on the machine, and what does not" in page
    assert "These are not the default options" in page
    assert (root / "docs" / "img" / "demo.png").read_bytes()[:8] == PNG_MAGIC
    assert "plot written to docs/img/demo.png" in stdout
    assert "plot written to docs/img/demo.png" in page  # the printed output, verbatim


def test_checkout_readme_has_the_generated_table() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    _, rest = text.split(START)
    block, _ = rest.split(END)
    assert "`python -m maxnorm_optim.demo`" in block  # generated from a default run
    assert f"SGD + max-norm (c={demo.MAX_NORM:g})" in block
    assert list(table_rows(block)) == [f"{lr:g}" for lr in demo.SGD_LRS]
    page = (REPO / "docs" / "demo-output.md").read_text(encoding="utf-8")
    assert table_rows(page) == table_rows(block)


# -- option checks ------------------------------------------------------------------------


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
        (["--seeds", "0"], "--seeds"),
        (["--first-seed", "-1"], "--first-seed"),
        (["--first-seed", str(2**63 - 1), "--seeds", "2"], "--first-seed"),
        (["--lrs", "0"], "--lrs"),
        (["--lrs", "0.1", "fast"], "--lrs"),
        (["--lrs"], "--lrs"),
        (["--momentum", "1.5"], "--momentum"),
        (["--optimizer", "Adadelta", "--momentum", "0.9"], "--momentum"),
        (["--optimizer", "Muon", "--lrs", "0.02"], "Muon"),  # 2-d parameters only
        (["--optimizer", "SparseAdam"], "SparseAdam"),  # fails on its first (dense) step
        (["--device", "no-such-device"], "--device"),
        (["--docs-root", "."], "--docs-root"),
        (["--unknown-flag"], "unrecognized"),
    ],
)
def test_bad_options(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expect_one_line_error([*tiny(tmp_path), *argv], capsys, fragment)
    assert not (tmp_path / "demo.png").exists()


def test_lbfgs_is_refused_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = expect_one_line_error(
        [*tiny(tmp_path), "--optimizer", "LBFGS"], capsys, "LBFGS", "not supported", "closure"
    )
    assert "{" not in line  # no raw kwargs dict


def test_out_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_one_line_error([*tiny(tmp_path), "--out", str(tmp_path)], capsys, "--out")


def test_write_docs_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_one_line_error(
        ["--write-docs", "--docs-root", str(tmp_path)], capsys, "--write-docs", "README.md"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("no markers\n")
    expect_one_line_error(["--write-docs", "--docs-root", str(tmp_path)], capsys, START, END)
    expect_one_line_error(
        ["--write-docs", "--docs-root", str(tmp_path), "--out", "x.png"], capsys, "--out"
    )
    assert (tmp_path / "README.md").read_text() == "no markers\n"
    assert not (tmp_path / "docs" / "demo-output.md").exists()


def test_missing_torch_optimizer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch_optimizer", None)  # import fails as if absent
    line = expect_one_line_error(["--optimizer", "Lamb"], capsys, "Lamb", "not installed")
    assert "pip install torch-optimizer" in line
    # torch.optim names do not need it.
    assert demo.resolve_optimizer("sgd").__name__ == "SGD"


def test_missing_demo_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = expect_one_line_error(["--epochs", "1"], capsys, "matplotlib")
    assert "pip install -e '.[demo]'" in line and "checkout" in line
    assert "requirements/dev.txt" in line  # the README's own set-up command

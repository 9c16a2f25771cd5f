"""Every ```python block of docs/*.md and README.md runs; the package doctests pass.

The blocks of one file run in order in one namespace (like a notebook), in a temporary
working directory. A block right after a ``<!-- skip-test -->`` line is not run.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.metadata
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maxnorm_optim

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARK = "<!-- skip-test -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line, code, skipped)`` for every ```python block of a Markdown text."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip() == SKIP_MARK
        line = text.count("\n", 0, match.start()) + 2  # the block's first code line
        blocks.append((line, match.group(1), skipped))
    return blocks


def markdown_files() -> list[Path]:
    files = sorted((ROOT / "docs").glob("*.md"))
    readme = ROOT / "README.md"
    return [*files, readme] if readme.exists() else files


def test_python_blocks_parser() -> None:
    text = (
        "intro\n```python\na = 1\n```\n\n<!-- skip-test -->\n```python\nraise SystemExit\n```\n"
        "```bash\nls\n```\n```python\nb = a + 1\n```\n"
    )
    blocks = python_blocks(text)
    assert [(code, skipped) for _, code, skipped in blocks] == [
        ("a = 1\n", False),
        ("raise SystemExit\n", True),
        ("b = a + 1\n", False),
    ]
    assert [line for line, _, _ in blocks] == [3, 8, 14]


def test_the_docs_have_examples() -> None:
    counts = {p.name: len(python_blocks(p.read_text())) for p in markdown_files()}
    for name in ("index.md", "options.md", "eps.md", "recipes.md"):
        assert counts.get(name, 0) >= 1, counts


@pytest.mark.parametrize(
    "path", [p for p in markdown_files() if python_blocks(p.read_text())], ids=lambda p: p.name
)
def test_markdown_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(path.read_text())
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    if not runnable:
        pytest.skip(f"every python block of {path.name} is marked {SKIP_MARK}")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for line, code in runnable:
        try:
            exec(compile(code, f"{path}:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{path.name}: the block at line {line} failed: {err!r}") from err


def package_modules() -> list[str]:
    names = [maxnorm_optim.__name__]
    for info in pkgutil.iter_modules(maxnorm_optim.__path__):
        names.append(f"{maxnorm_optim.__name__}.{info.name}")
    return sorted(names)


@pytest.mark.parametrize("name", package_modules())
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    torch.manual_seed(0)
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} doctest(s) of {name} failed"


def test_doctests_exist() -> None:
    finder = doctest.DocTestFinder()
    examples = {
        name: sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
        for name in package_modules()
    }
    assert examples["maxnorm_optim._wrapper"] >= 1, examples
    assert examples["maxnorm_optim._param_groups"] >= 1, examples
    assert examples["maxnorm_optim._projection"] >= 1, examples


def test_version_from_a_fresh_interpreter() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", "import maxnorm_optim; print(maxnorm_optim.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT.parent,
        env=env,
        timeout=120,
    ).stdout.strip()
    assert out == maxnorm_optim.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", out), out
    try:
        installed = importlib.metadata.version("maxnorm-optim")
    except importlib.metadata.PackageNotFoundError:
        installed = None  # running from a checkout that is not installed
    if installed is not None:
        assert installed == out


def test_changelog_has_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[(\d[^\]]*)\]", changelog, re.MULTILINE)
    assert versions, "no released version in CHANGELOG.md"
    assert versions[0] == maxnorm_optim.__version__
    assert re.search(r"^## \[Unreleased\]", changelog, re.MULTILINE)

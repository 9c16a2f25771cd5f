"""pytest plugin that records the compatibility-matrix outcomes as JSON.

Loaded by ``tools/compat_matrix.py`` with ``-p compat_plugin`` (``tools`` on
``PYTHONPATH``); an ordinary test run does not load it. A test belongs to the matrix
when its module defines ``COMPAT_SECTION`` and its function name is a key of the
module's ``COMPAT_COLUMNS`` (the column label). The row is the parametrization id, or
``COMPAT_ROWS[name]`` (default ``"all"``) for a test without parameters. Sections are
ordered by the module's ``COMPAT_ORDER``; a test may add a short note to its cell with
``record_property("compat_detail", text)``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

_RESULTS: dict[str, dict[str, Any]] = {}
_ORDER = {"failed": 4, "xpassed": 3, "skipped": 2, "xfailed": 1, "passed": 0}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--compat-report",
        default=None,
        metavar="PATH",
        help="write the compatibility-matrix outcomes of the compat tests to PATH (JSON)",
    )


def _cell(item: pytest.Item) -> dict[str, Any] | None:
    module = getattr(item, "module", None)
    section = getattr(module, "COMPAT_SECTION", None)
    columns = getattr(module, "COMPAT_COLUMNS", {})
    name = getattr(item, "originalname", item.name)
    if section is None or name not in columns:
        return None
    callspec = getattr(item, "callspec", None)
    row = (
        callspec.id if callspec is not None else getattr(module, "COMPAT_ROWS", {}).get(name, "all")
    )
    return {
        "section": section,
        "section_order": getattr(module, "COMPAT_ORDER", 100),
        "section_doc": inspect.cleandoc(module.__doc__ or ""),
        "column": columns[name],
        "column_order": list(columns.values()).index(columns[name]),
        "row": row,
        "nodeid": item.nodeid,
        "outcome": "passed",
        "reason": "",
        "detail": "",
    }


def _reason(report: pytest.TestReport) -> str:
    """The reason of a skip or an xfail."""
    if hasattr(report, "wasxfail"):
        return str(report.wasxfail)
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    entry = _RESULTS.get(item.nodeid)
    if entry is None:
        entry = _cell(item)
        if entry is None:
            return
        _RESULTS[item.nodeid] = entry
    for key, value in item.user_properties:
        if key == "compat_detail":
            entry["detail"] = str(value)
    if report.skipped:
        new = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.failed:
        new = "failed"
    elif report.when == "call" and hasattr(report, "wasxfail"):
        new = "xpassed"
    else:
        return
    if _ORDER[new] >= _ORDER[entry["outcome"]]:
        entry["outcome"] = new
        entry["reason"] = _reason(report) if new != "failed" else f"failed in {report.when}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--compat-report")
    if path:
        Path(path).write_text(json.dumps(list(_RESULTS.values()), indent=1) + "\n")

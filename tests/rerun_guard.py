"""A pytest plugin: a test that needed a rerun fails the run.

pyproject.toml gives every failed test one rerun (--reruns 1, pytest-rerunfailures). A test that
fails and then passes on its rerun is a race to fix, not noise: the rerun is kept for diagnosis
(does it fail every time, or only sometimes?), the first attempt's failure is printed at the end,
and the exit status is non-zero. Loaded by tests/conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

from typing import Any

import pytest

_RERUN_REPORTS: list[pytest.TestReport] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":
        _RERUN_REPORTS.append(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _RERUN_REPORTS and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RERUN_REPORTS:
        return
    terminalreporter.section("failed first attempts (passed on rerun): the run fails")
    for report in _RERUN_REPORTS:
        lines = report.longreprtext.splitlines()
        terminalreporter.write_line(f"{report.nodeid} ({report.when}):")
        for line in lines[-25:]:
            terminalreporter.write_line(f"    {line}")
    names = sorted({report.nodeid for report in _RERUN_REPORTS})
    terminalreporter.write_line(f"{len(names)} test(s) needed a rerun: {', '.join(names)}", red=True, bold=True)

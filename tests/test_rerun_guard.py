"""The test run fails when a test needed its rerun, and says which (tests/rerun_guard.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAKY = """
from pathlib import Path

def test_fails_once():
    marker = Path(__file__).with_suffix(".ran")
    if not marker.exists():
        marker.write_text("first attempt")
        raise AssertionError("the first attempt fails")

def test_always_passes():
    pass
"""


def run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.rerun_guard", "-p", "no:cacheprovider", *args, str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_test_that_passes_only_on_its_rerun_fails_the_run(tmp_path: Path) -> None:
    """Breakage caught: a rerun that passes leaving the exit status 0 (the guard's sessionfinish removed)."""
    (tmp_path / "test_flaky.py").write_text(FLAKY)
    result = run_pytest(tmp_path, "--reruns", "1", "--rootdir", str(tmp_path))
    assert "2 passed, 1 rerun" in result.stdout, result.stdout[-2000:]
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 test(s) needed a rerun: test_flaky.py::test_fails_once" in result.stdout
    assert "the first attempt fails" in result.stdout, "the first attempt's failure is printed"


def test_a_clean_run_still_passes(tmp_path: Path) -> None:
    (tmp_path / "test_clean.py").write_text("def test_fine():\n    pass\n")
    result = run_pytest(tmp_path, "--reruns", "1", "--rootdir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:]
    assert "needed a rerun" not in result.stdout

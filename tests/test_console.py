"""Console output of long commands: pure units with an in-memory stream and a fake clock."""

from __future__ import annotations

import io

import pytest

from gateway.console import ProgressDisplay, migration_summary
from gateway.migration import MigrationReport, Problem


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_plain_prints_one_line_per_step() -> None:
    stream = io.StringIO()
    clock = FakeClock()
    display = ProgressDisplay(stream, "users", is_terminal=False, clock=clock)

    for done in range(0, 1001, 10):
        display.update(done, 1000, {"migrated": done})
        clock.now += 0.1
    display.finish()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 21
    assert lines[0] == "0/1,000 users (0%), 0 users/s: migrated 0"
    assert lines[10].startswith("500/1,000 users (50%), 100 users/s")
    assert lines[-1] == "1,000/1,000 users (100%), 100 users/s: migrated 1,000"


def test_progress_plain_empty_total_prints_once() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, "users", is_terminal=False, clock=FakeClock())

    display.update(0, 0, {"migrated": 0})

    assert stream.getvalue() == "0/0 users (100%), 0 users/s: migrated 0\n"


def test_progress_terminal_redraw_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    stream = io.StringIO()
    clock = FakeClock()
    display = ProgressDisplay(stream, "users", is_terminal=True, clock=clock)

    for done in range(0, 100):
        display.update(done, 100, {"failed": 0})
        clock.now += 0.01
    display.update(100, 100, {"failed": 0})
    display.finish()

    output = stream.getvalue()
    assert output.count("\r") == 11
    assert output.endswith("\n")
    assert "\r[" + "#" * 30 + "] 100/100 users (100%), 100 users/s  failed 0\x1b[K\n" in output


def test_progress_terminal_finish_without_update_prints_nothing() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, "users", is_terminal=True, clock=FakeClock())

    display.finish()

    assert stream.getvalue() == ""


def test_migration_summary_lists_each_problem() -> None:
    report = MigrationReport(dry_run=False, total=5, processed=5, migrated=2, empty=1, legacy_fields_removed=2)
    report.conflicts.append(Problem("u1", "the same legacy key is held by user u2"))
    report.failures.append(Problem("u3", "the legacy key is not a string but int"))

    lines = migration_summary(report, "user.apikey", removes_legacy_field=True)

    assert lines == [
        "Migrated the legacy keys from user.apikey.",
        "  users with the field:             5",
        "  migrated:                         2",
        "  already present:                  0",
        "  empty:                            1",
        "  conflicts:                        1",
        "  failed:                           1",
        "  legacy fields removed:            2",
        "Conflicts (no token created, legacy field kept):",
        "  user u1: the same legacy key is held by user u2",
        "Failed:",
        "  user u3: the legacy key is not a string but int",
    ]


def test_migration_summary_dry_run_says_would() -> None:
    report = MigrationReport(dry_run=True, total=1, processed=1, migrated=1)

    lines = migration_summary(report, "user.apikey", removes_legacy_field=False)

    assert lines[0] == "Dry run of the legacy key migration from user.apikey; nothing was written."
    assert "  would migrate:                    1" in lines
    assert not any("legacy fields" in line for line in lines)

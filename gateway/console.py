"""Console output of the command line: the progress of long commands and the migration summary.

Only the CLI uses this module; it writes to the stream it is given.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from gateway.migration import MigrationReport

PROGRESS_BAR_WIDTH = 30
REDRAW_INTERVAL_SECONDS = 0.1
PLAIN_LINE_PERCENT_STEP = 5
# Erase from the cursor to the end of the line (ANSI EL), so a shorter redraw leaves no tail.
ERASE_TO_END_OF_LINE = "\x1b[K"


class ProgressDisplay:
    """Show how far a long command has got on `stream`.

    On a terminal: a bar with counts and rate, redrawn in place at most ten
    times a second. Elsewhere (a pipe or a log file): one plain line each
    time another 5 % of the work is done, and one at the end.
    """

    def __init__(
        self,
        stream: TextIO,
        unit: str,
        is_terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.unit = unit
        self.is_terminal = stream.isatty() if is_terminal is None else is_terminal
        self.clock = clock
        self.started: float | None = None
        self.last_drawn = -math.inf
        self.last_step = -1
        self.has_drawn = False

    def update(self, done: int, total: int, counts: Mapping[str, int]) -> None:
        """Show that `done` of `total` units are handled, with a count per outcome.

        The rate counts from the first call.
        """
        if self.started is None:
            self.started = self.clock()
        if self.is_terminal:
            self._redraw(done, total, counts)
        else:
            self._print_step(done, total, counts)

    def finish(self) -> None:
        """End the bar's line, so later output starts on a line of its own."""
        if self.is_terminal and self.has_drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.has_drawn = False

    def _redraw(self, done: int, total: int, counts: Mapping[str, int]) -> None:
        now = self.clock()
        if done < total and now - self.last_drawn < REDRAW_INTERVAL_SECONDS:
            return
        self.last_drawn = now

        fraction = done / total if total else 1.0
        filled = round(fraction * PROGRESS_BAR_WIDTH)
        bar = "#" * filled + "-" * (PROGRESS_BAR_WIDTH - filled)
        line = f"[{bar}] {self._position(done, total, fraction)}  {_format_counts(counts)}"

        # A line wider than the terminal wraps, and "\r" would then redraw only its last row.
        columns = shutil.get_terminal_size().columns
        self.stream.write("\r" + line[: columns - 1] + ERASE_TO_END_OF_LINE)
        self.stream.flush()
        self.has_drawn = True

    def _print_step(self, done: int, total: int, counts: Mapping[str, int]) -> None:
        fraction = done / total if total else 1.0
        step = math.floor(fraction * 100 / PLAIN_LINE_PERCENT_STEP)
        if step <= self.last_step and done < total:
            return
        self.last_step = step

        self.stream.write(f"{self._position(done, total, fraction)}: {_format_counts(counts)}\n")
        self.stream.flush()

    def _position(self, done: int, total: int, fraction: float) -> str:
        elapsed = self.clock() - (self.started or 0.0)
        rate = done / elapsed if elapsed > 0 else 0.0
        return f"{done:,}/{total:,} {self.unit} ({fraction:.0%}), {rate:,.0f} {self.unit}/s"


def _format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in counts.items())


def migration_summary(report: MigrationReport, source: str, removes_legacy_field: bool) -> list[str]:
    """Return the lines that close a migration: counts by outcome, then each conflict and failure."""
    if report.dry_run:
        lines = [f"Dry run of the legacy key migration from {source}; nothing was written."]
    else:
        lines = [f"Migrated the legacy keys from {source}."]

    rows = {
        "users with the field": report.total,
        "would migrate" if report.dry_run else "migrated": report.migrated,
        **{name: count for name, count in report.counts().items() if name != "migrated"},
    }
    if removes_legacy_field:
        label = "legacy fields to remove" if report.dry_run else "legacy fields removed"
        rows[label] = report.legacy_fields_removed
    lines.extend(f"  {name + ':':<25}{count:>10,}" for name, count in rows.items())

    if report.conflicts:
        lines.append("Conflicts (no token created, legacy field kept):")
        lines.extend(f"  user {problem.user_id}: {problem.reason}" for problem in report.conflicts)
    if report.failures:
        lines.append("Failed:")
        lines.extend(f"  user {problem.user_id}: {problem.reason}" for problem in report.failures)
    return lines

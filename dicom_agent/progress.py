"""Progress bars and summary tables for the long commands (``audit`` over many files,
``replay``, ``eval``, ``models pull``), drawn with rich on **stderr**.

stdout stays machine-readable (JSON, one result per line), so a command can be piped whatever
it shows. The bar is drawn only when stderr is a terminal: in a pipe, a log file or a test
runner nothing but the final summary table is written. Every table carries the research-only
line (the tables hold model figures).

Use::

    with progress("Auditing", total=len(files)) as bar:
        for path in files:
            ...
            bar.advance()
    print_summary("audit", [("images", "12"), ("failed", "0")])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cxr_auditor.schema import FLAG_ORDER, AuditResult

__all__ = [
    "PIPE_WIDTH",
    "RESEARCH_LINE",
    "Bar",
    "print_summary",
    "print_table",
    "progress",
    "result_rows",
    "stderr_console",
]

#: Caption of every summary table.
RESEARCH_LINE = "Research use only: not a medical device, not for clinical use."


#: Width of a table written to a pipe or a file: wide enough that a row stays on one line (a
#: terminal uses its own width).
PIPE_WIDTH = 200


def stderr_console() -> Console:
    """The console the long commands draw on: stderr, so stdout stays machine-readable."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=PIPE_WIDTH)
    return console


@dataclass
class Bar:
    """Handle of one running bar; :meth:`advance` after each item, :meth:`note` for a status."""

    _progress: Progress | None
    _task: TaskID | None

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    def note(self, text: str) -> None:
        """Replace the text after the description (e.g. the file being worked on, never PHI)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, status=text)


@contextmanager
def progress(
    description: str, total: int | None, *, console: Console | None = None
) -> Iterator[Bar]:
    """A progress bar over ``total`` items (None: unknown, the bar pulses) while the block runs.

    Nothing is drawn when the console is not a terminal; the handle then does nothing.
    """
    console = console or stderr_console()
    if not console.is_terminal:
        yield Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, status="")
        yield Bar(bar, task)


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    console: Console | None = None,
) -> None:
    """Print a table (first column left-aligned, the others right-aligned) on stderr."""
    table = Table(title=title, caption=RESEARCH_LINE)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    (console or stderr_console()).print(table)


def result_rows(result: AuditResult) -> list[tuple[str, object]]:
    """The summary of one audit for :func:`print_summary`: images, grounding, findings, flags
    (URGENT first), mode and stage timings. Labels and counts only, never draft text."""
    skipped = Counter(s.get("reason", "?") for s in result.inputs.skipped_images)
    flags = Counter(f.kind.value for f in result.flags)
    rows: list[tuple[str, object]] = [
        ("images audited", len(result.inputs.images)),
        ("images skipped", ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or 0),
        ("grounding", result.grounding.state.value),
        ("findings", ", ".join(sorted({f.label.value for f in result.grounding.findings})) or "-"),
        ("mode", result.mode.value),
    ]
    rows += [(f"flags {kind.value}", flags[kind.value]) for kind in FLAG_ORDER if flags[kind.value]]
    rows += [(f"time {stage.removesuffix('_ms')}", f"{ms:.0f} ms")
             for stage, ms in result.timings.items()]
    return rows


def print_summary(
    title: str, items: Sequence[tuple[str, object]], *, console: Console | None = None
) -> None:
    """Print a two-column summary (what, how many) on stderr at the end of a long command."""
    print_table(title, ("", "value"), items, console=console)

"""The one rich progress bar of every long workflow (encode, decode, evaluate, train, train a prior)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(enabled: bool, *, status: bool = False) -> Progress:
    """Description, bar, done/total, elapsed and remaining time; with ``status`` a free text per task
    (``add_task(..., status="")`` then ``update(task, status=...)``). Disabled: prints nothing."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)

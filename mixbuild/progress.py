"""Progress display for long work (rich), silent when disabled or not on a terminal."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], total: int | None = None, label: str = "working",
          enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        yield from progress.track(items, total=total, description=label)

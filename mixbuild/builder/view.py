"""The build's progress display (rich, on stderr when it is a terminal): mixbuild's stages and
TensorRT's nested build phases.

Events come from the build process (worker.py) as dicts:
    {"event": "stage", "name"}                       a mixbuild stage (parsing, building)
    {"event": "phase_start", "phase", "parent", "steps"}   IProgressMonitor.phase_start
    {"event": "step", "phase", "step"}               IProgressMonitor.step_complete
    {"event": "phase_finish", "phase"}               IProgressMonitor.phase_finish
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class BuildView:
    def __init__(self, progress) -> None:
        self.progress = progress
        self.stage = progress.add_task("starting the build process", total=None)
        self.phases: dict[str, tuple[int, int]] = {}          # phase -> (task id, depth)

    def handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "stage":
            self.progress.update(self.stage, description=event["name"])
        elif kind == "phase_start":
            parent = self.phases.get(event.get("parent") or "")
            depth = parent[1] + 1 if parent else 1
            task = self.progress.add_task("  " * depth + event["phase"],
                                          total=max(int(event.get("steps", 0)), 1))
            self.phases[event["phase"]] = (task, depth)
        elif kind == "step" and event.get("phase") in self.phases:
            self.progress.update(self.phases[event["phase"]][0], completed=int(event["step"]) + 1)
        elif kind == "phase_finish" and event.get("phase") in self.phases:
            self.progress.remove_task(self.phases.pop(event["phase"])[0])


class _Silent:
    def handle(self, event: dict) -> None:
        pass


@contextlib.contextmanager
def build_view(enabled: bool) -> Iterator[BuildView | _Silent]:
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield _Silent()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        yield BuildView(progress)

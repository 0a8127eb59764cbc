"""Progress of long steps (model pulls, layer files, substitutes, kernel builds), on stderr.

On a terminal, rich's transient bars; elsewhere (a log, a pipe) plain timestamped lines such
as ``[  12.3s] writing layer files: 5/26``, at a step's start, at most every
``LineProgress.interval`` seconds, and at its end. Libraries' own bars are silenced either way.
"""

from __future__ import annotations

import sys
import time


class StepLog:
    """Prints ``[elapsed] text`` lines on stderr, elapsed counted from its creation; silent
    when disabled."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        if self.enabled:
            stamp = f"[{time.monotonic() - self.start:6.1f}s]"
            print(f"{stamp} {text}", file=sys.stderr, flush=True)


class LineProgress:
    """rich.progress.Progress's add_task/advance/update and context manager, printing a
    StepLog line per task at its start, at most every `interval` seconds, and at its end."""

    interval = 5.0

    def __init__(self, log: StepLog):
        self.log = log
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "completed": 0}
        self._print(task)
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(
        self,
        task: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **_,
    ) -> None:
        t = self.tasks[task]
        t["total"] = t["total"] if total is None else total
        t["description"] = t["description"] if description is None else description
        t["completed"] = t["completed"] if completed is None else completed
        t["completed"] += advance or 0
        if t["completed"] == t["shown"]:
            return
        done = t["total"] is not None and t["completed"] >= t["total"]
        if done or time.monotonic() - t["printed"] >= self.interval:
            self._print(task)

    def _print(self, task: int) -> None:
        t = self.tasks[task]
        count = f"{t['completed']:g}" + ("" if t["total"] is None else f"/{t['total']:g}")
        self.log(f"{t['description']}: {count}")
        t["printed"], t["shown"] = time.monotonic(), t["completed"]


def progress_bars(enabled: bool, log: StepLog | None = None):
    """Transient rich bars on a terminal, LineProgress lines (through `log`) elsewhere;
    disabled, every call is a no-op."""
    if enabled and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
            console=Console(file=sys.stderr), transient=True,
        )  # fmt: skip
    return LineProgress(log or StepLog(enabled))


def quiet_libraries() -> None:
    """Turn off transformers' and huggingface_hub's progress bars and their log output below
    errors (subspec reports its own steps); called after importing them, before loading."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging

        disable_progress_bars()
        hub_logging.set_verbosity_error()

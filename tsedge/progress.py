"""Progress on stderr for long work (download, compile, long prefill), drawn with rich.

A bar or spinner is drawn only when stderr is a terminal; otherwise each task prints one line
when it starts, so logs and ``--json`` output on stdout stay clean.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn,
                           SpinnerColumn, Task, TextColumn, TimeElapsedColumn, TransferSpeedColumn)
from rich.text import Text


def _console() -> Console:
    return Console(file=sys.stderr)


def interactive() -> bool:
    """Whether stderr is a terminal (bars and spinners are drawn only then)."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def _bar(description: str, total: int | None, *columns, keep: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar on a terminal (``keep``: it stays on screen when done), else one line."""
    if not interactive():
        print(f"tsedge: {description}", file=sys.stderr)
        yield lambda _done: None
        return
    with Progress(TextColumn("{task.description}"), *columns, console=_console(), transient=not keep) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


def download_progress(description: str, total_bytes: int) -> contextlib.AbstractContextManager:
    """Context giving ``update(bytes_done)`` for a download of ``total_bytes`` bytes."""
    return _bar(description, total_bytes, BarColumn(), DownloadColumn(), TransferSpeedColumn(), keep=True)


def token_progress(description: str, total_tokens: int) -> contextlib.AbstractContextManager:
    """Context giving ``update(tokens_done)`` for work over ``total_tokens`` tokens (e.g. prefill)."""
    return _bar(description, total_tokens, BarColumn(), MofNCompleteColumn(), _TokenRate(),
                TimeElapsedColumn())


def count_progress(description: str, total: int) -> contextlib.AbstractContextManager:
    """Context giving ``update(done)`` for work over ``total`` items (e.g. weights quantized)."""
    return _bar(description, total, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


class _TokenRate(ProgressColumn):
    """Tokens per second of a task (rich's estimate over its recent updates)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} tok/s" if task.speed else "")


@contextlib.contextmanager
def stage_progress(description: str) -> Iterator[Callable[[str], None]]:
    """Context giving ``stage(name)`` that shows the current stage of ``description`` by a spinner."""
    if not interactive():
        print(f"tsedge: {description}", file=sys.stderr)
        yield lambda _name: None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=_console(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda name: bar.update(task, description=f"{description}: {name}")

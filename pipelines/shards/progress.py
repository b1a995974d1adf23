"""Progress observers: callbacks told how far a stage got in this process.

The embed stage reports each sample it finished (in the process that embeds locally), the
write stages each kept sample or row they wrote; ``count`` is the running total of that
stage in this process. Nothing is registered by default. A caller that wants to watch a run
(a progress display, or a test that interrupts a run at a chosen point) registers a
callback for the duration of a block::

    with watch_progress(lambda stage, count: ...):
        run_filter(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

ProgressHook = Callable[[str, int], None]  # (stage name, samples done in this process)

_observers: list[ProgressHook] = []


@contextlib.contextmanager
def watch_progress(hook: ProgressHook) -> Iterator[ProgressHook]:
    """Call ``hook(stage, count)`` on every progress report inside the block."""
    _observers.append(hook)
    try:
        yield hook
    finally:
        _observers.remove(hook)


def report_progress(stage: str, count: int) -> None:
    """Tell the registered observers that ``stage`` has done ``count`` samples in this process."""
    for hook in list(_observers):
        hook(stage, count)

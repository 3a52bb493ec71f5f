"""SIGINT and SIGTERM during training: the loop finishes its step, saves a checkpoint, and returns."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StopFlag", "catching_signals"]


class StopFlag:
    """Set by SIGINT/SIGTERM: ``signal`` is then the signal's name (``"SIGINT"``), else None."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name


@contextmanager
def catching_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Within the block SIGINT and SIGTERM set ``flag`` instead of stopping the process; the old handlers
    come back afterwards. Outside the main thread (where handlers cannot be installed) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

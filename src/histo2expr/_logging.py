"""The package logger, ``logging.getLogger("histo2expr")``: scanpy-style messages with timings.

A call announces what it computes and, when done, how long it took::

    start = logg.info("fitting chrep on 1,200 spots of 6 slides")
    ...
    logg.info("    finished", time=start)  # "    finished (0:00:12)"

How much is shown is :attr:`hx.settings.verbosity <histo2expr._settings.Histo2ExprSettings.verbosity>`
(0 error, 1 warning, 2 info (default), 3 hint, 4 debug), which sets the logger's level. Messages go
to ``sys.stderr`` through :func:`tqdm.tqdm.write`, so that they do not break a progress bar being
drawn. Warnings stay :func:`warnings.warn` (they can be filtered or turned into errors as warnings).

The logger does not pass its messages on to the root logger. To route them into your own logging
configuration (a log file of a cluster job)::

    logger = logging.getLogger("histo2expr")
    logger.handlers.clear()
    logger.propagate = True
"""

from __future__ import annotations

import logging
import sys
import time as _time
from datetime import timedelta
from enum import IntEnum

#: Between ``logging.INFO`` and ``logging.DEBUG``, as scanpy's hints: what a call chose and why.
HINT = (logging.INFO + logging.DEBUG) // 2
logging.addLevelName(HINT, "HINT")

#: The verbosity levels in order (``hx.settings.verbosity`` is an index into it) and their logging levels.
LEVELS = {
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "hint": HINT,
    "debug": logging.DEBUG,
}


class Verbosity(IntEnum):
    """How much histo2expr tells, as scanpy's verbosity: each level shows its messages and those above."""

    error = 0
    warning = 1
    info = 2
    hint = 3
    debug = 4

    @property
    def logging_level(self) -> int:
        """The level of :mod:`logging` the package logger is set to."""
        return LEVELS[self.name]


logger = logging.getLogger("histo2expr")


class _ProgressAwareHandler(logging.Handler):
    """Write each message on its own line to the current ``sys.stderr``, above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging.StreamHandler: a message that cannot be written never fails a call
            self.handleError(record)


def _configure() -> None:
    """Give the package logger its one handler (once per process, however often the module is reloaded)."""
    if not any(isinstance(h, _ProgressAwareHandler) for h in logger.handlers):
        handler = _ProgressAwareHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)


_configure()


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one: ``"1 slide"``, ``"1,947 spots"``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def elapsed(start: float) -> str:
    """Time since ``start`` (from :func:`info` or :func:`time.monotonic`) as ``H:MM:SS``."""
    return str(timedelta(seconds=round(_time.monotonic() - start)))


def _log(level: int, msg: str, time: float | None) -> float:
    if time is not None:
        msg = f"{msg} ({elapsed(time)})"
    logger.log(level, msg)
    return _time.monotonic()


def info(msg: str, *, time: float | None = None) -> float:
    """Log ``msg`` at info level, with the time since ``time`` when given; return the time now (a start)."""
    return _log(logging.INFO, msg, time)


def hint(msg: str, *, time: float | None = None) -> float:
    """Log ``msg`` at hint level (verbosity 3): what a call chose by itself and why."""
    return _log(HINT, msg, time)

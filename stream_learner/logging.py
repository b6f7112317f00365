"""structlog configured once, at the entry point.

JSON lines when stderr is not a terminal (containers, CI, log shippers),
coloured key-value lines when it is; ``log_format`` forces either. The
records of the libraries that log through the standard :mod:`logging`
module (kafka-python, redis-py) go through the same renderer, with their
logger's name, so a JSON log holds only JSON lines. Credentials inside URLs
are masked in every line, ours or theirs
(:func:`~stream_learner.config.mask_secrets`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict

from .config import mask_secrets

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _mask(logger: Any, method: str, event: EventDict) -> EventDict:
    """A structlog processor: mask credentials in URLs in every string value."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = mask_secrets(value)
    return event


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the standard logging of our dependencies, once per process.

    ``fmt`` is ``auto``, ``json`` or ``console``. Calling it again replaces
    the previous configuration (no handler is added twice).
    """
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _mask,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _mask,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # kafka-python logs every connection and fetch at INFO/DEBUG: keep the libraries quieter than ours.
    root.setLevel(max(_LEVELS[level], logging.WARNING))

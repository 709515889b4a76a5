"""kto_plugin's log is on screen by default, as transformers shows its own: the summaries `prepare_dataset` and
`attach()` log at INFO reach a plain script's stderr with no logging set-up.

One handler on the ``kto_plugin`` logger, added at import, writes a record only while the application has no
handler of its own on the record's way (on the root logger or on ``kto_plugin``), so an application that
configures logging, before or after importing kto_plugin, gets each line once, through its own handlers. The
logger's level is INFO (WARNING on processes other than rank 0); ``KTO_PLUGIN_VERBOSITY`` (debug, info,
warning, error, critical) sets another, as ``TRANSFORMERS_VERBOSITY`` does for transformers, and so does
``logging.getLogger("kto_plugin").setLevel(...)``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

LOGGER_NAME = "kto_plugin"
VERBOSITY_ENV = "KTO_PLUGIN_VERBOSITY"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}


class DefaultHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` when nothing else would show the record."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))  # every message starts with "kto_plugin"

    @property
    def stream(self):  # sys.stderr when the record is written, not when the handler was made
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def handle(self, record: logging.LogRecord) -> bool:
        if application_handles():
            return False
        return super().handle(record)


def application_handles() -> bool:
    """Whether a handler the application configured receives kto_plugin's records."""
    own = logging.getLogger(LOGGER_NAME)
    if any(not isinstance(h, DefaultHandler) for h in own.handlers):
        return True
    return own.propagate and bool(logging.getLogger().handlers)


def default_level(environ: Mapping[str, str]) -> tuple[int, str | None]:
    """(level, a complaint about the environment variable or None) from `environ`."""
    value = environ.get(VERBOSITY_ENV)
    if value is not None:
        if value.strip().lower() in LEVELS:
            return LEVELS[value.strip().lower()], None
        problem = f"kto_plugin: {VERBOSITY_ENV}={value!r} is not one of {', '.join(LEVELS)}; using the default."
    else:
        problem = None
    # as the Trainer's log_level_replica: the summary once, from the main process
    return (logging.INFO if environ.get("RANK", "0") in ("", "0") else logging.WARNING), problem


def install_default_handler() -> None:
    """Add the handler once, and set the level unless the application has set one already."""
    logger = logging.getLogger(LOGGER_NAME)
    if any(isinstance(h, DefaultHandler) for h in logger.handlers):
        return
    level, problem = default_level(os.environ)
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    logger.addHandler(DefaultHandler())
    if problem:
        logger.warning(problem)

"""Structured log lines on stdout (Argo archives them; the UI shows each stage's log).

One line per event: ``<UTC time> <LEVEL> <logger> <message> key=value ...``. Values are quoted
when they contain spaces, so the lines stay greppable and machine-readable.
"""

from __future__ import annotations

import logging
import sys
import time

_CONFIGURED = False


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        extra = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%SZ")
        line = f"{ts} {record.levelname:<7} {record.name} {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def setup(level: str = "INFO") -> None:
    global _CONFIGURED
    if _CONFIGURED:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("gppy")
    root.addHandler(handler)
    root.setLevel(level)
    # records still propagate, so a host application's (or pytest's) handlers see them too
    _CONFIGURED = True


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"gppy.{name}")


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields) -> None:
    logger.log(level, message, extra={"fields": fields})

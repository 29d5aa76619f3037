"""Typed errors and the exit codes they map to.

Exit codes are part of the interface: Argo's retry policy retries only
``RETRIABLE`` (75), and the local runner quarantines a frame on ``BAD_INPUT``.

| code | name        | meaning                                                     | Argo retries |
|------|-------------|-------------------------------------------------------------|--------------|
| 0    | OK          | done (or already done from the same inputs and settings)    | -            |
| 65   | BAD_INPUT   | this input cannot be processed; it is quarantined           | no           |
| 69   | TOOL_FAILURE| an external program (SExtractor, SCAMP, ...) failed         | no           |
| 70   | BUG         | an unexpected exception: a defect in gppy-stage             | no           |
| 75   | RETRIABLE   | network, throttling, a lost node: try again                 | yes          |
| 78   | CONFIG      | the configuration or the command line is wrong              | no           |

Codes follow BSD sysexits so that they mean something to operators too.
"""

from __future__ import annotations

OK = 0
BAD_INPUT = 65
TOOL_FAILURE = 69
BUG = 70
RETRIABLE = 75
CONFIG = 78

class GppyError(Exception):
    """Base of every error the pipeline raises on purpose."""

    exit_code = BUG
    kind = "bug"

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)
        self.reason = message

    def as_record(self) -> dict:
        """The JSON form used in quarantine lists and stage results."""
        return {"file": self.path, "kind": self.kind, "exit_code": self.exit_code, "reason": self.reason}


class RetriableError(GppyError):
    """A fault outside the data: network, throttling, a node lost. Try again."""

    exit_code = RETRIABLE
    kind = "retriable"


class BadInputError(GppyError):
    """This input cannot be processed (truncated, missing keys, wrong shape...)."""

    exit_code = BAD_INPUT
    kind = "bad_input"


class NotFoundError(BadInputError):
    """The object does not exist."""


class ToolError(GppyError):
    """An external program failed; the message carries its stderr."""

    exit_code = TOOL_FAILURE
    kind = "tool_failure"


class ToolMissingError(ToolError):
    """An external program is not installed; the message names the package."""


class ConfigError(GppyError):
    """The configuration, or the command line, is wrong."""

    exit_code = CONFIG
    kind = "config"


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception (anything untyped is a bug)."""
    if isinstance(exc, GppyError):
        return exc.exit_code
    return BUG

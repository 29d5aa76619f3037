"""What every stage shares: the night it works on, its plan, and the skip-if-done contract.

A product ``X`` is complete when its sidecar ``X.json`` exists: the sidecar is written after the
product, so a crash between the two leaves no sidecar and the work is redone. The sidecar records
the hash of the inputs and settings the product was made from; a stage that finds the same hash
skips the work (``force`` redoes it). A stage that adds to another stage's product (astrometry's
WCS in the calib frame) names its own sidecar ``X.<role>.json``, so each stage's record is its own.

Every stage invocation ends in one ``StageResult`` (``runs/<unit>/<night>/results/<stage>/<item>.json``,
and the JSON line ``gppy stage`` prints for Argo's log): made by ``StageResult.finished`` or
``StageResult.failed``, written by ``to_dict``, read back by ``from_dict``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from astropy.io import fits

from .. import __version__, storage
from ..config import settings_hash
from ..errors import BAD_INPUT, BUG, OK, BadInputError, ConfigError, GppyError, exit_code_for

PLAN_SCHEMA = "gppy-stage/plan/1"


@dataclass
class Night:
    """One unit's night under a storage root: what a stage command is given."""

    root: str
    unit: str
    night: str
    force: bool = False
    _plan: dict | None = field(default=None, repr=False)

    def url(self, *keys: str) -> str:
        return storage.join(self.root, *keys)

    @property
    def raw_prefix(self) -> str:
        return f"obsdata/{self.unit}/{self.night}"

    @property
    def run_prefix(self) -> str:
        return f"runs/{self.unit}/{self.night}"

    def plan(self) -> dict:
        if self._plan is None:
            url = self.url(self.run_prefix, "plan.json")
            if not storage.exists(url):
                raise ConfigError(f"no plan for {self.unit} {self.night}: run `gppy stage plan` first ({url})")
            try:
                plan = json.loads(storage.get_bytes(url))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"plan.json is not valid JSON ({exc}): plan again with `gppy stage plan` "
                                  f"(`gppy night run` re-plans by itself)", path=url) from exc
            if not isinstance(plan, dict) or plan.get("schema") != PLAN_SCHEMA:
                schema = plan.get("schema") if isinstance(plan, dict) else type(plan).__name__
                raise ConfigError(f"plan.json has schema {schema!r}, expected {PLAN_SCHEMA}: plan again with "
                                  f"`gppy stage plan`", path=url)
            missing = [k for k in ("calsets", "frames", "stacks", "quarantine") if not isinstance(plan.get(k), list)]
            if missing:
                raise ConfigError(f"plan.json lacks {', '.join(missing)}: plan again with `gppy stage plan`", path=url)
            self._plan = plan
        return self._plan

    def item(self, fanout: str, item_id: str) -> dict:
        from ..graph import PLAN_LISTS

        for entry in self.plan()[PLAN_LISTS[fanout]]:
            if entry["id"] == item_id:
                return entry
        raise BadInputError(f"plan.json of {self.unit} {self.night} lists no {fanout} {item_id!r}")

    def write_result(self, record: StageResult) -> str:
        key = f"{self.run_prefix}/results/{record.stage}/{record.item or 'night'}.json"
        storage.put_bytes(self.url(key), json.dumps(record.to_dict(), indent=1, default=str).encode())
        return key


STATUSES = ("done", "skipped", "quarantined", "failed")
# what ``gppy stage`` prints (and Argo's log keeps): the record less what the command line already names
LOG_KEYS = ("stage", "item", "status", "exit_code", "seconds", "result", "error")


@dataclass(frozen=True)
class StageError:
    """Why a stage invocation did not finish: the error's kind, its one-line reason, the file it names."""

    kind: str
    reason: str
    file: str | None = None
    traceback: str | None = None  # only for a bug (exit 70), where the operator needs the code's path

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "reason": self.reason, "file": self.file}
        if self.traceback is not None:
            out["traceback"] = self.traceback
        return out


@dataclass(frozen=True)
class StageResult:
    """The outcome of one stage invocation on one item (``item`` None for a night-wide stage)."""

    stage: str
    item: str | None
    unit: str
    night: str
    started: str
    status: str  # one of STATUSES
    exit_code: int
    seconds: float
    result: dict | None = None  # the stage function's own dict, when it finished
    error: StageError | None = None

    @classmethod
    def finished(cls, result: dict, seconds: float, **where) -> StageResult:
        """A stage that returned: skipped when its result says so. ``where``: stage, item, unit, night, started."""
        status = "skipped" if result.get("skipped") else "done"
        return cls(**where, status=status, exit_code=OK, seconds=round(seconds, 3), result=result)

    @classmethod
    def failed(cls, exc: BaseException, seconds: float, traceback: str | None = None, **where) -> StageResult:
        """A stage that raised: a bad input is quarantined, anything else failed, with the exit code
        the error's type gives (an untyped exception is a bug)."""
        code = exit_code_for(exc)
        reason = exc.reason if isinstance(exc, GppyError) else f"{type(exc).__name__}: {exc}"
        error = StageError(kind=getattr(exc, "kind", "bug"), reason=reason, file=getattr(exc, "path", None),
                           traceback=traceback if code == BUG else None)
        return cls(**where, status="quarantined" if code == BAD_INPUT else "failed", exit_code=code,
                   seconds=round(seconds, 3), error=error)

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")

    def to_dict(self) -> dict:
        return {"stage": self.stage, "item": self.item, "unit": self.unit, "night": self.night,
                "started": self.started, "status": self.status, "exit_code": self.exit_code,
                "seconds": self.seconds, "result": self.result,
                "error": self.error.to_dict() if self.error else None}

    @classmethod
    def from_dict(cls, data: dict) -> StageResult:
        err = data.get("error")
        return cls(**{k: data.get(k) for k in ("stage", "item", "unit", "night", "started", "status", "exit_code",
                                               "seconds", "result")},
                   error=StageError(**{k: err.get(k) for k in ("kind", "reason", "file", "traceback")}) if err else None)

    def log_line(self) -> str:
        """The one JSON line a ``gppy stage`` command prints."""
        record = self.to_dict()
        return json.dumps({k: record[k] for k in LOG_KEYS}, default=str)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def input_hash(stage: str, inputs: list[dict] | list[str], settings: Any) -> str:
    """The identity of a piece of work: the stage, its inputs (key + size) and its settings."""
    return settings_hash({"stage": stage, "inputs": inputs, "settings": settings})


def product_identity(ctx: Night, key: str) -> dict:
    """What a product used as an input contributes to a hash: its key and the hash it was made
    from, so that a master remade under the same name makes everything after it redo."""
    return {"key": key, "hash": (read_sidecar(ctx.url(key)) or {}).get("hash")}


def sidecar_url(product_url: str, role: str | None = None) -> str:
    return f"{product_url}.{role}.json" if role else product_url + ".json"


def read_sidecar(product_url: str, role: str | None = None) -> dict | None:
    url = sidecar_url(product_url, role)
    if not storage.exists(url):
        return None
    try:
        return json.loads(storage.get_bytes(url))
    except (ValueError, storage.NotFoundError):
        return None


def is_done(product_url: str, work_hash: str, force: bool = False, *, stamped: fits.Header | None = None,
            card: str = "GPHASH", role: str | None = None) -> bool:
    """True when the product exists and was made from the same inputs and settings.

    A stage that also writes into another stage's frame (photometry's zero points in the calib
    header) passes that header as ``stamped``: the work counts as done only while the header still
    carries the hash under ``card``, because remaking the frame (a forced reduce) drops those cards
    while leaving this stage's own product and sidecar in place. ``role`` names the sidecar of a
    stage whose product is another stage's file (see the module docstring).
    """
    if force:
        return False
    meta = read_sidecar(product_url, role)
    if stamped is not None and stamped.get(card) != work_hash:
        return False
    return bool(meta) and meta.get("hash") == work_hash and storage.exists(product_url)


def write_sidecar(product_url: str, work_hash: str, *, role: str | None = None, **meta) -> dict:
    record = {"hash": work_hash, "pipeline_version": __version__, "made": utcnow(), **meta}
    storage.put_bytes(sidecar_url(product_url, role), json.dumps(record, indent=1, default=str).encode())
    return record


def stamp_provenance(header: fits.Header, work_hash: str | None = None, card: str = "GPHASH",
                     comment: str = "hash of inputs and settings") -> fits.Header:
    """Who made a product and from what, written into its header in one place (as ccdproc's
    ``log_to_metadata`` does): the pipeline version and, when given, the work hash under ``card``."""
    header["PIPEVER"] = (__version__, "gppy-stage version")
    if work_hash is not None:
        header[card] = (work_hash, comment)
    return header


class Timer:
    """Wall time of a named step, for the stage timing table."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

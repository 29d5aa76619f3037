"""Configuration: the instrument registry, header rules and pipeline settings.

Everything lives in the ``config/`` folder of the repository (or the folder named by
``GPPY_CONFIG``, as mounted from a ConfigMap in the cluster). Adding an observatory is
adding a row to ``instruments.csv``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def config_dir() -> Path:
    """The configuration folder: ``$GPPY_CONFIG`` or the repository's ``config/``."""
    env = os.environ.get("GPPY_CONFIG")
    candidates = [Path(env)] if env else []
    # a checkout's config/, then the copy an installed wheel carries (gppy_stage/_config)
    candidates += [Path(__file__).resolve().parent.parent / "config", Path(__file__).parent / "_config",
                   Path("/etc/gppy")]
    for path in candidates:
        if (path / "instruments.csv").is_file():
            return path
    raise ConfigError(
        "no configuration folder found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "); set GPPY_CONFIG to the folder holding instruments.csv"
    )


@dataclass(frozen=True)
class Instrument:
    """One row of the instrument registry."""

    obs: str
    camera: str
    gain: float  # e-/ADU
    rdnoise: float  # e-
    dark: float | None  # e-/s/pixel
    pixscale: float  # arcsec/pixel
    fov_arcmin: float
    nx: int
    ny: int
    saturation: float  # ADU
    # master-bias QA: clipped median range and largest clipped std (ADU); None where not set
    bias_min: float | None = None
    bias_max: float | None = None
    bias_std_max: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Full-frame (rows, columns), as numpy orders them."""
        return (self.ny, self.nx)


def _optional(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


@functools.lru_cache(maxsize=None)
def _instruments(folder: str) -> dict[str, Instrument]:
    out = {}
    with open(Path(folder) / "instruments.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                out[row["obs"].upper()] = Instrument(
                    obs=row["obs"],
                    camera=row["camera"],
                    gain=float(row["gain"]),
                    rdnoise=float(row["rdnoise"]),
                    dark=_optional(row["dark"]),
                    pixscale=float(row["pixscale"]),
                    fov_arcmin=float(row["fov_arcmin"]),
                    nx=int(row["nx"]),
                    ny=int(row["ny"]),
                    saturation=float(row["saturation"]),
                    bias_min=_optional(row.get("bias_min")),
                    bias_max=_optional(row.get("bias_max")),
                    bias_std_max=_optional(row.get("bias_std_max")),
                )
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"bad row {row!r}: {exc}", path=str(Path(folder) / "instruments.csv")) from exc
    return out


def instruments() -> dict[str, Instrument]:
    return _instruments(str(config_dir()))


def instrument(obs: str) -> Instrument:
    """The registry row of a unit or observatory (``7DT03``, ``LOAO``...)."""
    table = instruments()
    try:
        return table[obs.upper()]
    except KeyError:
        raise ConfigError(
            f"unknown observatory {obs!r}: add a row to instruments.csv (known: {', '.join(sorted(table))})"
        ) from None


@dataclass(frozen=True)
class Site:
    """How an observatory names its night folders (names.NIGHT_PATTERNS) and which software writes
    its headers (``tcspy`` for 7DT; ``maxim`` for MaxIm DL, SBIG, Andor, FLI, KMTNet): the registry's
    ``night_folder`` and ``header_dialect`` columns. Apart from Instrument so that the detector's
    provenance hash (masters, reduce) does not change with them."""

    instrument: Instrument
    night_folder: str = "YYYY-MM-DD_gain"
    header_dialect: str = "tcspy"

    @property
    def obs(self) -> str:
        return self.instrument.obs


@functools.lru_cache(maxsize=None)
def _site_columns(folder: str) -> dict[str, tuple[str, str]]:
    with open(Path(folder) / "instruments.csv", newline="") as fh:
        return {row["obs"].upper(): (row.get("night_folder") or "YYYY-MM-DD_gain", row.get("header_dialect") or "tcspy")
                for row in csv.DictReader(fh)}


def site(obs: str) -> Site:
    """The registry row of ``obs`` with its folder and header conventions."""
    inst = instrument(obs)
    night_folder, dialect = _site_columns(str(config_dir()))[obs.upper()]
    return Site(inst, night_folder, dialect)


@functools.lru_cache(maxsize=None)
def _yaml(folder: str, name: str) -> dict[str, Any]:
    path = Path(folder) / name
    return load_yaml(path)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML settings file as a mapping; a broken one is one line naming the file and the line."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read ({exc.strerror or exc})", path=str(path)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}not valid YAML ({what})", path=str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of settings, found a {type(data).__name__}", path=str(path))
    return data


def header_rules() -> dict[str, Any]:
    return _yaml(str(config_dir()), "header_rules.yaml")


# the pipeline's settings files; a section is found by its name alone, in the first that has it
SETTINGS_FILES = ("pipeline.yaml", "subtract.yaml")


def settings(section: str | None = None, file: str | None = None) -> dict[str, Any]:
    """One section of the pipeline's settings by name (``masters``, ``reduce``, ``overscan``,
    ``defringe``, ``plan`` in pipeline.yaml; ``stack``, ``reference``, ``subtract``, ``detect``,
    ``completeness``, ``curate``, ``notify`` in subtract.yaml), or all of one file (``file``,
    pipeline.yaml by default). The one source of every tunable: code reads it without defaults."""
    folder = str(config_dir())
    if section is None:
        return _yaml(folder, file or SETTINGS_FILES[0])
    names = (file,) if file else SETTINGS_FILES
    for name in names:
        data = _yaml(folder, name)
        if section in data:
            return data[section]
    raise ConfigError(f"no section {section!r} in {' or '.join(names)}", path=folder)


def settings_hash(obj: Any) -> str:
    """A short, stable hash of settings (or of anything JSON can write)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """A short hash of a config file's bytes (tool settings go into product headers)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

"""Reference catalogues: read from bytes or a local path (storage hands them over), turned into
one shape, moved to the observation epoch, and written as SCAMP's LDAC reference.

The one shape: ``ra``, ``dec`` (deg, at the epoch in ``meta['EPOCH']``), ``pmra``, ``pmdec``
(mas/yr, 0 where unknown), ``mag_<band>``, ``magerr_<band>`` (AB). ``meta['REFCAT']`` names the
catalogue (it goes into product headers).
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
from astropy.table import Table
from astropy.time import Time

from .. import config
from ..errors import BadInputError, ConfigError
from ..names import safe_name
from ..tools import ldac

GAIA_EPOCH = 2016.0

# Blanton & Roweis (2007), table 1: m_AB - m_Vega
VEGA_TO_AB = {"U": 0.79, "B": -0.09, "V": 0.02, "R": 0.21, "I": 0.45, "J": 0.91, "H": 1.39, "Ks": 1.85, "K": 1.85}


def refcat_name(obj: str) -> str:
    """The 7DT reference catalogue name of a field: ``gaiaxp_dr3_synphot_<OBJECT>.csv``."""
    return refcat_file("gaiaxp", obj)


@functools.lru_cache(maxsize=None)
def _column_maps(folder: str) -> dict[str, Any]:
    return config.load_yaml(Path(folder) / "refcat_columns.yaml")


def column_maps() -> dict[str, Any]:
    """The catalogue kinds of config/refcat_columns.yaml (its ``sites`` table left out)."""
    return {k: v for k, v in _column_maps(str(config.config_dir())).items() if k != "sites"}


def site_kinds(obs: str) -> list[str]:
    """The catalogue kinds a site uses, in order of preference (``sites`` in refcat_columns.yaml)."""
    sites = _column_maps(str(config.config_dir())).get("sites") or {}
    kinds = list(sites.get(obs) or sites.get("default") or ["gaiaxp"])
    unknown = [k for k in kinds if k not in column_maps()]
    if unknown:
        raise ConfigError(f"refcat_columns.yaml: site {obs} names unknown catalogue kind(s) {', '.join(unknown)}")
    return kinds


def refcat_file(kind: str, obj: str) -> str:
    """The file name of a field's catalogue of one kind, e.g. ``ps1_dr1_M101.csv``."""
    spec = column_maps().get(kind)
    if spec is None or "file_pattern" not in spec:
        raise ConfigError(f"refcat_columns.yaml: catalogue kind {kind!r} has no file_pattern")
    return spec["file_pattern"].format(object=safe_name(obj))


def locate(obs: str, obj: str, exists: Callable[[str], bool]) -> tuple[str, str] | None:
    """(key under the root, kind) of the first catalogue of the site's kinds that ``exists``
    for the field, or None. Keys are ``ref_cat/<file>``."""
    for kind in site_kinds(obs):
        key = f"ref_cat/{refcat_file(kind, obj)}"
        if exists(key):
            return key, kind
    return None


def _read_table(source: str | Path | bytes, name: str) -> Table:
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source.strip():
                raise BadInputError("reference catalogue is empty", path=name)
            text = source.decode("utf-8", errors="replace")
            if source[:6] == b"SIMPLE":
                return Table.read(io.BytesIO(source), format="fits")
            return Table.read(text, format="ascii.csv" if "," in text.split("\n", 1)[0] else "ascii")
        path = Path(source)
        if not path.is_file():
            raise BadInputError("reference catalogue not found", path=str(path))
        if path.suffix.lower() in (".fits", ".fit", ".ldac", ".cat") and path.read_bytes()[:6] == b"SIMPLE":
            return Table.read(path, format="fits")
        return Table.read(path, format="ascii.csv" if path.suffix.lower() == ".csv" else "ascii")
    except BadInputError:
        raise
    except Exception as exc:  # astropy raises many kinds on malformed text
        raise BadInputError(f"cannot read reference catalogue: {exc}", path=name) from exc


def read_refcat(source: str | Path | bytes, *, kind: str = "gaiaxp", name: str | None = None) -> Table:
    """Read a reference catalogue (bytes or local path) and map it to the one shape.

    ``kind`` is a key of ``config/refcat_columns.yaml`` (gaiaxp, ps1, sdss, apass, 2mass, johnson).
    """
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else f"<{kind} bytes>")
    raw = _read_table(source, label)
    return standardize(raw, kind, name=label)


def standardize(raw: Table, kind: str, *, name: str = "") -> Table:
    maps = column_maps()
    if kind not in maps:
        raise ConfigError(f"unknown reference catalogue kind {kind!r} (known: {', '.join(maps)})")
    spec = maps[kind]
    cols = set(raw.colnames)
    for key in ("ra", "dec"):
        if spec[key] not in cols:
            raise BadInputError(f"reference catalogue has no column {spec[key]!r} ({kind})", path=name)
    out = Table()
    out["ra"] = _masked_float(raw[spec["ra"]], name)
    out["dec"] = _masked_float(raw[spec["dec"]], name)
    if spec.get("id") and spec["id"] in cols:
        out["id"] = raw[spec["id"]]
    for key in ("pmra", "pmdec"):
        src = spec.get(key)
        out[key] = np.nan_to_num(_masked_float(raw[src], name), nan=0.0) if src and src in cols else np.zeros(len(raw))
    if "phot_g_mean_mag" in cols:
        out["phot_g_mean_mag"] = _masked_float(raw["phot_g_mean_mag"], name)
    if "mag_pattern" in spec:
        prefix = spec["mag_pattern"].split("{band}")[0]
        eprefix = spec["magerr_pattern"].split("{band}")[0]
        for col in raw.colnames:
            if col.startswith(prefix) and not col.startswith(eprefix):
                band = col[len(prefix):]
                out[f"mag_{band}"] = _masked_float(raw[col], name)
                ecol = f"{eprefix}{band}"
                out[f"magerr_{band}"] = _masked_float(raw[ecol], name) if ecol in cols else np.full(len(raw), np.nan)
    for band, bspec in (spec.get("bands") or {}).items():
        if bspec["mag"] not in cols:
            continue
        offset = float(bspec.get("vega_to_ab", 0.0))
        out[f"mag_{band}"] = _masked_float(raw[bspec["mag"]], name) + offset
        ecol = bspec.get("magerr")
        out[f"magerr_{band}"] = _masked_float(raw[ecol], name) if ecol and ecol in cols else np.full(len(raw), np.nan)
    good = np.isfinite(out["ra"]) & np.isfinite(out["dec"])
    out = out[good]
    out.meta["REFCAT"] = Path(name).name if name else spec.get("name", kind)
    out.meta["REFKIND"] = kind
    out.meta["EPOCH"] = float(spec.get("epoch", 2000.0))
    # how B V R I follow from this catalogue's bands (science/transforms.py), where it says
    out.meta["TRANSFORM"] = spec.get("transform") or ""
    return out


def _masked_float(col, name: str) -> np.ndarray:
    """A column as floats, NaN where empty; text in a number column is bad input naming the column."""
    values = np.ma.asarray(col)
    try:
        return np.ma.filled(values.astype(float), np.nan)
    except (TypeError, ValueError):
        bad = next(v for v in values.compressed() if not _is_number(v))
        raise BadInputError(f"reference catalogue column {col.name!r} holds {bad!r}, not a number",
                            path=name) from None


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def bands(table: Table) -> list[str]:
    return [c[4:] for c in table.colnames if c.startswith("mag_")]


def at_epoch(table: Table, when: Time | float | str) -> Table:
    """Positions moved by proper motion from the catalogue epoch to ``when`` (Time, MJD or ISO)."""
    if isinstance(when, (int, float, np.floating)):
        when = Time(float(when), format="mjd")
    elif isinstance(when, str):
        when = Time(when)
    dt = when.jyear - float(table.meta.get("EPOCH", GAIA_EPOCH))
    out = table.copy()
    cosd = np.cos(np.radians(out["dec"]))
    # linear motion is plenty over a decade at the milliarcsecond-per-year level
    out["ra"] = (out["ra"] + out["pmra"] * dt / 3.6e6 / np.clip(cosd, 1e-6, None)) % 360.0
    out["dec"] = out["dec"] + out["pmdec"] * dt / 3.6e6
    out.meta["EPOCH"] = float(when.jyear)
    return out


def scamp_reference(table: Table, band: str | None = None, *, mag_limit: float | None = None) -> Table:
    """The LDAC-ready table SCAMP reads as ``ASTREF_CATALOG FILE`` (see config/scamp.conf)."""
    if band is None or f"mag_{band}" not in table.colnames:
        if "phot_g_mean_mag" in table.colnames:
            mag, magerr = table["phot_g_mean_mag"], None
        else:
            b = bands(table)
            mag = table[f"mag_{b[0]}"] if b else np.full(len(table), 15.0)
            magerr = table[f"magerr_{b[0]}"] if b else None
    else:
        mag, magerr = table[f"mag_{band}"], table[f"magerr_{band}"]
    mag = np.asarray(mag, float)
    keep = np.isfinite(mag) if mag_limit is None else np.isfinite(mag) & (mag < mag_limit)
    ref = ldac.refcat_table(np.asarray(table["ra"])[keep], np.asarray(table["dec"])[keep], mag[keep],
                            None if magerr is None else np.asarray(magerr, float)[keep],
                            epoch=float(table.meta.get("EPOCH", 2000.0)))
    return ref


def scamp_reference_ldac(table: Table, band: str | None = None) -> bytes:
    """The LDAC file (bytes) of :func:`scamp_reference`."""
    return ldac.write_ldac(scamp_reference(table, band))

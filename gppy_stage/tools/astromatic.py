"""Wrappers of the AstrOmatic programs Debian packages: source-extractor, scamp, missfits.

Each call runs in its own temporary directory with the settings of ``config/`` overridden by an
``options`` dict, and returns astropy objects. Tool versions and config hashes are exposed for
product headers (:func:`provenance`). A missing program raises :class:`ToolMissingError` naming
the Debian package; a failing one raises :class:`ToolError` with the tail of its stderr.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.io import fits
from astropy.io.votable import parse as parse_votable
from astropy.table import Table

from .. import config
from ..errors import ToolError, ToolMissingError
from ..fitsio import clean_header
from . import ldac

# Debian names first: the upstream names are tried too so a source build still works.
_BINARIES = {
    "source-extractor": (("source-extractor", "sex", "sextractor"), "source-extractor"),
    "scamp": (("scamp",), "scamp"),
    "missfits": (("missfits",), "missfits"),
    "swarp": (("SWarp", "swarp"), "swarp"),
    "solve-field": (("solve-field",), "astrometry.net"),
    "hotpants": (("hotpants",), "hotpants"),
}

STDERR_TAIL = 3000


def find_binary(tool: str) -> str:
    """The path of a program, or ToolMissingError naming the Debian package that provides it."""
    names, package = _BINARIES.get(tool, ((tool,), tool))
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise ToolMissingError(f"{names[0]} not found: install the Debian package '{package}' (apt-get install {package})")


@functools.lru_cache(maxsize=None)
def tool_version(tool: str) -> str:
    """The version string a program reports (``source-extractor -v`` ...), e.g. ``2.25.0``."""
    binary = find_binary(tool)
    flag = "--version" if tool == "solve-field" else "-v"
    try:
        proc = subprocess.run([binary, flag], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{tool} {flag} did not answer within 60 s") from None
    text = (proc.stdout + proc.stderr).strip()
    m = re.search(r"version\s+([0-9][\w.\-]*)", text, re.I) or re.search(r"([0-9]+\.[0-9][\w.\-]*)", text)
    return m.group(1) if m else text.splitlines()[0] if text else "unknown"


def config_file(name: str) -> Path:
    path = config.config_dir() / name
    if not path.is_file():
        raise ToolError(f"tool settings file missing: {path}")
    return path


def provenance(tool: str, *files: str) -> dict[str, str]:
    """Tool version and config file hashes, ready for a product header or a result dict."""
    out = {"tool": tool, "version": tool_version(tool)}
    for name in files:
        out[name] = config.file_hash(config_file(name))
    return out


def _tail(text: str) -> str:
    text = (text or "").strip()
    return text[-STDERR_TAIL:]


def run_tool(tool: str, args: Sequence[str], cwd: Path, *, timeout: float | None = 600) -> subprocess.CompletedProcess:
    """Run a program in ``cwd``; a non-zero exit, a timeout or a signal is a ToolError with stderr."""
    binary = find_binary(tool)
    cmd = [binary, *map(str, args)]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise ToolError(f"{tool} ran past {timeout} s: {_tail(err)}") from None
    if proc.returncode != 0:
        raise ToolError(f"{tool} failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}")
    return proc


def option_args(options: Mapping[str, Any]) -> list[str]:
    """``{"combine_type": "WEIGHTED", "subtract_back": False}`` -> ``-COMBINE_TYPE WEIGHTED -SUBTRACT_BACK N``
    (the command-line form every astromatic program takes)."""
    args = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "Y" if value else "N"
        elif isinstance(value, (list, tuple, np.ndarray)):
            value = ",".join(_fmt(v) for v in value)
        else:
            value = _fmt(value)
        args += [f"-{key.upper()}", value]
    return args


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.8g}"
    return str(value)


# ----------------------------------------------------------------------------- SExtractor

def sextractor(
    image: np.ndarray,
    header: fits.Header | None = None,
    *,
    weight: np.ndarray | None = None,
    flag: np.ndarray | None = None,
    params: str | Sequence[str] = "sextractor/astrometry.param",
    options: Mapping[str, Any] | None = None,
    config_name: str = "sextractor/default.sex",
    timeout: float | None = 600,
) -> Table:
    """Run source-extractor on an array; the catalogue (LDAC_OBJECTS) as an astropy Table.

    ``weight`` is a MAP_WEIGHT image (1/variance, 0 where masked) and ``flag`` an integer flag
    image (its OR over an object's pixels lands in IMAFLAGS_ISO). ``params`` is a param file in
    ``config/`` or a list of parameter names. ``options`` override ``config_name``.
    The table's ``meta`` carries the tool version and config hashes.
    """
    if image.ndim != 2:
        raise ToolError(f"source-extractor needs a 2-D image, got shape {image.shape}")
    conf = config_file(config_name)
    conf_dir = conf.parent
    if isinstance(params, str):
        param_names = [ln.split("#")[0].strip() for ln in config_file(params).read_text().splitlines()]
        param_names = [p for p in param_names if p]
    else:
        param_names = list(params)
    if flag is None:
        param_names = [p for p in param_names if not p.startswith("IMAFLAGS_ISO") and not p.startswith("NIMAFLAGS")]
    opts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gppy_sex_") as tmp:
        tmp = Path(tmp)
        fits.PrimaryHDU(np.ascontiguousarray(image, dtype=np.float32), clean_header(header)).writeto(tmp / "image.fits")
        (tmp / "run.param").write_text("\n".join(param_names) + "\n")
        opts.update(CATALOG_NAME="out.cat", CATALOG_TYPE="FITS_LDAC", PARAMETERS_NAME="run.param")
        # filter and network files live beside the .sex file; paths in the .sex are relative to it
        for key, default in (("FILTER_NAME", None), ("STARNNW_NAME", "default.nnw")):
            name = _conf_value(conf, key) or default
            if name and not Path(name).is_absolute() and (conf_dir / name).is_file():
                opts[key] = str(conf_dir / name)
        if weight is not None:
            fits.PrimaryHDU(np.ascontiguousarray(weight, dtype=np.float32)).writeto(tmp / "weight.fits")
            opts.update(WEIGHT_TYPE="MAP_WEIGHT", WEIGHT_IMAGE="weight.fits")
        if flag is not None:
            fits.PrimaryHDU(np.ascontiguousarray(flag, dtype=np.int32)).writeto(tmp / "flag.fits")
            opts.update(FLAG_IMAGE="flag.fits")
        opts.update({k.upper(): v for k, v in (options or {}).items()})
        for key in ("FILTER_NAME", "STARNNW_NAME"):
            if key in opts and not Path(str(opts[key])).is_absolute() and (conf_dir / str(opts[key])).is_file():
                opts[key] = str(conf_dir / str(opts[key]))
        run_tool("source-extractor", ["image.fits", "-c", str(conf), *option_args(opts)], tmp, timeout=timeout)
        if not (tmp / "out.cat").is_file():
            raise ToolError("source-extractor wrote no catalogue")
        table = ldac.read_ldac(str(tmp / "out.cat"))
    table.meta.clear()
    table.meta["SEXVER"] = tool_version("source-extractor")
    table.meta["SEXCONF"] = config.file_hash(conf)
    return table


def _conf_value(path: Path, key: str) -> str | None:
    for line in path.read_text().splitlines():
        parts = line.split("#")[0].split()
        if len(parts) >= 2 and parts[0] == key:
            return parts[1]
    return None


# ----------------------------------------------------------------------------- SCAMP

@dataclass
class ScampResult:
    """What one SCAMP run gives: the solved header of each input catalogue and its statistics."""

    headers: list[fits.Header]
    fields: Table  # SCAMP's XML "Fields" table, one row per input catalogue
    log: str = ""
    meta: dict = field(default_factory=dict)

    def stats(self, i: int = 0) -> dict[str, float]:
        """Matches and RMS (arcsec) against the reference for catalogue ``i``."""
        row = self.fields[i]

        def get(name, default=np.nan):
            return row[name] if name in row.colnames else default

        sigma = np.atleast_1d(np.asarray(get("AstromSigma_Reference", [np.nan, np.nan]), float))
        return {
            "nmatch": int(get("AstromNDets_Reference", 0)),
            "rms1_arcsec": float(sigma[0]),
            "rms2_arcsec": float(sigma[-1]),
            "chi2": float(get("AstromChi2_Reference")),
            "contrast": float(get("XY_Contrast")),
            "pixscale_arcsec": float(np.atleast_1d(get("Pixel_Scale"))[0]) if "Pixel_Scale" in row.colnames else np.nan,
        }


def scamp(
    catalogs: Sequence[tuple[Table, fits.Header]],
    reference: Table,
    *,
    options: Mapping[str, Any] | None = None,
    config_name: str = "scamp.conf",
    timeout: float | None = 600,
) -> ScampResult:
    """Run scamp on SExtractor catalogues (each with the image header holding its first WCS)
    against a local reference table (see :func:`ldac.refcat_table`)."""
    conf = config_file(config_name)
    opts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gppy_scamp_") as tmp:
        tmp = Path(tmp)
        names = []
        for i, (table, header) in enumerate(catalogs):
            name = f"cat_{i:03d}.ldac"
            (tmp / name).write_bytes(ldac.write_ldac(table, _image_header(header)))
            names.append(name)
        (tmp / "refcat.ldac").write_bytes(ldac.write_ldac(reference, fits.Header()))
        opts.update(ASTREF_CATALOG="FILE", ASTREFCAT_NAME="refcat.ldac", XML_NAME="scamp.xml", WRITE_XML=True,
                    CHECKPLOT_TYPE="NONE", CHECKPLOT_DEV="NULL")
        opts.update({k.upper(): v for k, v in (options or {}).items()})
        proc = run_tool("scamp", [*names, "-c", str(conf), *option_args(opts)], tmp, timeout=timeout)
        headers = []
        for name in names:
            head = tmp / name.replace(".ldac", ".head")
            if not head.is_file():
                raise ToolError(f"scamp wrote no .head for {name}: {_tail(proc.stderr)}")
            headers.append(read_head(head.read_text(errors="replace")))
        fields = _scamp_fields(tmp / "scamp.xml")
    return ScampResult(headers=headers, fields=fields, log=_tail(proc.stderr),
                       meta={"SCAMPVER": tool_version("scamp"), "SCAMPCNF": config.file_hash(conf)})


def _image_header(header: fits.Header) -> fits.Header:
    """The image header as SCAMP wants it in LDAC_IMHEAD: it reads the frame size from NAXISn."""
    if "NAXIS1" not in header or "NAXIS2" not in header:
        raise ToolError("scamp needs NAXIS1 and NAXIS2 in each catalogue's image header")
    out = fits.Header([("SIMPLE", True), ("BITPIX", -32), ("NAXIS", 2),
                       ("NAXIS1", int(header["NAXIS1"])), ("NAXIS2", int(header["NAXIS2"]))])
    out.extend(clean_header(header), end=True)
    return out


def read_head(text: str) -> fits.Header:
    """A SCAMP/SWarp ``.head`` text (cards, one a line, ending in END) as a Header."""
    lines = [ln.rstrip("\n") for ln in text.splitlines()]
    cards = []
    for ln in lines:
        if ln.strip() == "END":
            break
        cards.append(ln.ljust(80)[:80])
    # SCAMP writes non-ASCII degree signs in comments: drop what FITS cannot hold
    return fits.Header.fromstring("".join(c.encode("ascii", "replace").decode() for c in cards))


def _scamp_fields(xml: Path) -> Table:
    if not xml.is_file():
        return Table()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vot = parse_votable(str(xml), verify="ignore")
    for table in vot.iter_tables():
        if table.name == "Fields":
            return table.to_table(use_names_over_ids=True)
    return Table()


# ----------------------------------------------------------------------------- MissFITS

def missfits(
    header: fits.Header,
    head: fits.Header,
    *,
    options: Mapping[str, Any] | None = None,
    config_name: str = "missfits.conf",
    timeout: float | None = 120,
) -> fits.Header:
    """Merge ``head`` (e.g. SCAMP's solution) into ``header`` with missfits; the merged header.

    MissFITS edits only headers, so it is handed a 1x1 placeholder image carrying ``header``:
    a 61-Mpixel frame need not be copied to change a few cards. The returned header has no
    structural cards (astropy writes them with the real data).
    """
    conf = config_file(config_name)
    with tempfile.TemporaryDirectory(prefix="gppy_missfits_") as tmp:
        tmp = Path(tmp)
        fits.PrimaryHDU(np.zeros((1, 1), np.float32), clean_header(header)).writeto(tmp / "frame.fits")
        (tmp / "frame.head").write_text(head_text(head))
        opts = {"SAVE_TYPE": "REPLACE", "WRITE_XML": False}
        opts.update({k.upper(): v for k, v in (options or {}).items()})
        run_tool("missfits", ["frame.fits", "-c", str(conf), *option_args(opts)], tmp, timeout=timeout)
        merged = fits.getheader(tmp / "frame.fits")
    return clean_header(merged)


def head_text(head: fits.Header) -> str:
    """A Header as ``.head`` text (what SCAMP writes and MissFITS reads)."""
    lines = [str(card).ljust(80)[:80] for card in head.cards]
    return "\n".join(lines + ["END".ljust(80)]) + "\n"

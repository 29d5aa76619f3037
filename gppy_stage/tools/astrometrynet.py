"""astrometry.net's solve-field on a source list, with Debian's Tycho-2 index files.

Blind solving is the fallback when SCAMP fails or a frame has no usable pointing. It is fed the
SExtractor catalogue (not the image), so it never runs its own extraction, and it is bounded
both by ``--cpulimit`` and by a wall-clock timeout.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..errors import ToolError
from .astromatic import run_tool, tool_version

DEFAULT_INDEX_DIR = "/usr/share/astrometry"


class NotSolvedError(ToolError):
    """solve-field ran but found no solution (within its CPU limit)."""


def solve_field(
    sources: Table,
    width: int,
    height: int,
    *,
    scale_low: float,
    scale_high: float,
    ra: float | None = None,
    dec: float | None = None,
    radius_deg: float | None = None,
    cpulimit: float = 30,
    index_dir: str | Path = DEFAULT_INDEX_DIR,
    x_col: str = "X_IMAGE",
    y_col: str = "Y_IMAGE",
    flux_col: str = "FLUX_AUTO",
    max_sources: int = 300,
    tweak_order: int = 2,
    options: Mapping[str, Any] | None = None,
) -> fits.Header:
    """Solve a source list (pixel positions, 1-based as SExtractor writes them).

    ``scale_low``/``scale_high`` are arcsec/pixel. With ``ra``/``dec``/``radius_deg`` the search is
    limited around a position. Returns the WCS header; its ``meta``-like cards ``ANMATCH``
    (number of matched index stars) are added. Raises NotSolvedError when no solution is found.
    """
    index_dir = Path(index_dir)
    if not any(index_dir.glob("index-*.fits")):
        raise ToolError(f"no astrometry.net index files in {index_dir}: install astrometry-data-tycho2")
    xy = _brightest(sources, x_col, y_col, flux_col, max_sources)
    with tempfile.TemporaryDirectory(prefix="gppy_solve_") as tmp:
        tmp = Path(tmp)
        xy.write(tmp / "xy.fits")
        # our own backend config: the bounded CPU limit and only the index folder we name
        (tmp / "backend.cfg").write_text(f"cpulimit {int(np.ceil(cpulimit))}\nadd_path {index_dir}\nautoindex\n")
        args = _arguments(tmp, width, height, scale_low, scale_high, cpulimit, tweak_order)
        if ra is not None and dec is not None:
            args += ["--ra", f"{ra:.8f}", "--dec", f"{dec:.8f}", "--radius", f"{radius_deg or 2.0:.4f}"]
        for key, value in (options or {}).items():
            args += [f"--{key}"] + ([] if value is True else [str(value)])
        proc = run_tool("solve-field", args, tmp, timeout=cpulimit * 3 + 60)
        if not (tmp / "xy.solved").is_file() or not (tmp / "xy.wcs").is_file():
            raise NotSolvedError(f"solve-field found no solution within {cpulimit} s CPU: "
                                 f"{(proc.stdout or '')[-800:]}")
        header = fits.getheader(tmp / "xy.wcs")
        nmatch = _matched(tmp / "xy.corr")
    return _wcs_cards(header, nmatch)


def _brightest(sources: Table, x_col: str, y_col: str, flux_col: str, max_sources: int) -> Table:
    order = np.argsort(-np.asarray(sources[flux_col], float))[:max_sources]
    return Table({"X": np.asarray(sources[x_col], float)[order], "Y": np.asarray(sources[y_col], float)[order],
                  "FLUX": np.asarray(sources[flux_col], float)[order]})


def _arguments(tmp: Path, width: int, height: int, scale_low: float, scale_high: float, cpulimit: float,
               tweak_order: int) -> list[str]:
    """solve-field's command line for ``xy.fits`` in ``tmp``: only the WCS, the match list and the
    solved flag are written, no plots or new image."""
    return [
        "xy.fits", "--config", "backend.cfg", "--dir", str(tmp), "--overwrite", "--no-plots",
        "--width", str(int(width)), "--height", str(int(height)),
        "--x-column", "X", "--y-column", "Y", "--sort-column", "FLUX",
        "--scale-units", "arcsecperpix", "--scale-low", f"{scale_low:.6g}", "--scale-high", f"{scale_high:.6g}",
        "--cpulimit", str(int(np.ceil(cpulimit))), "--crpix-center", "--tweak-order", str(int(tweak_order)),
        "--new-fits", "none", "--rdls", "none", "--match", "none", "--index-xyls", "none",
        "--temp-axy", "--solved", "xy.solved", "--wcs", "xy.wcs", "--corr", "xy.corr",
    ]


def _matched(corr: Path) -> int:
    """How many index stars the solution matched (rows of the ``.corr`` table; 0 without one)."""
    if not corr.is_file():
        return 0
    with fits.open(corr) as hdul:
        return len(hdul[1].data) if len(hdul) > 1 and hdul[1].data is not None else 0


def _wcs_cards(header: fits.Header, nmatch: int) -> fits.Header:
    """The WCS cards of solve-field's header (not its image structure or history), with ANMATCH and ANVER."""
    out = fits.Header()
    for card in header.cards:
        if card.keyword in ("SIMPLE", "BITPIX", "EXTEND", "NAXIS", "COMMENT", "HISTORY", "DATE") or card.keyword.startswith("NAXIS"):
            continue
        out.append(card, end=True)
    out["ANMATCH"] = (nmatch, "stars matched by astrometry.net")
    out["ANVER"] = (tool_version("solve-field"), "astrometry.net version")
    return out

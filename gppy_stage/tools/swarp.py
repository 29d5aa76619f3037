"""SWarp (Debian's ``SWarp``): resample and co-add images, one temporary directory per call.

``swarp(inputs, options)`` writes each input as a single-HDU image and a single-HDU weight map
(SWarp reads neither extensions nor masks), runs SWarp with ``config/swarp.conf`` overridden by
``options``, and returns the co-add, its weight map and its header. ``template`` (a header with
NAXIS1/2 and a WCS) forces the output grid: SWarp reads it as ``coadd.head``. ``resample`` is the
one-image case (a reference onto a stack's grid). A failing run raises ToolError with SWarp's
stderr; a missing binary ToolMissingError naming the package.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from astropy.io import fits

from ..errors import ToolError
from ..fitsio import clean_header
from . import astromatic

CONFIG = "swarp.conf"


@dataclass
class SwarpInput:
    """One image for SWarp: pixels, a header with a WCS (and FLXSCALE, EGAIN, SATURATE when
    wanted), and a weight map (None: every pixel weight 1)."""

    data: np.ndarray
    header: fits.Header
    weight: np.ndarray | None = None


@dataclass
class SwarpResult:
    image: np.ndarray
    weight: np.ndarray
    header: fits.Header


def template_text(header: fits.Header, shape: tuple[int, int]) -> str:
    """An output-grid header (``coadd.head``): the WCS cards of ``header`` and the size ``shape``."""
    from astropy.wcs import WCS

    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = int(shape[1])
    h["NAXIS2"] = int(shape[0])
    wcs_cards = WCS(header).to_header(relax=True)
    # PV distortion cards of a TPV solution are not always kept by astropy; copy them as they are
    for card in header.cards:
        if card.keyword.startswith(("PV1_", "PV2_")):
            wcs_cards[card.keyword] = card.value
    for card in wcs_cards.cards:
        if card.keyword not in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREF", "MJDREFI", "MJDREFF"):
            h[card.keyword] = card.value
    return h.tostring(sep="\n", endcard=True, padding=False) + "\n"


def swarp(inputs: Sequence[SwarpInput], options: Mapping[str, object] | None = None, *,
          template: tuple[fits.Header, tuple[int, int]] | None = None, timeout: float = 1800) -> SwarpResult:
    """Resample ``inputs`` onto one grid and combine them (see the module docstring)."""
    if not inputs:
        raise ToolError("swarp was given no image")
    conf = str(astromatic.config_file(CONFIG))
    with tempfile.TemporaryDirectory(prefix="gppy-swarp-") as tmp:
        cwd = Path(tmp)
        names = []
        for k, item in enumerate(inputs):
            name = f"in{k:03d}.fits"
            header = clean_header(item.header, commentary=False)
            fits.PrimaryHDU(np.asarray(item.data, np.float32), header).writeto(cwd / name)
            weight = np.ones(item.data.shape, np.float32) if item.weight is None else item.weight
            fits.PrimaryHDU(np.asarray(weight, np.float32)).writeto(cwd / f"in{k:03d}.weight.fits")
            names.append(name)
        (cwd / "inputs.lis").write_text("\n".join(names) + "\n")
        if template is not None:
            (cwd / "coadd.head").write_text(template_text(*template))
        args = ["@inputs.lis", "-c", conf, "-IMAGEOUT_NAME", "coadd.fits", "-WEIGHTOUT_NAME", "coadd.weight.fits",
                "-RESAMPLE_DIR", ".", "-VMEM_DIR", ".", "-WRITE_XML", "N"]
        args += astromatic.option_args(options or {})
        proc = astromatic.run_tool("swarp", args, cwd, timeout=timeout)
        out, wout = cwd / "coadd.fits", cwd / "coadd.weight.fits"
        if not out.is_file() or not wout.is_file():
            raise ToolError(f"swarp wrote no co-add: {(proc.stderr or proc.stdout or '').strip()[-3000:]}")
        with fits.open(out) as hdul:
            image = np.asarray(hdul[0].data, np.float32)
            header = hdul[0].header.copy()
        weight = np.asarray(fits.getdata(wout), np.float32)
    return SwarpResult(image=image, weight=weight, header=header)


def resample(item: SwarpInput, header: fits.Header, shape: tuple[int, int],
             options: Mapping[str, object] | None = None) -> SwarpResult:
    """One image onto the grid of (``header``'s WCS, ``shape``), without subtracting its sky
    unless ``options`` says so. Pixels the image does not cover have weight 0."""
    opts = {"SUBTRACT_BACK": False, "COMBINE_TYPE": "WEIGHTED"} | dict(options or {})
    return swarp([item], opts, template=(header, shape))


def provenance() -> dict[str, str]:
    """SWarp's version and the hash of swarp.conf, for product headers."""
    return astromatic.provenance("swarp", CONFIG)

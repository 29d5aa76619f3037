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
from typing import Iterable, Mapping

import numpy as np
from astropy.io import fits

from ..errors import ToolError
from ..fitsio import clean_header
from ..science.wcsutil import wcs_of
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
    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = int(shape[1])
    h["NAXIS2"] = int(shape[0])
    wcs_cards = wcs_of(header).to_header(relax=True)
    # PV distortion cards of a TPV solution are not always kept by astropy; copy them as they are
    for card in header.cards:
        if card.keyword.startswith(("PV1_", "PV2_")):
            wcs_cards[card.keyword] = card.value
    for card in wcs_cards.cards:
        if card.keyword not in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREF", "MJDREFI", "MJDREFF"):
            h[card.keyword] = card.value
    return h.tostring(sep="\n", endcard=True, padding=False) + "\n"


class Coadd:
    """One SWarp run in its own temporary directory, fed one input at a time.

    Each ``add`` writes the image and its weight map to disk at once, so a caller that loads a
    frame, adds it and lets it go holds one frame whatever the number of inputs; SWarp then
    co-adds from disk within swarp.conf's MEM_MAX / COMBINE_BUFSIZE (VMEM beyond them).
    ``set_keys`` gives an input header cards known only once every input is in (``FLXSCALE``
    from the common zero point), as the input's ``.head`` file, which SWarp reads over the
    image's own header.
    """

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="gppy-swarp-")
        self.cwd = Path(self._tmp.name)
        self.names: list[str] = []

    def __enter__(self) -> "Coadd":
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def add(self, item: SwarpInput) -> int:
        """Write one input; its index (for ``set_keys``)."""
        k = len(self.names)
        name = f"in{k:03d}.fits"
        header = clean_header(item.header, commentary=False)
        fits.PrimaryHDU(np.asarray(item.data, np.float32), header).writeto(self.cwd / name)
        weight = np.ones(item.data.shape, np.float32) if item.weight is None else item.weight
        fits.PrimaryHDU(np.asarray(weight, np.float32)).writeto(self.cwd / f"in{k:03d}.weight.fits")
        self.names.append(name)
        return k

    def set_keys(self, index: int, cards: Mapping[str, object]) -> None:
        h = fits.Header()
        for key, value in cards.items():
            h[key] = value
        (self.cwd / f"in{index:03d}.head").write_text(h.tostring(sep="\n", endcard=True, padding=False) + "\n")

    def run(self, options: Mapping[str, object] | None = None, *,
            template: tuple[fits.Header, tuple[int, int]] | None = None, timeout: float = 1800) -> SwarpResult:
        if not self.names:
            raise ToolError("swarp was given no image")
        cwd = self.cwd
        (cwd / "inputs.lis").write_text("\n".join(self.names) + "\n")
        if template is not None:
            (cwd / "coadd.head").write_text(template_text(*template))
        args = ["@inputs.lis", "-c", str(astromatic.config_file(CONFIG)), "-IMAGEOUT_NAME", "coadd.fits",
                "-WEIGHTOUT_NAME", "coadd.weight.fits", "-RESAMPLE_DIR", ".", "-VMEM_DIR", ".", "-WRITE_XML", "N"]
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


def swarp(inputs: Iterable[SwarpInput], options: Mapping[str, object] | None = None, *,
          template: tuple[fits.Header, tuple[int, int]] | None = None, timeout: float = 1800) -> SwarpResult:
    """Resample ``inputs`` onto one grid and combine them (see the module docstring); a generator
    of inputs is written one at a time (``Coadd``)."""
    with Coadd() as coadd:
        for item in inputs:
            coadd.add(item)
        return coadd.run(options, template=template, timeout=timeout)


def resample(item: SwarpInput, header: fits.Header, shape: tuple[int, int],
             options: Mapping[str, object] | None = None) -> SwarpResult:
    """One image onto the grid of (``header``'s WCS, ``shape``), without subtracting its sky
    unless ``options`` says so. Pixels the image does not cover have weight 0."""
    opts = {"SUBTRACT_BACK": False, "COMBINE_TYPE": "WEIGHTED"} | dict(options or {})
    return swarp([item], opts, template=(header, shape))


def provenance() -> dict[str, str]:
    """SWarp's version and the hash of swarp.conf, for product headers."""
    return astromatic.provenance("swarp", CONFIG)

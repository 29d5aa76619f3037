"""Overscan subtraction and trimming of CCD frames that name a BIASSEC and/or a TRIMSEC.

Sections are FITS sections ``[x1:x2,y1:y2]``: 1-based, inclusive. The overscan is combined along
its short axis (a strip of columns gives one level per row, a strip of rows one per column), as
ccdproc's ``subtract_overscan`` does: the median of each row (or column) of the strip, then, when
``fit_order`` is a number, a least-squares polynomial of that order through those medians, which
keeps the slow drift of the bias and drops the read noise of a ten-pixel-wide strip. The level is
subtracted from the whole frame, which is then cut to TRIMSEC. Frames without either key (7DT's
CMOS frames) are returned untouched, so their products do not change.

A site whose headers do not say where its overscan is gets the keys from a header rule
(``config/header_rules.yaml``: ``sites.<OBS>.set: {BIASSEC: ..., TRIMSEC: ...}``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from ..errors import BadInputError

READ_ROWS = 512  # rows read at a time while measuring the overscan: bounds memory on large CCDs


def parse_section(text: str) -> tuple[slice, slice]:
    """A FITS section ``[x1:x2,y1:y2]`` (1-based, inclusive) as numpy (row, column) slices."""
    body = str(text).strip().strip("[]").replace(" ", "")
    xs, ys = body.split(",")
    x1, x2 = (int(v) for v in xs.split(":"))
    y1, y2 = (int(v) for v in ys.split(":"))
    return slice(min(y1, y2) - 1, max(y1, y2)), slice(min(x1, x2) - 1, max(x1, x2))


@dataclass(frozen=True)
class Layout:
    """Where a frame's overscan and its useful pixels are, as numpy (row, column) slices."""

    biassec: tuple[slice, slice] | None
    trimsec: tuple[slice, slice] | None
    biassec_text: str | None = None
    trimsec_text: str | None = None


def _section(header, key: str, shape: tuple[int, int], url: str | None) -> tuple[slice, slice] | None:
    if key not in header:
        return None
    try:
        rows, cols = parse_section(header[key])
    except (ValueError, TypeError):
        raise BadInputError(f"{key} {header[key]!r} is not a FITS section [x1:x2,y1:y2]", path=url) from None
    if rows.start < 0 or cols.start < 0 or rows.stop > shape[0] or cols.stop > shape[1]:
        raise BadInputError(f"{key} {header[key]!r} lies outside the {shape[1]}x{shape[0]} image", path=url)
    return rows, cols


def layout(header, shape: tuple[int, int], url: str | None = None) -> Layout | None:
    """The frame's overscan layout, None where it names neither BIASSEC nor TRIMSEC."""
    bias, trim = _section(header, "BIASSEC", shape, url), _section(header, "TRIMSEC", shape, url)
    if bias is None and trim is None:
        return None
    return Layout(bias, trim, header.get("BIASSEC"), header.get("TRIMSEC"))


def _fit(medians: np.ndarray, fit_order: int | None) -> np.ndarray:
    if fit_order is None:
        return medians
    x = np.arange(medians.size, dtype=float)
    return np.polynomial.Polynomial.fit(x, medians, deg=min(int(fit_order), medians.size - 1))(x)


def levels(read_rows, shape: tuple[int, int], biassec: tuple[slice, slice], fit_order: int | None):
    """``(axis, level)``: axis 0 when ``level`` holds one value per row of the frame, 1 when one
    per column. ``read_rows(start, stop)`` returns the frame's rows as floats."""
    rows, cols = biassec
    per_row = (rows.stop - rows.start) >= (cols.stop - cols.start)
    strips = []
    for start in range(rows.start, rows.stop, READ_ROWS):
        strips.append(np.asarray(read_rows(start, min(start + READ_ROWS, rows.stop))[:, cols], dtype=np.float64))
    region = np.concatenate(strips)
    if per_row:
        level = _fit(np.median(region, axis=1), fit_order)
        full = np.interp(np.arange(shape[0]), np.arange(rows.start, rows.stop), level)  # rows outside: nearest edge
        return 0, full.astype(np.float32)
    level = _fit(np.median(region, axis=0), fit_order)
    full = np.interp(np.arange(shape[1]), np.arange(cols.start, cols.stop), level)
    return 1, full.astype(np.float32)


class Prepared:
    """A raw frame seen overscan-subtracted and trimmed: the same ``rows``/``all``/``shape``/
    ``header``/``url`` as ``fitsio.RawFrame``, so the masters' chunked combine and the reduce stage
    read it as they read any raw frame."""

    def __init__(self, raw, lay: Layout, fit_order: int | None):
        self.url, self.header, self.index = raw.url, raw.header, getattr(raw, "index", 0)
        self.layout = lay
        self._raw = raw
        ny, nx = raw.shape
        self._rows, self._cols = lay.trimsec or (slice(0, ny), slice(0, nx))
        self.shape = (self._rows.stop - self._rows.start, self._cols.stop - self._cols.start)
        self.axis, self.level = (levels(raw.rows, raw.shape, lay.biassec, fit_order) if lay.biassec
                                 else (None, None))

    def rows(self, start: int, stop: int) -> np.ndarray:
        r0 = self._rows.start
        block = self._raw.rows(r0 + start, r0 + stop)
        if self.axis == 0:
            block -= self.level[r0 + start:r0 + stop, None]
        elif self.axis == 1:
            block -= self.level[None, :]
        return np.ascontiguousarray(block[:, self._cols])

    def all(self) -> np.ndarray:
        return self.rows(0, self.shape[0])

    @property
    def mean_level(self) -> float:
        """The mean overscan level over the kept pixels (0 without a BIASSEC)."""
        if self.level is None:
            return 0.0
        kept = self.level[self._rows] if self.axis == 0 else self.level[self._cols]
        return float(np.mean(kept))

    def cards(self, fit_order: int | None) -> dict:
        """What the product header says was done."""
        out = {}
        if self.layout.biassec is not None:
            method = "row/column median" + ("" if fit_order is None else f", polynomial order {fit_order}")
            out["OVERSCAN"] = (round(self.mean_level, 3), "mean overscan level subtracted (ADU)")
            out["OVSCMETH"] = (method, "overscan model")
            out["BIASSEC"] = (self.layout.biassec_text, "overscan of the raw frame")
        if self.layout.trimsec is not None:
            out["TRIMSEC"] = (self.layout.trimsec_text, "section of the raw frame kept")
        return out


def prepare(raw, header, fit_order: int | None):
    """``raw`` itself where ``header`` (its normalised header: a site's rule may add the sections)
    names no overscan or trim section, else a ``Prepared`` view."""
    lay = layout(header, raw.shape, raw.url)
    return raw if lay is None else Prepared(raw, lay, fit_order)


def shift_wcs(header: fits.Header, lay: Layout) -> None:
    """Move the WCS reference pixel (and IRAF's LTV) by the trim, so sky positions stay put."""
    if lay.trimsec is None:
        return
    rows, cols = lay.trimsec
    for axis, offset in ((1, cols.start), (2, rows.start)):
        if f"CRPIX{axis}" in header:
            header[f"CRPIX{axis}"] = float(header[f"CRPIX{axis}"]) - offset
        if f"LTV{axis}" in header:
            header[f"LTV{axis}"] = float(header[f"LTV{axis}"]) - offset

"""Reading raw frames without loading them whole, reading header values, and writing products atomically.

A 61-megapixel 7DT frame is 122 MB as uint16 and 245 MB as float32; the masters stage reads row
chunks through a memory map so nine of them combine in bounded memory.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from . import log, storage
from .errors import BadInputError
from .science.combine import sigma_clipped_median
from .xp import to_numpy

_log = log.get("fitsio")

# cards astropy writes itself with the data, or that would make a tool read an image wrongly
STRUCTURAL = ("SIMPLE", "BITPIX", "EXTEND", "BZERO", "BSCALE", "PCOUNT", "GCOUNT", "XTENSION", "EXTNAME",
              "BLANK", "CHECKSUM", "DATASUM")


def clean_header(header: fits.Header | None, *, commentary: bool = True) -> fits.Header:
    """A copy without the structural cards (they would clash with the data written beside them);
    ``commentary=False`` drops COMMENT/HISTORY too."""
    out = fits.Header()
    for card in (header.cards if header is not None else ()):
        key = card.keyword
        if key in STRUCTURAL or key.startswith("NAXIS") or (not commentary and key in ("COMMENT", "HISTORY", "")):
            continue
        out.append(card, end=True)
    return out


def image_hdu_index(hdul: fits.HDUList) -> int:
    """The first HDU with a 2-D image (primary for 7DT; extension 1 for tile-compressed or MEF)."""
    for i, hdu in enumerate(hdul):
        if hdu.is_image and hdu.header.get("NAXIS", 0) == 2:
            return i
    raise BadInputError("no 2-D image in this file", path=hdul.filename())


def header_zero_point(header: fits.Header, keys) -> tuple[float | None, str | None]:
    """(value, key) of the first of ``keys`` the header holds as a finite number, or (None, None):
    the photometry stage writes ``ZP``, a reference frame may carry ``MAGZERO`` or another name."""
    for key in keys:
        value = header.get(key)
        try:
            if value is not None and math.isfinite(float(value)):
                return float(value), key
        except (TypeError, ValueError):
            continue
    return None, None


class RawFrame:
    """A raw frame opened for chunked reading, with BZERO/BSCALE applied per chunk."""

    def __init__(self, path: Path, url: str):
        self.url = url
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("error", AstropyUserWarning)
                # a stray byte in a comment costs no key the pipeline reads: astropy makes it '?'
                warnings.filterwarnings("always", message="non-ASCII characters", category=AstropyUserWarning)
                self._hdul = fits.open(path, memmap=True, do_not_scale_image_data=True, lazy_load_hdus=False)
            if caught:
                log.event(_log, "non-ASCII bytes in the header replaced by '?'", level=30, file=url)
            self.index = image_hdu_index(self._hdul)
            hdu = self._hdul[self.index]
            self.header = hdu.header
            self._data = hdu.data
            if self._data is None or self._data.ndim != 2:
                raise BadInputError("the image HDU holds no 2-D data", path=url)
            self.shape = self._data.shape
            self._bzero = float(self.header.get("BZERO", 0.0))
            self._bscale = float(self.header.get("BSCALE", 1.0))
            # Touch the last row: a truncated file fails here, not halfway through a combine.
            _ = np.asarray(self._data[-1, -1])
        except BadInputError:
            raise
        except (OSError, ValueError, TypeError, IndexError, AstropyUserWarning) as exc:
            raise BadInputError(f"cannot read FITS data ({type(exc).__name__}: {exc})", path=url) from None

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 physical values."""
        try:
            block = np.asarray(self._data[start:stop], dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot read rows {start}-{stop} ({exc})", path=self.url) from None
        if self._bscale != 1.0:
            block *= self._bscale
        if self._bzero:
            block += self._bzero
        return block

    def all(self) -> np.ndarray:
        return self.rows(0, self.shape[0])

    def close(self):
        self._hdul.close()


def combine_files(frames: list[RawFrame], prepare: Callable[[np.ndarray, int, int, int], np.ndarray],
                  *, sigma: float, iterations: int, chunk_rows: int, xp=np) -> tuple[np.ndarray, int]:
    """Sigma-clipped median of frames, chunk by chunk. ``prepare(rows, start, stop, i)`` calibrates
    frame ``i``'s rows before combining. Returns the image and the fewest frames any pixel kept."""
    shape = frames[0].shape
    for f in frames[1:]:
        if f.shape != shape:
            raise BadInputError(f"frame is {f.shape[1]}x{f.shape[0]}, the set is {shape[1]}x{shape[0]}", path=f.url)
    out = np.empty(shape, dtype=np.float32)
    fewest = len(frames)
    for start in range(0, shape[0], chunk_rows):
        stop = min(start + chunk_rows, shape[0])
        stack = xp.stack([xp.asarray(prepare(f.rows(start, stop), start, stop, i)) for i, f in enumerate(frames)])
        med, n = sigma_clipped_median(stack, sigma=sigma, iterations=iterations, xp=xp)
        out[start:stop] = to_numpy(med)
        fewest = min(fewest, int(to_numpy(n).min()))
    return out, fewest


@contextlib.contextmanager
def open_raw(url: str) -> Iterator[RawFrame]:
    """Open a raw frame by URL (downloaded first when it lives on S3)."""
    with storage.local_copy(url) as path:
        frame = RawFrame(path, url)
        try:
            yield frame
        finally:
            frame.close()


def put_hdul(url: str, hdul: fits.HDUList) -> None:
    """Write a FITS product whole or not at all.

    Written to a temporary file first rather than to bytes in memory: a calibrated 61-Mpix frame
    with its MASK and VARIANCE is 550 MB, which should not be held twice.
    """
    with tempfile.TemporaryDirectory(prefix="gppy-put-") as tmp:
        path = Path(tmp) / "product.fits"
        with warnings.catch_warnings():
            # Long HIERARCH keys (ZP_APER_1...) leave little room for a comment; astropy shortens
            # it, which loses nothing that matters and would otherwise warn in every stage's log.
            warnings.filterwarnings("ignore", message="Card is too long, comment will be truncated")
            hdul.writeto(path, output_verify="fix")
        storage.put_file(path, url)


def read_hdul(url: str) -> fits.HDUList:
    """Read a (product) FITS file fully into memory."""
    try:
        hdul = fits.HDUList.fromstring(storage.get_bytes(url))
        for hdu in hdul:
            _ = hdu.data  # a truncated file fails here, as bad input, not later as a bug
        return hdul
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise BadInputError(f"cannot read FITS ({type(exc).__name__}: {exc})", path=url) from None

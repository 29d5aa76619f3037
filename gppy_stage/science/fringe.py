"""Fringe removal (gpPy's defringe for LOAO z and y): a master fringe frame and a scale per frame.

The master is the median of a night's flat-fielded science frames of one band, each first made
relative to its own sky (``frame / sky - 1``) with its sources masked, so stars and galaxies that
move between frames drop out and frames of different sky levels agree. Its zero is its median:
subtracting it leaves a frame's sky level where it was.

The scale is gpPy's: on the master, pairs of positions on a fringe maximum and a nearby minimum
(one pair per cell of a grid, so a pair also cancels the sky's slow gradients); on each frame the
median of the box around each position. The frame's bright-minus-dark differences over the
master's give the scale (the median over pairs, robust to a star on a position), in ADU per unit
of the master; ``frame - scale x master`` is the defringed frame.

Pure functions on NumPy arrays.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from .combine import sigma_clipped_median
from .photometry import NMAD


def _block_background(data: np.ndarray, block: int) -> np.ndarray:
    """A coarse background: the median of each ``block`` x ``block`` cell, repeated back to full size.
    Smooth enough to keep stars out, fine enough to follow fringes wider than a few blocks."""
    ny, nx = data.shape
    py, px = -ny % block, -nx % block
    padded = np.pad(data, ((0, py), (0, px)), mode="edge")
    cells = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell all masked stays NaN: no source found there
        med = np.nanmedian(cells.transpose(0, 2, 1, 3).reshape(cells.shape[0], cells.shape[2], -1), axis=2)
    return np.repeat(np.repeat(med, block, axis=0), block, axis=1)[:ny, :nx]


def sources(data: np.ndarray, *, nsigma: float = 5.0, grow: int = 3, block: int = 8) -> np.ndarray:
    """Pixels of stars, galaxies and cosmic rays (and non-finite ones): ``nsigma`` above a coarse
    background, grown by ``grow`` pixels. The fringes, wider than a few blocks, are background."""
    residual = data - _block_background(data, block)
    finite = np.isfinite(residual)
    sample = residual[finite][:: max(1, int(finite.sum()) // 200_000)]
    noise = NMAD * float(np.median(np.abs(sample - np.median(sample)))) if sample.size else 0.0
    with np.errstate(invalid="ignore"):
        found = ~finite | (residual > nsigma * max(noise, 1e-6))
    return ndimage.binary_dilation(found, iterations=grow) if grow else found


def relative_sky(data: np.ndarray, **kw) -> tuple[np.ndarray, float]:
    """``(frame / sky - 1, sky)`` with the frame's sources set to NaN: what a master is combined from."""
    data = np.asarray(data, dtype=np.float32)
    finite = data[np.isfinite(data)]
    sky = float(np.median(finite[:: max(1, finite.size // 200_000)])) if finite.size else float("nan")
    if not sky > 0:
        raise ValueError(f"the sky level is {sky:g} ADU: a frame without sky cannot show fringes")
    rel = data / np.float32(sky) - np.float32(1)
    rel[sources(data, **kw)] = np.nan
    return rel, sky


def build_master(relative_frames: list[np.ndarray], *, sigma: float = 3.0, iterations: int = 3) -> np.ndarray:
    """The master fringe frame (fraction of the sky, median zero) from ``relative_sky`` frames."""
    if len(relative_frames) < 2:
        raise ValueError("a master fringe frame needs at least two frames (one cannot outvote its stars)")
    med, _ = sigma_clipped_median(np.stack(relative_frames), sigma=sigma, iterations=iterations)
    med = np.where(np.isfinite(med), med, np.float32(np.nan))
    med -= np.float32(np.nanmedian(med))
    return np.nan_to_num(med, nan=0.0).astype(np.float32)


def choose_pairs(master: np.ndarray, *, grid: int = 16, box: int = 9) -> np.ndarray:
    """``(n, 4)`` int array of (y_bright, x_bright, y_dark, x_dark): in each cell of a ``grid`` x
    ``grid`` grid, the maximum and the minimum of the box-smoothed master."""
    smooth = ndimage.uniform_filter(np.asarray(master, dtype=np.float32), size=box, mode="nearest")
    ny, nx = smooth.shape
    edge = box  # a box around a position must lie inside the frame
    ys = np.linspace(edge, ny - edge, grid + 1).astype(int)
    xs = np.linspace(edge, nx - edge, grid + 1).astype(int)
    pairs = []
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            cell = smooth[y0:y1, x0:x1]
            if cell.size == 0:
                continue
            hy, hx = np.unravel_index(int(np.argmax(cell)), cell.shape)
            ly, lx = np.unravel_index(int(np.argmin(cell)), cell.shape)
            pairs.append((y0 + hy, x0 + hx, y0 + ly, x0 + lx))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 4)


def _box_medians(data: np.ndarray, ys: np.ndarray, xs: np.ndarray, box: int) -> np.ndarray:
    half = box // 2
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a box all masked: NaN, and that pair is left out
        return np.array([np.nanmedian(data[y - half:y + half + 1, x - half:x + half + 1]) for y, x in zip(ys, xs)])


def scale(data: np.ndarray, master: np.ndarray, pairs: np.ndarray, *, box: int = 9) -> float:
    """The fringe scale of a frame (ADU per unit of the master): the median over pairs of the
    frame's bright-minus-dark difference over the master's, the frame's sources left out (a star
    in a box would read as a fringe maximum)."""
    data = np.where(sources(np.asarray(data, dtype=np.float32)), np.float32(np.nan), data)
    frame_diff = _box_medians(data, pairs[:, 0], pairs[:, 1], box) - _box_medians(data, pairs[:, 2], pairs[:, 3], box)
    master_diff = _box_medians(master, pairs[:, 0], pairs[:, 1], box) - _box_medians(master, pairs[:, 2], pairs[:, 3], box)
    ok = np.isfinite(frame_diff) & np.isfinite(master_diff) & (master_diff > 0)
    if not ok.any():
        raise ValueError("no fringe pair with a contrast on the master")
    return float(np.median(frame_diff[ok] / master_diff[ok]))


def amplitude(image: np.ndarray, pairs: np.ndarray, *, box: int = 9) -> float:
    """The median bright-minus-dark difference of ``image`` at the pairs (the fringe amplitude a
    test compares before and after)."""
    d = _box_medians(image, pairs[:, 0], pairs[:, 1], box) - _box_medians(image, pairs[:, 2], pairs[:, 3], box)
    return float(np.nanmedian(d))

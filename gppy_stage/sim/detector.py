"""The camera: bias pattern, dark current with hot pixels, flat field, cosmic rays, noise and
digitisation. Maps depend on (unit, seed, shape) only, never on the night, so two nights of a
unit share them (a night may borrow another night's masters)."""

from __future__ import annotations

import numpy as np

from . import model

CHUNK_ROWS = 512  # noise is drawn in row chunks so a full 61-Mpixel frame stays within a few GB


def _norm_coords(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = shape
    x = np.linspace(-1.0, 1.0, nx, dtype=np.float32)
    y = np.linspace(-1.0, 1.0, ny, dtype=np.float32)
    return x, y


def bias_pattern(shape: tuple[int, int], unit: str, seed: int) -> np.ndarray:
    """True bias (float32 ADU): ~512.6 plus a smooth gradient, column and row structure (a few ADU),
    kept small enough that a master passes 7DT's QA (clipped std <= 2.5 ADU)."""
    rng = model.rng_for(seed, unit, "bias", *shape)
    x, y = _norm_coords(shape)
    a = rng.normal(0.0, 0.6, 4).astype(np.float32)
    cols = rng.normal(0.0, 0.7, shape[1]).astype(np.float32)
    bad = rng.choice(shape[1], size=max(2, shape[1] // 300), replace=False)
    cols[bad] += rng.choice([-1.0, 1.0], bad.size).astype(np.float32) * rng.uniform(2.0, 4.0, bad.size).astype(np.float32)
    rows = rng.normal(0.0, 0.25, shape[0]).astype(np.float32)
    out = np.empty(shape, np.float32)
    out[...] = np.float32(model.BIAS_LEVEL) + a[0] * x[None, :] + a[1] * y[:, None]
    out += a[2] * (x[None, :] * y[:, None]) + a[3] * (x[None, :] ** 2 - 0.33)
    out += cols[None, :]
    out += rows[:, None]
    return out


def dark_rate(shape: tuple[int, int], unit: str, seed: int, dark_e: float, gain: float) -> tuple[np.ndarray, np.ndarray]:
    """True dark rate (float32 ADU/s) and the flat indices of hot pixels. The base rate has a mild
    glow towards one corner; hot pixels run at 0.3-100 e-/s."""
    rng = model.rng_for(seed, unit, "dark", *shape)
    x, y = _norm_coords(shape)
    glow = np.float32(0.15) * np.exp(np.float32(1.5) * (x[None, :] - 1.0)) * np.exp(np.float32(1.5) * (y[:, None] - 1.0))
    out = (np.float32(dark_e / gain) * (np.float32(1.0) + glow)).astype(np.float32)
    npix = shape[0] * shape[1]
    nhot = max(10, int(round(model.HOT_PIXEL_FRACTION * npix)))
    hot = np.sort(rng.choice(npix, size=nhot, replace=False))
    rates = np.clip(rng.lognormal(np.log(3.0), 1.2, nhot), 0.3, 100.0) / gain
    out.reshape(-1)[hot] += rates.astype(np.float32)
    return out, hot


def true_flat(shape: tuple[int, int], unit: str, seed: int, filt: str) -> np.ndarray:
    """Vignetting (~15% at the corners) x dust donuts (a few % deep) x pixel response (~1%),
    normalised to median 1. The pixel response and donut positions belong to the unit; depths vary
    a little with the filter."""
    ny, nx = shape
    rng = model.rng_for(seed, unit, "flat", *shape)
    frng = model.rng_for(seed, unit, "flat", filt, *shape)
    # optical axis a little off centre
    cx = nx / 2 + rng.normal(0, 0.02 * nx)
    cy = ny / 2 + rng.normal(0, 0.02 * ny)
    rmax2 = np.float32((nx / 2) ** 2 + (ny / 2) ** 2)
    xs = ((np.arange(nx, dtype=np.float32) - np.float32(cx)) ** 2) / rmax2
    ys = ((np.arange(ny, dtype=np.float32) - np.float32(cy)) ** 2) / rmax2
    depth = np.float32(0.15 * (1.0 + 0.1 * (model.WAVELENGTH[filt] - 600.0) / 300.0) * frng.uniform(0.95, 1.05))
    r2 = np.empty(shape, np.float32)
    np.add(ys[:, None], xs[None, :], out=r2)
    flat = np.float32(1.0) - depth * (np.float32(0.7) * r2 + np.float32(0.3) * r2 * r2)
    del r2
    # dust donuts: a defocused shadow is a ring with a shallower interior
    ndonut = max(3, int(rng.poisson(40 * nx * ny / (9576 * 6388)) + 3))
    for _ in range(ndonut):
        radius = rng.uniform(12.0, 60.0)
        dx0, dy0 = rng.uniform(0, nx), rng.uniform(0, ny)
        d = rng.uniform(0.02, 0.05) * frng.uniform(0.8, 1.2)
        w = radius / 4.0
        half = int(radius + 3 * w) + 1
        x0, x1 = max(0, int(dx0) - half), min(nx, int(dx0) + half + 1)
        y0, y1 = max(0, int(dy0) - half), min(ny, int(dy0) + half + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        rr = np.hypot(xx - np.float32(dx0), yy - np.float32(dy0))
        shadow = d * np.exp(-(((rr - radius) / w) ** 2)) + 0.3 * d * (rr < radius)
        flat[y0:y1, x0:x1] *= (1.0 - shadow).astype(np.float32)
    # pixel response, the same for every filter of the unit: drawn in row chunks to bound memory
    prng = model.rng_for(seed, unit, "prnu", *shape)
    for r0 in range(0, ny, CHUNK_ROWS):
        r1 = min(ny, r0 + CHUNK_ROWS)
        flat[r0:r1] *= np.float32(1.0) + np.float32(0.01) * prng.standard_normal((r1 - r0, nx), dtype=np.float32)
    flat /= np.float32(np.median(flat))
    return flat


def cosmic_rays(shape: tuple[int, int], exptime: float, rng: np.random.Generator,
                rate: float = model.CR_RATE) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Cosmic-ray hits for one exposure: (flat pixel indices, electrons per pixel, hits).

    30% single pixels, the rest straight tracks 2-10 px long; every touched pixel gets at least
    ~60 e- (well above read and sky noise). Each hit records its brightest pixel and peak."""
    ny, nx = shape
    area_cm2 = nx * ny * (model.PIXEL_UM * 1e-4) ** 2
    n = int(rng.poisson(rate * area_cm2 * (exptime + 1.0)))  # +1 s: hits during readout
    idx_parts, val_parts, hits = [], [], []
    for _ in range(n):
        y0, x0 = rng.uniform(0, ny), rng.uniform(0, nx)
        if rng.random() < 0.3:
            py, px = np.array([int(y0)]), np.array([int(x0)])
        else:
            length = rng.uniform(2.0, 10.0)
            theta = rng.uniform(0, np.pi)
            t = np.arange(0.0, length, 0.3)
            py = (y0 + t * np.sin(theta)).astype(int)
            px = (x0 + t * np.cos(theta)).astype(int)
            keep = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
            flat_i = np.unique(py[keep] * nx + px[keep])
            py, px = flat_i // nx, flat_i % nx
            if py.size == 0:
                continue
        vals = np.maximum(rng.lognormal(np.log(700.0), 0.7, py.size), 60.0)
        k = int(np.argmax(vals))
        hits.append({"y": int(py[k]), "x": int(px[k]), "peak_e": round(float(vals[k]), 2), "npix": int(py.size)})
        idx_parts.append(py * nx + px)
        val_parts.append(vals)
    if not idx_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), hits
    idx = np.concatenate(idx_parts)
    vals = np.concatenate(val_parts)
    uniq, inv = np.unique(idx, return_inverse=True)
    summed = np.zeros(uniq.size)
    np.add.at(summed, inv, vals)
    return uniq.astype(np.int64), summed.astype(np.float32), hits


def digitise(expected_e: np.ndarray | None, bias_adu: np.ndarray, gain: float, rdnoise_e: float,
             rng: np.random.Generator, cr: tuple[np.ndarray, np.ndarray] | None = None,
             saturation: float = 65535.0) -> np.ndarray:
    """Poisson(expected electrons) + cosmic rays + read noise, to ADU, plus bias, rounded and
    clipped to 0..saturation: the uint16 a raw frame holds. expected_e None is a bias frame."""
    shape = bias_adu.shape
    ny, nx = shape
    out = np.empty(shape, np.uint16)
    cr_idx, cr_val = cr if cr is not None else (np.zeros(0, np.int64), np.zeros(0, np.float32))
    cr_rows = cr_idx // nx
    for r0 in range(0, ny, CHUNK_ROWS):
        r1 = min(ny, r0 + CHUNK_ROWS)
        if expected_e is None:
            e = np.zeros((r1 - r0, nx), np.float32)
        else:
            e = rng.poisson(np.maximum(expected_e[r0:r1], 0).astype(np.float64)).astype(np.float32)
        sel = (cr_rows >= r0) & (cr_rows < r1)
        if sel.any():
            e.reshape(-1)[cr_idx[sel] - r0 * nx] += cr_val[sel]
        e += np.float32(rdnoise_e) * rng.standard_normal(e.shape, dtype=np.float32)
        adu = e / np.float32(gain) + bias_adu[r0:r1]
        out[r0:r1] = np.clip(np.floor(adu + np.float32(0.5)), 0, saturation).astype(np.uint16)
    return out


def add_noise_adu(image: np.ndarray, gain: float, rdnoise_e: float, rng: np.random.Generator) -> np.ndarray:
    """Replace an expectation in ADU by a noisy realisation (Poisson in electrons + read noise),
    in place and in row chunks; no bias, no quantisation."""
    ny, nx = image.shape
    for r0 in range(0, ny, CHUNK_ROWS):
        r1 = min(ny, r0 + CHUNK_ROWS)
        e = rng.poisson(np.maximum(image[r0:r1], 0).astype(np.float64) * gain)
        e = e + rdnoise_e * rng.standard_normal(e.shape)
        image[r0:r1] = (e / gain).astype(image.dtype)
    return image


def cr_mask(shape: tuple[int, int], cr_idx: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask.reshape(-1)[cr_idx] = 1
    return mask

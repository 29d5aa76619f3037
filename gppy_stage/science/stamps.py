"""What a person looks at: new | ref | diff cut-outs as PNG, and DS9 region files.

Pure functions returning bytes or text; the caller decides where they go (storage module).
Matplotlib is used through its object API with the Agg canvas, never pyplot, so nothing
depends on a display or on global figure state in a batch pod.
"""

from __future__ import annotations


import numpy as np

from gppy_stage.science import plots
from gppy_stage.xp import to_numpy


def _cutout(img, x, y, half):
    """(2*half+1)^2 cut-out centred on the nearest pixel, NaN outside the image."""
    ny, nx = img.shape
    cx, cy = int(round(x)), int(round(y))
    out = np.full((2 * half + 1, 2 * half + 1), np.nan)
    y0, y1, x0, x1 = cy - half, cy + half + 1, cx - half, cx + half + 1
    sy0, sx0 = max(0, -y0), max(0, -x0)
    ys, xs = slice(max(y0, 0), min(y1, ny)), slice(max(x0, 0), min(x1, nx))
    block = img[ys, xs]
    out[sy0:sy0 + block.shape[0], sx0:sx0 + block.shape[1]] = block
    return out


def _zscale(a):
    from astropy.visualization import ZScaleInterval

    good = a[np.isfinite(a)]
    if good.size < 4:
        return 0.0, 1.0
    lo, hi = ZScaleInterval().get_limits(good)
    return (lo, hi) if hi > lo else (float(good.min()), float(good.max()) + 1e-9)


def stamp_png(new, ref, diff, x: float, y: float, *, half: int = 15, title: str = "", noise=None) -> bytes:
    """One PNG: new | ref | diff, each zscaled on its own; the diff symmetric about zero.

    With ``noise`` the diff panel shows S/N (diff / noise) in -5..5, which reads the same on
    every candidate; otherwise the diff is scaled to its own +-max.
    """
    panels = [_cutout(to_numpy(new), x, y, half), _cutout(to_numpy(ref), x, y, half), _cutout(to_numpy(diff), x, y, half)]
    fig = plots.figure((7.5, 2.8))
    axes = fig.subplots(1, 3)
    labels = ["new", "ref", "diff"]
    for k, (ax, p) in enumerate(zip(axes, panels)):
        if k < 2:
            lo, hi = _zscale(p)
            ax.imshow(p, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        else:
            if noise is not None:
                nz = _cutout(to_numpy(noise), x, y, half)
                with np.errstate(invalid="ignore"):
                    p = np.where(nz > 0, p / np.where(nz > 0, nz, 1.0), np.nan)  # no noise: no S/N to show
                lim, lab = 5.0, "diff / noise"
            else:
                lim = float(np.nanmax(np.abs(p))) if np.isfinite(p).any() else 1.0
                lab = "diff"
            ax.imshow(p, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            labels[2] = lab
        ax.plot([half], [half], marker="+", color="lime", ms=14, mew=1.0)
        ax.set_title(labels[k], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return plots.png(fig)


def candidate_stamps(new, ref, diff, table, *, half: int = 15, noise=None, max_stamps: int | None = None) -> dict:
    """{candidate id: PNG bytes}, best score first when the table has one."""
    rows = table
    if "score" in table.colnames:
        rows = table[np.argsort(-np.asarray(table["score"]))]
    if max_stamps is not None:
        rows = rows[:max_stamps]
    out = {}
    for r in rows:
        flags = [name for name in ("near_edge", "near_mask", "dipole", "elongated", "bad_fwhm", "negative",
                                   "ref_star", "moving") if name in r.colnames and bool(r[name])]
        title = f"#{r['id']}  x={r['x']:.1f} y={r['y']:.1f}"
        if "mag" in r.colnames and np.isfinite(r["mag"]):
            title += f"  mag={r['mag']:.2f}"
        if "snr" in r.colnames:
            title += f"  S/N={r['snr']:.1f}"
        if "score" in r.colnames:
            title += f"  score={r['score']:.2f}"
        if flags:
            title += "\n" + " ".join(flags)
        out[int(r["id"])] = stamp_png(new, ref, diff, float(r["x"]), float(r["y"]), half=half, title=title,
                                      noise=noise)
    return out


def region_text(table, *, radius_px: float = 6.0, radius_arcsec: float = 3.0, sky: bool | None = None,
                good_score: float = 0.5) -> str:
    """DS9 region file: a circle per candidate, green when score >= good_score, red otherwise,
    labelled with its id, its flag bits and, for a mover, its rate and angle (and its known name).

    ``sky`` True writes fk5 circles from ra/dec, False image circles (1-based, as DS9 counts);
    None picks fk5 when every row has finite ra/dec.
    """
    if sky is None:
        sky = len(table) > 0 and "ra" in table.colnames and bool(np.all(np.isfinite(np.asarray(table["ra"], float))))
    lines = ["# Region file format: DS9 version 4.1",
             'global color=green dashlist=8 3 width=1 font="helvetica 10 normal roman" select=1 highlite=1 '
             'dash=0 fixed=0 edit=1 move=1 delete=1 include=1 source=1',
             "fk5" if sky else "image"]
    for r in table:
        score = float(r["score"]) if "score" in r.colnames else 1.0
        color = "green" if score >= good_score else "red"
        label = f"{r['id']}"
        if "flags" in r.colnames and int(r["flags"]):
            label += f" f{int(r['flags'])}"
        if "rate_arcsec_h" in r.colnames and np.isfinite(float(r["rate_arcsec_h"])):
            label += f' moving {float(r["rate_arcsec_h"]):.1f}"/h PA {float(r["pa_deg"]):.0f}'
        if "sso_name" in r.colnames and str(r["sso_name"]):
            label += f" {r['sso_name']}"
        if sky:
            lines.append(f'circle({float(r["ra"]):.7f},{float(r["dec"]):.7f},{radius_arcsec:.2f}") '
                         f"# color={color} text={{{label}}}")
        else:
            lines.append(f"circle({float(r['x']) + 1:.2f},{float(r['y']) + 1:.2f},{radius_px:.2f}) "
                         f"# color={color} text={{{label}}}")
    return "\n".join(lines) + "\n"


def light_curve_png(table, *, title: str = "") -> bytes:
    """A small panel: forced flux (uJy) of each frame against hours since the first, with 1-sigma
    bars; a frame below S/N 5 is an open marker at its 5-sigma limit with a downward arrow; the
    stack's flux a band across the panel (it is the mean of the frames, not one more epoch)."""
    fig = plots.figure((4.0, 2.6))
    ax = fig.subplots()
    kind = np.asarray(table["kind"]) if len(table) else np.zeros(0, str)
    frames, stack = table[kind == "frame"], table[kind == "stack"]
    t0 = float(np.min(frames["mjd"])) if len(frames) else 0.0
    if len(frames):
        hours = (np.asarray(frames["mjd"], float) - t0) * 24.0
        flux, err = np.asarray(frames["flux_ujy"], float), np.asarray(frames["flux_err_ujy"], float)
        lim = np.asarray(frames["upper_limit"], bool)
        ax.errorbar(hours[~lim], flux[~lim], yerr=err[~lim], fmt="o", color="k", ms=4, capsize=2, label="frame")
        if lim.any():
            ax.errorbar(hours[lim], 5 * err[lim], yerr=1.5 * err[lim], uplims=True, fmt="v", mfc="none", color="0.4",
                        ms=5, label="5$\\sigma$ limit")
    for r in stack:
        f, e = float(r["flux_ujy"]), float(r["flux_err_ujy"])
        ax.axhspan(f - e, f + e, color="tab:blue", alpha=0.25, lw=0)
        ax.axhline(f, color="tab:blue", lw=1, label="stack")
    ax.axhline(0.0, color="0.7", lw=0.5)
    ax.set_xlabel("hours since first frame", fontsize=8)
    ax.set_ylabel("flux [uJy]", fontsize=8)
    ax.tick_params(labelsize=7)
    if len(table):
        ax.legend(fontsize=6, loc="best")
    if title:
        ax.set_title(title, fontsize=8)
    return plots.png(fig)

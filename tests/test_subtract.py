"""Image subtraction: the native Alard-Lupton engine against simulated truth, and the HOTPANTS
wrapper where the binary exists.

The pairs are seeded simulations (gppy_stage.sim.pairs) whose truth is exact: the
injected fluxes, the flux-scale ratio, and the per-pixel variances of the noiseless models.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from gppy_stage.errors import BadInputError, ConfigError, ToolMissingError
from gppy_stage.science.convolve import box_dilate, fft_convolve
from gppy_stage.science.kernel import measure_fwhm
from gppy_stage.science.kernel_fit import kernel_basis, stamp_convolutions
from gppy_stage.science.subtract import SubtractionResult, subtract
from gppy_stage.sim.pairs import make_pair
from gppy_stage.tools import hotpants as sh

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_subtract.py"
SHAPE = (512, 512)
SCALE = 1.3
INJ_FLUX = 1.0e5  # in reference units
RNG = np.random.default_rng(11)
INJECT = [(float(x), float(y), INJ_FLUX) for x, y in zip(RNG.uniform(40, 470, 8), RNG.uniform(40, 470, 8))]


def _pair(**kw):
    args = dict(n_stars=250, fwhm_new=4.0, fwhm_ref=2.5, flux_scale=SCALE, sky_new=1200.0, sky_ref=1000.0,
                fwhm_new_gradient=0.15, inject=INJECT, seed=7)
    args.update(kw)
    return make_pair(SHAPE, **args)


@pytest.fixture(scope="module")
def pair():
    return _pair()


@pytest.fixture(scope="module")
def result(pair):
    return subtract(pair["new"], pair["ref"], new_var=pair["new_var"], ref_var=pair["ref_var"])


@pytest.fixture(scope="module")
def swapped(pair):
    # the same pair with roles exchanged: now the *new* image is the sharp one
    return subtract(pair["ref"], pair["new"], new_var=pair["ref_var"], ref_var=pair["new_var"])


def _source_free(pair, mask, radius=15.0):
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    near = np.zeros(SHAPE, bool)
    xs = list(pair["x"]) + [s[0] for s in pair["inject"]]
    ys = list(pair["y"]) + [s[1] for s in pair["inject"]]
    for x, y in zip(xs, ys):
        x0, x1, y0, y1 = int(max(x - radius, 0)), int(x + radius + 1), int(max(y - radius, 0)), int(y + radius + 1)
        sub = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 < radius**2
        near[y0:y1, x0:x1] |= sub
    return ~near & ~mask


def _aperture(img, noise, mask, x, y, r):
    import sep

    f, fe, _ = sep.sum_circle(np.ascontiguousarray(img), np.atleast_1d(x), np.atleast_1d(y), r,
                              err=np.ascontiguousarray(np.where(mask, 0, noise)), mask=mask)
    return f, fe


def test_result_shape_and_direction(result, pair):
    assert isinstance(result, SubtractionResult)
    assert result.diff.shape == result.noise.shape == result.mask.shape == SHAPE
    assert result.convolved == "ref"  # the reference is sharper (2.5 px vs 4 px)
    ki = result.kernel_info
    assert ki["n_stamps"] >= 30
    assert abs(ki["fwhm_new"] - 4.0) < 0.5 and abs(ki["fwhm_ref"] - 2.5) < 0.4
    assert 0.7 < ki["chi2"] < 1.5
    assert np.isfinite(result.diff).all()


def test_noise_matches_expected(result, pair):
    free = _source_free(pair, result.mask)
    assert free.mean() > 0.3
    # 1) the engine's own noise image describes the scatter
    z = result.diff[free] / result.noise[free]
    ratio_own = z.std()
    # 2) independently: sky variances of the simulation, kernel sum of squares from the kernel
    k = result.kernel_info["kernel"]
    s = result.kernel_info["sum"]
    expected = np.sqrt(np.median(pair["new_var"][free]) + np.median(pair["ref_var"][free]) * (k**2).sum()) / s
    ratio_truth = result.diff[free].std() / expected
    print(f"noise ratio: vs own noise image {ratio_own:.4f}, vs truth variances {ratio_truth:.4f}")
    assert abs(ratio_own - 1) < 0.10
    assert abs(ratio_truth - 1) < 0.10
    assert abs(np.mean(z)) < 0.05  # differential background removed


def test_injected_flux_recovered(result, pair):
    xs, ys, fl = (np.array(v) for v in zip(*pair["inject"]))
    f, fe = _aperture(result.diff, result.noise, result.mask, xs, ys, 3.0 * 4.0)
    ratio = f / fl
    print("flux ratios (ref scale):", np.round(ratio, 4))
    assert np.all(np.abs(ratio - 1) < 0.03)
    # and the constant stars are gone: their residual flux is a small fraction of their flux
    bright = pair["flux"] > 5e4
    fs, _ = _aperture(result.diff, result.noise, result.mask, pair["x"][bright], pair["y"][bright], 12.0)
    assert np.median(np.abs(fs / pair["flux"][bright])) < 0.01


def test_kernel_sum_recovers_flux_scale(result):
    ki = result.kernel_info
    print("kernel sum", ki["sum"], "flux scale", ki["flux_scale"])
    assert abs(ki["flux_scale"] / SCALE - 1) < 0.01
    assert ki["sum"] == pytest.approx(ki["flux_scale"])


def test_swapped_convolves_new(swapped, pair):
    assert swapped.convolved == "new"
    ki = swapped.kernel_info
    assert abs(ki["sum"] / SCALE - 1) < 0.01  # kernel maps the sharp new image onto the reference
    assert abs(ki["flux_scale"] * SCALE - 1) < 0.01  # new/ref is now 1/1.3
    # the injected sources are in the reference now: negative, with the reference's flux
    xs, ys, fl = (np.array(v) for v in zip(*pair["inject"]))
    f, _ = _aperture(swapped.diff, swapped.noise, swapped.mask, xs, ys, 12.0)
    ratio = -f / (fl * SCALE)
    print("swapped flux ratios:", np.round(ratio, 4))
    assert np.all(np.abs(ratio - 1) < 0.03)
    free = _source_free(pair, swapped.mask)
    assert abs((swapped.diff[free] / swapped.noise[free]).std() - 1) < 0.10


def test_moffat_pair_and_forced_direction():
    p = _pair(beta=3.0, fwhm_new_gradient=0.0, seed=3, n_stars=200)
    r = subtract(p["new"], p["ref"], new_var=p["new_var"], ref_var=p["ref_var"], spatial_order=1)
    assert r.convolved == "ref"
    assert abs(r.kernel_info["flux_scale"] / SCALE - 1) < 0.015
    free = _source_free(p, r.mask)
    assert abs((r.diff[free] / r.noise[free]).std() - 1) < 0.10
    # forcing the wrong direction still gives a result flagged as such (deconvolution is worse)
    f = subtract(p["new"], p["ref"], new_var=p["new_var"], ref_var=p["ref_var"], spatial_order=1, convolve="new")
    assert f.convolved == "new"
    assert f.kernel_info["chi2"] > r.kernel_info["chi2"]


@pytest.fixture(scope="module")
def tiled_pair():
    # 1024^2 in 2x2 tiles, against the same pair solved as one tile (an independent solution)
    p = make_pair((1024, 1024), n_stars=1000, fwhm_new=4.0, fwhm_ref=2.5, flux_scale=SCALE, fwhm_new_gradient=0.15,
                  seed=5)
    kw = dict(new_var=p["new_var"], ref_var=p["ref_var"])
    return p, subtract(p["new"], p["ref"], tile=512, **kw), subtract(p["new"], p["ref"], tile=1024, **kw)


def test_tiles_stitch_without_seams(tiled_pair):
    p, tiled, whole = tiled_pair
    ki = tiled.kernel_info
    assert ki["n_tiles"] == 4 and whole.kernel_info["n_tiles"] == 1
    print("tile flux scales", np.round(ki["tile_sums"], 4), "whole", round(whole.kernel_info["flux_scale"], 4))
    assert np.all(np.abs(np.array(ki["tile_sums"]) / SCALE - 1) < 0.01)  # each tile's own kernel, each right
    assert abs(ki["flux_scale"] / SCALE - 1) < 0.01
    n = 1024
    yy, xx = np.mgrid[:n, :n]
    free = np.ones((n, n), bool)
    for x, y in zip(np.rint(p["x"]).astype(int), np.rint(p["y"]).astype(int)):
        free[max(y - 15, 0):y + 16, max(x - 15, 0):x + 16] = False
    free &= ~tiled.mask & ~whole.mask
    border = (np.abs(xx - 512) < 40) | (np.abs(yy - 512) < 40)
    z = tiled.diff / tiled.noise
    dz = (tiled.diff - whole.diff) / whole.noise
    print(f"tiled z: border std {z[free & border].std():.4f} mean {z[free & border].mean():.4f}, interior std "
          f"{z[free & ~border].std():.4f} mean {z[free & ~border].mean():.4f}; tiled - whole: border std "
          f"{dz[free & border].std():.4f}")
    # the residuals along the tile borders look like those inside the tiles...
    assert abs(z[free & border].std() - z[free & ~border].std()) < 0.03
    assert abs(z[free & border].mean() - z[free & ~border].mean()) < 0.03
    assert abs(z[free & border].std() - 1) < 0.03
    # ...and the tiled solution departs from the whole-frame one by a small fraction of the noise,
    # with no step from one side of a border to the other
    assert dz[free & border].std() < 0.05 and abs(dz[free & border].mean()) < 0.05
    for lo, hi in ((free & (xx >= 504) & (xx < 512), free & (xx >= 512) & (xx < 520)),
                   (free & (yy >= 504) & (yy < 512), free & (yy >= 512) & (yy < 520))):
        assert abs(dz[hi].mean() - dz[lo].mean()) < 0.01


def test_masks_propagated(pair):
    ref = pair["ref"].copy()
    ref[200:210, 300:310] = np.nan  # a bad block in the convolved image
    new_mask = np.zeros(SHAPE, bool)
    new_mask[50, 60] = True
    r = subtract(pair["new"], ref, new_var=pair["new_var"], ref_var=pair["ref_var"], new_mask=new_mask)
    hw = r.kernel_info["half_width"]
    assert r.mask[200 - hw:210 + hw, 300 - hw:310 + hw].all()  # grown by the kernel half-width
    assert not r.mask[200 - hw - 2, 300 - hw - 2]
    assert r.mask[50, 60] and not r.mask[50, 62]  # the unconvolved image's mask is not grown
    assert r.mask[:hw].all() and r.mask[:, -hw:].all()  # edges where the convolution is partial
    assert np.isfinite(r.diff).all() and np.isfinite(r.noise).all()


def test_fft_convolve_matches_direct():
    from scipy.signal import convolve2d

    rng = np.random.default_rng(0)
    img = rng.normal(size=(37, 53))
    ker = rng.normal(size=(7, 7))
    ours = fft_convolve(img, ker)
    ref = convolve2d(img, ker, mode="same", boundary="fill")
    assert np.allclose(ours, ref, atol=1e-10)


def test_separable_stamp_convolutions_match_fft():
    rng = np.random.default_rng(2)
    sigmas, degrees, h, S = (0.7, 1.4, 2.8), (6, 4, 2), 8, 21
    cuts = rng.normal(size=(4, S + 2 * h, S + 2 * h))
    ours = stamp_convolutions(cuts, sigmas, degrees, h)
    direct = fft_convolve(cuts[:, None], kernel_basis(sigmas, degrees, h)[None])[..., h:h + S, h:h + S]
    assert ours.shape == (4, 49, S, S)
    assert np.allclose(ours, direct, atol=1e-10)


def test_box_dilate_matches_scipy():
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(1)
    m = rng.random((40, 60)) > 0.98
    assert np.array_equal(box_dilate(m, 3), binary_dilation(m, np.ones((7, 7), bool)))


def test_kernel_basis_sums():
    b = kernel_basis((0.7, 1.5, 3.0), (6, 4, 2), 8)
    assert b.shape == (28 + 15 + 6, 17, 17)
    assert b[0].sum() == pytest.approx(1.0)
    assert np.allclose(b[1:].sum(axis=(1, 2)), 0.0, atol=1e-12)


def test_bad_inputs():
    a = np.zeros((50, 50))
    with pytest.raises(BadInputError):
        subtract(a, np.zeros((50, 51)))
    with pytest.raises(ConfigError):
        subtract(a, a, engine="isis")
    with pytest.raises(BadInputError):  # flat images: no stars to fit a kernel on
        rng = np.random.default_rng(0)
        subtract(rng.normal(100, 5, (128, 128)), rng.normal(100, 5, (128, 128)))


@pytest.mark.slow
def test_full_size_frame_in_tiles_under_3_gib(tmp_path):
    """A 9576x6388 pair through the native engine in its own process, as the stage runs it."""
    spec = importlib.util.spec_from_file_location("bench_subtract", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = bench.make_inputs(str(tmp_path), bench.SIZES["full"])
    r = bench.run_child("native", str(tmp_path), timeout=600)
    print(r)
    assert "error" not in r, r
    assert r["n_tiles"] > 1 and truth["shape"] == [6388, 9576]
    assert r["peak_rss_mb"] <= 3 * 1024, r  # the float32 pair held in memory included
    assert 0.97 <= r["noise_ratio"] <= 1.01, r
    assert abs(r["flux_scale"] / SCALE - 1) < 0.01, r


# ------------------------------------------------------------------------------ HOTPANTS


def test_hotpants_args_are_complete():
    args = sh.build_args(
        new_path="n.fits", ref_path="r.fits", out_path="d.fits", new_noise="nn.fits", ref_noise="rn.fits",
        new_mask="nm.fits", ref_mask="rm.fits", out_noise="on.fits", out_mask="om.fits",
        new_stats=(1200.0, 35.0, 60000.0), ref_stats=(1000.0, 32.0, 50000.0), new_sat=65000.0, ref_sat=None,
        convolve="ref", sigmas=(0.7, 1.5, 3.0), degrees=(6, 4, 2), kernel_half=9, stamp_half=10)
    opts = dict(zip(args[1::2], args[2::2]))
    assert opts["-inim"] == "n.fits" and opts["-tmplim"] == "r.fits" and opts["-outim"] == "d.fits"
    assert opts["-imi"] == "nm.fits" and opts["-tmi"] == "rm.fits"
    assert opts["-nsx"] == "3" and opts["-nsy"] == "2"
    assert float(opts["-il"]) == pytest.approx(1200 - 350) and float(opts["-iu"]) == 65000
    assert float(opts["-tl"]) == pytest.approx(1000 - 320) and float(opts["-tu"]) == pytest.approx(50500)
    assert opts["-c"] == "t" and opts["-n"] == "t"
    i = args.index("-ng")
    assert args[i + 1:i + 8] == ["3", "6", "0.7000", "4", "1.5000", "2", "3.0000"]


def test_hotpants_substamp_never_narrower_than_kernel():
    # HOTPANTS stops with "rss (10) < r (25)" when the substamp is narrower than the kernel
    for r in (5, 9, 16, 25):
        args = sh.build_args(
            new_path="n", ref_path="r", out_path="d", new_noise="nn", ref_noise="rn", new_mask="nm", ref_mask="rm",
            out_noise="on", out_mask="om", new_stats=(0.0, 1.0, 10.0), ref_stats=(0.0, 1.0, 10.0), new_sat=None,
            ref_sat=None, convolve="ref", sigmas=(0.7, 1.5, 3.0), degrees=(6, 4, 2), kernel_half=r, stamp_half=10)
        opts = dict(zip(args[1::2], args[2::2]))
        assert int(opts["-r"]) == r and int(opts["-rss"]) >= 1.5 * r and int(opts["-rss"]) >= 10


def test_seeing_measured_with_the_sky_in(pair):
    # the raw images carry 1200/1000 ADU of sky: the seeing must be the stars', not the pedestal's
    for key, true in (("new", 4.0), ("ref", 2.5)):
        fw = measure_fwhm(pair[key], np.zeros(SHAPE, bool))
        print(key, "FWHM", fw)
        assert abs(fw - true) < 0.15 * true


def test_hotpants_missing_is_typed(monkeypatch, pair):
    monkeypatch.setattr(sh, "hotpants_path", lambda: None)
    with pytest.raises(ToolMissingError):
        subtract(pair["new"], pair["ref"], engine="hotpants")


@pytest.mark.skipif(shutil.which("hotpants") is None,
                    reason="hotpants is not on PATH (no Debian/PyPI package; it is built in the container image)")
def test_hotpants_engine_against_native(pair, result):
    # the real binary on the same seeded pair as the native engine: both near the truth
    r = subtract(pair["new"], pair["ref"], new_var=pair["new_var"], ref_var=pair["ref_var"], engine="hotpants")
    ki = r.kernel_info
    assert r.convolved == "ref" and ki["engine"] == "hotpants"
    assert abs(ki["fwhm_new"] - 4.0) < 0.5 and abs(ki["fwhm_ref"] - 2.5) < 0.4  # measured without the sky
    free = _source_free(pair, r.mask | result.mask)
    for name, res in (("hotpants", r), ("native", result)):
        z = res.diff[free] / res.noise[free]
        print(f"{name}: flux scale {res.kernel_info['flux_scale']:.4f} (true {SCALE}), noise ratio {z.std():.4f}")
        assert abs(res.kernel_info["flux_scale"] / SCALE - 1) < 0.02
        assert abs(z.std() - 1) < 0.10
    xs, ys, fl = (np.array(v) for v in zip(*pair["inject"]))
    f, _ = _aperture(r.diff, r.noise, r.mask, xs, ys, 12.0)
    assert np.all(np.abs(f / fl - 1) < 0.05)


# ------------------------------------------------------------------------------ GPU


def _cupy_or_skip():
    try:
        import cupy
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"CuPy is not installed ({exc.__class__.__name__}): the GPU path cannot run here")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy is installed but no CUDA device is visible")
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"CuPy is installed but no CUDA device is usable: {exc}")
    return cupy


@pytest.mark.gpu
def test_cupy_matches_numpy(pair, result):
    cp = _cupy_or_skip()
    g = subtract(cp.asarray(pair["new"]), cp.asarray(pair["ref"]), new_var=cp.asarray(pair["new_var"]),
                 ref_var=cp.asarray(pair["ref_var"]), xp=cp)
    assert isinstance(g.diff, cp.ndarray)
    h = g.to_numpy()
    assert h.convolved == result.convolved
    # images are float32: agreement to float32 rounding through a few FFTs, not to float64's
    assert h.kernel_info["sum"] == pytest.approx(result.kernel_info["sum"], rel=1e-5)
    assert np.array_equal(h.mask, result.mask)
    assert np.allclose(h.diff, result.diff, atol=1e-4 * float(np.abs(result.diff).max()))
    assert np.allclose(h.noise, result.noise, rtol=1e-4)

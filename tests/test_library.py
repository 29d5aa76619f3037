"""The master library query: same setup, inside the validity window, not bad, nearest in time."""

from gppy_stage.library import Master, choose


def _m(key, kind="flat", mjd=60000.0, verdict="good", binning=1, gain=2750, exptime=None, filt="m425"):
    return Master(key, kind, "7DT01", mjd, binning, gain, exptime, filt if kind == "flat" else None, verdict)


def test_nearest_good_master_in_the_window():
    lib = [_m("far", mjd=59990.0), _m("near-bad", mjd=59999.5, verdict="bad"), _m("near", mjd=59998.0),
           _m("other-filter", mjd=59999.9, filt="m450"), _m("binned", mjd=59999.9, binning=2),
           _m("other-gain", mjd=59999.9, gain=0)]
    got = choose(lib, kind="flat", mjd=60000.0, binning=1, gain=2750, filt="m425", validity_days=15)
    assert got.key == "near"
    assert choose(lib, kind="flat", mjd=60000.0, binning=1, gain=2750, filt="m425", validity_days=1) is None
    assert choose(lib, kind="flat", mjd=60000.0, binning=1, gain=2750, filt="m425", validity_days=15,
                  exclude=("near",)).key == "far"


def test_later_masters_serve_too():
    lib = [_m("before", mjd=59995.0), _m("after", mjd=60002.0)]
    assert choose(lib, kind="flat", mjd=60000.0, binning=1, gain=2750, filt="m425", validity_days=15).key == "after"


def test_darks_prefer_the_same_exposure_then_the_nearest():
    lib = [_m("d100-old", kind="dark", mjd=59990.0, exptime=100.0), _m("d60", kind="dark", mjd=59999.9, exptime=60.0),
           _m("d300", kind="dark", mjd=59999.9, exptime=300.0)]
    q = dict(kind="dark", mjd=60000.0, binning=1, gain=2750, validity_days=30)
    assert choose(lib, exptime=100.0, **q).key == "d100-old"  # the exact exposure beats a nearer night
    assert choose(lib, exptime=70.0, **q).key == "d60"  # none exact: the nearest exposure (scaled later)

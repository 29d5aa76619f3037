"""A simulated transient whose brightness changes during the night (for forced photometry).

By default the night's transient has one magnitude per filter all night, as before. With a
``LightCurve`` its magnitude at each science frame's mid-time moves linearly in time, by
``change_mag`` from the night's first science frame to its last (negative: it brightens). The
truth of every frame goes to ``frames.json`` (``transient_mag``) and the law to ``transients.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LightCurve:
    change_mag: float = 0.0

    def describe(self) -> dict:
        return asdict(self) | {"law": "mag(t) = mag + change_mag * (t - t_first) / (t_last - t_first), "
                                      "t the mid-time of a science frame"}


def frame_mag(lc: LightCurve | None, base_mag: float, frame, science: list) -> float:
    """The transient's magnitude in ``frame``, one of ``science`` (the night's science frames in
    time order)."""
    if lc is None:
        return base_mag
    span = (science[-1].mid - science[0].mid).total_seconds()
    frac = (frame.mid - science[0].mid).total_seconds() / span if span > 0 else 0.0
    return base_mag + lc.change_mag * frac

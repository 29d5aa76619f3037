"""Figures for products (stamps, light curves, zero points, completeness) as PNG bytes.

Matplotlib's object API on the Agg canvas: no pyplot state, no display, safe in threads and in
pods without a backend configured.
"""

from __future__ import annotations

import io


def figure(figsize: tuple[float, float], dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

"""Line plots as PNG files with Pillow alone (no plotting library in the dependencies)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

COLOURS = [(30, 90, 200), (220, 80, 30), (40, 150, 60), (140, 50, 180)]


def lines(path: str | Path, series: Mapping[str, Sequence[tuple[float, float]]], title: str) -> None:
    """One line per named series of (x, y) points, axes from 0 (or the smallest y, when negative) to the largest."""
    from PIL import Image, ImageDraw

    w, h, m = 720, 440, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    right = max(x for x, _ in points) * 1.05 or 1.0
    low = min(0.0, min(y for _, y in points))
    top = max(y for _, y in points) * 1.05 - low or 1.0
    x = lambda v: m + (w - 2 * m) * v / right  # noqa: E731
    y = lambda v: h - m - (h - 2 * m) * (v - low) / top  # noqa: E731
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for k in range(5):
        d.text((x(right * k / 4) - 10, h - m + 8), f"{right * k / 4:.4g}", fill="black")
        d.text((6, y(low + top * k / 4) - 6), f"{low + top * k / 4:.3g}", fill="black")
    for n, (name, pts) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        if len(pts) > 1:
            d.line([(x(a), y(b)) for a, b in pts], fill=colour, width=3)
        d.text((w - m - 160, m + 16 * n), name, fill=colour)
    d.text((m, 16), title, fill="black")
    img.save(path)

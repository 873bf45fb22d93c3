"""Text plots: a line chart in Unicode braille and a histogram's bins. Pure functions returning
strings, so they are tested without a terminal; the widgets only colour and place them.

Braille gives each character cell 2 x 4 dots, so a 40 x 5 cell chart draws 80 x 20 points
with no dependency and in any font that has the Braille Patterns block.
"""

from __future__ import annotations

import math

BRAILLE = 0x2800
# bit of the dot at (column 0-1, row 0-3 from the top) in a braille cell
DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def value_range(values) -> tuple[float, float] | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return min(finite), max(finite)


def braille_chart(values: list, width: int, height: int, lo: float | None = None, hi: float | None = None) -> list[str]:
    """`height` strings of `width` braille cells drawing `values` left to right as a line.

    The y range is lo..hi (default: the values' own). With fewer values than dot columns the
    points are spread out; with more, each dot column shows the mean of the values that fall in
    it, so a long noisy run still reads as a trend. Consecutive points are joined by vertical
    strokes; None or NaN leaves a gap.
    """
    width, height = max(width, 1), max(height, 1)
    cols, rows = 2 * width, 4 * height
    grid = [[0] * width for _ in range(height)]
    found = value_range(values)
    if found is None:
        return [chr(BRAILLE) * width for _ in range(height)]
    lo = found[0] if lo is None else lo
    hi = found[1] if hi is None else hi

    def level(v: float) -> int:  # 0 = bottom dot row
        if hi <= lo:
            return rows // 2
        return min(rows - 1, max(0, round((v - lo) / (hi - lo) * (rows - 1))))

    points: list[tuple[int, float | None]] = []  # (dot column, value or None for a gap)
    n = len(values)
    if n <= cols:
        for i, v in enumerate(values):
            points.append((0 if n == 1 else round(i * (cols - 1) / (n - 1)), v))
    else:
        buckets: dict[int, list[float]] = {}
        for i, v in enumerate(values):
            buckets.setdefault(i * cols // n, []).append(v)
        for x, vs in sorted(buckets.items()):
            finite = [v for v in vs if v is not None and math.isfinite(v)]
            points.append((x, sum(finite) / len(finite) if finite else None))

    spans: dict[int, list[int]] = {}  # dot column -> [lowest, highest] level drawn

    def draw(x: int, low: int, high: int) -> None:
        span = spans.setdefault(x, [low, high])
        span[0], span[1] = min(span[0], low), max(span[1], high)

    prev = None  # (column, level) of the previous point, to join it to the next
    for x, v in points:
        if v is None or not math.isfinite(v):
            prev = None  # a gap, not a line through the missing value
            continue
        y = level(v)
        draw(x, y, y)
        if prev is not None and x > prev[0]:
            x0, y0 = prev
            for xi in range(x0 + 1, x + 1):
                at = round(y0 + (y - y0) * (xi - x0) / (x - x0))
                before = round(y0 + (y - y0) * (xi - 1 - x0) / (x - x0))
                # a vertical stroke from just past the previous column's level to this one's
                draw(xi, min(at, before + 1), max(at, before - 1))
        prev = (x, y)
    for x, (low, high) in spans.items():
        for y in range(low, high + 1):
            r = rows - 1 - y  # dot row from the top
            grid[r // 4][x // 2] |= DOT[x % 2][r % 4]
    return ["".join(chr(BRAILLE + bits) for bits in line) for line in grid]


def histogram(values: list, bins: int = 9) -> list[tuple[float, float, int]]:
    """(low, high, count) bins over a range symmetric about 0, so that the middle bin holds
    the zero advantages and the two signs mirror each other."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    edge = max((abs(v) for v in finite), default=0.0) or 1.0
    width = 2 * edge / bins
    counts = [0] * bins
    for v in finite:
        counts[min(bins - 1, max(0, math.floor((v + edge) / width)))] += 1
    return [(-edge + i * width, -edge + (i + 1) * width, c) for i, c in enumerate(counts)]


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of `width` cells filled to `fraction` with eighth blocks."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")).ljust(width)


def compact(value: float | None) -> str:
    """A number in at most about 8 characters: 0.656, 1216, 9.14e-05."""
    if value is None or not math.isfinite(value):
        return "NaN" if value is not None else "-"
    if value == 0:
        return "0"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3g}"


def columns_text(columns: dict, width: int = 120) -> str:
    """A completion's logged columns (log_extra, e.g. a judge's score and reason) on one line:
    numbers compact, text cut to fit, a missing value as n/a."""

    def shown(v) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return compact(float(v))
        text = " ".join(str(v).split())
        return text if len(text) <= width else text[: width - 1] + "…"

    return "  ".join(f"{name} {shown(v)}" for name, v in columns.items())

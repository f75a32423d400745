"""`moxylogalyze --plot FILE.png`: delivered bytes per hour (UTC) for the top destinations;
per day, week, ... when a bar per hour would be more bars than the image has pixels.

matplotlib is an optional extra (`pip install 'moxy[plot]'`); it is imported only when a plot
is asked for, and its absence is `PlotUnavailable` before any log is read.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from moxy.accounting.events import DeliveryEvent
from moxy.tools.logstats import accepted

INSTALL_HINT = "pip install 'moxy[plot]'"
OTHERS = "others"
# The bars drawn at most: the figure is 10 inches at 100 dpi, so more would share pixels (and
# two events 56 years apart would make half a million of them).
MAX_BARS = 1000
# Hours per bar, the first that keeps the bars within MAX_BARS: hours, days, weeks, then 4, 13
# and 52 weeks (about a month, a quarter, a year); beyond, multiples of 52 weeks.
BIN_HOURS = (1, 2, 3, 6, 12, 24, 48, 7 * 24, 14 * 24, 28 * 24, 91 * 24, 364 * 24)


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def load_pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None
    # Its notices ("building the font cache" on a first run) are not ours to print: standard
    # error carries moxylogalyze's own lines only.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class HourlyBytes:
    """Delivered bytes per (destination, hour): one counter per pair, however long the log."""

    def __init__(self) -> None:
        self.bytes: Counter[tuple[str, int]] = Counter()

    def add(self, e: DeliveryEvent) -> None:
        if e.kind == "leg" and accepted(e):
            self.bytes[e.destination.lower(), int(e.time // 3600)] += e.size

    def series(self, top: int) -> dict[str, dict[int, int]]:
        """The `top` destinations by bytes, the rest summed as "others"; hour -> bytes."""
        totals: Counter[str] = Counter()
        for (dest, _), size in self.bytes.items():
            totals[dest] += size
        chosen = [dest for dest, _ in totals.most_common(top)]
        series: dict[str, dict[int, int]] = {dest: {} for dest in chosen}
        for (dest, hour), size in sorted(self.bytes.items(), key=lambda item: item[0][1]):
            name = dest if dest in series else OTHERS
            per_hour = series.setdefault(name, {})
            per_hour[hour] = per_hour.get(hour, 0) + size
        return series


def _human(value: float, _position: object = None) -> str:
    """Decimal units, so that matplotlib's round tick values stay round."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def bin_hours(first: int, last: int) -> int:
    """Hours per bar for the hours `first` to `last`: one, unless that is more than MAX_BARS."""
    for width in BIN_HOURS:
        if _bars(first, last, width) <= MAX_BARS:
            return width
    year = BIN_HOURS[-1]
    years = -(-(last - first + 1) // (year * MAX_BARS))
    while _bars(first, last, year * years) > MAX_BARS:  # a bar's start is a multiple of it
        years += 1
    return year * years


def _bars(first: int, last: int, width: int) -> int:
    return last // width - first // width + 1


def binned(series: dict[str, dict[int, int]], width: int) -> dict[str, dict[int, int]]:
    """The bytes per hour summed per bar of `width` hours; a bar is its first hour."""
    out: dict[str, dict[int, int]] = {}
    for dest, per_hour in series.items():
        bars = out[dest] = {}
        for hour, size in per_hour.items():
            start = hour - hour % width
            bars[start] = bars.get(start, 0) + size
    return out


def _hour_label(hour: int, width: int) -> str:
    # gmtime, not datetime: a log line may carry a time past year 9999 (UTC+14 on 9999-12-31).
    shown = "%Y-%m-%d %H:00" if width < 24 else "%Y-%m-%d"
    return time.strftime(shown, time.gmtime(hour * 3600))


def _per(width: int) -> str:
    """ "hour", "6 hours", "day", "7 days": what one bar is."""
    if width % 24:
        return "hour" if width == 1 else f"{width} hours"
    return "day" if width == 24 else f"{width // 24} days"


def write_plot(plt: Any, hourly: HourlyBytes, top: int, path: str) -> None:
    """Stacked bars, one per hour (or per longer period, see bin_hours), one colour per
    destination. Raises OSError when the file cannot be written."""
    from matplotlib.ticker import FuncFormatter

    series = hourly.series(top)
    hours = sorted({hour for per_hour in series.values() for hour in per_hour})
    width = bin_hours(hours[0], hours[-1]) if hours else 1
    series = binned(series, width)
    # Every bar from the first to the last, so that quiet periods show as gaps.
    span = list(range(hours[0] - hours[0] % width, hours[-1] + 1, width)) if hours else []
    figure, axes = plt.subplots(figsize=(10, 5), dpi=100)
    try:
        bottom = [0] * len(span)
        for dest, per_hour in series.items():
            heights = [per_hour.get(h, 0) for h in span]
            axes.bar(range(len(span)), heights, bottom=bottom, width=0.85, label=dest)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        if span:
            step = max(1, len(span) // 12)  # at most a dozen labels, however long the log
            axes.set_xticks(range(0, len(span), step))
            axes.set_xticklabels(
                [_hour_label(h, width) for h in span[::step]], rotation=30, ha="right"
            )
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        else:
            axes.text(0.5, 0.5, "no delivered bytes", ha="center", va="center",
                      transform=axes.transAxes)  # fmt: skip
        shown = len(series) - (OTHERS in series)
        plural = "s" if shown != 1 else ""
        axes.set_title(f"Bytes delivered per {_per(width)} (UTC), top {shown} destination{plural}")
        axes.set_xlabel(f"{'hour' if width < 24 else 'day'} starting (UTC)")
        axes.set_ylabel("bytes")
        axes.yaxis.set_major_formatter(FuncFormatter(_human))
        axes.grid(True, axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)

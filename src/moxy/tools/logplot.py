"""`moxylogalyze --plot FILE.png`: delivered bytes per hour (UTC) for the top destinations.

matplotlib is an optional extra (`pip install 'moxy[plot]'`); it is imported only when a plot
is asked for, and its absence is `PlotUnavailable` before any log is read.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from moxy.accounting.events import DeliveryEvent
from moxy.tools.logstats import accepted

INSTALL_HINT = "pip install 'moxy[plot]'"
OTHERS = "others"


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


def _hour_label(hour: int) -> str:
    return datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%d %H:00")


def write_plot(plt: Any, hourly: HourlyBytes, top: int, path: str) -> None:
    """Stacked bars, one per hour, one colour per destination. Raises OSError when the file
    cannot be written."""
    from matplotlib.ticker import FuncFormatter

    series = hourly.series(top)
    hours = sorted({hour for per_hour in series.values() for hour in per_hour})
    # Every hour from the first to the last, so that quiet hours show as gaps.
    span = list(range(hours[0], hours[-1] + 1)) if hours else []
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
                [_hour_label(h) for h in span[::step]], rotation=30, ha="right"
            )
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        else:
            axes.text(0.5, 0.5, "no delivered bytes", ha="center", va="center",
                      transform=axes.transAxes)  # fmt: skip
        shown = len(series) - (OTHERS in series)
        plural = "s" if shown != 1 else ""
        axes.set_title(f"Bytes delivered per hour (UTC), top {shown} destination{plural}")
        axes.set_xlabel("hour starting (UTC)")
        axes.set_ylabel("bytes")
        axes.yaxis.set_major_formatter(FuncFormatter(_human))
        axes.grid(True, axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)

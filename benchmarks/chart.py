"""benchmarks/ratios.png: one bar per scenario ratio, with its target as a marker."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import Bar

MET, MISSED, NO_TARGET = "#4c9a5b", "#c8553d", "#8c8c8c"


def _tick(bar: Bar) -> str:
    if bar.target is None:
        return f"{bar.label}\n{bar.ratio:.2f} (no target)"
    sign = "≥" if bar.higher_is_better else "≤"
    return f"{bar.label}\n{bar.ratio:.2f} (target {sign} {bar.target:.2f})"


def write_chart(bars: Sequence[Bar], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here; must precede pyplot
    import matplotlib.pyplot as plt

    shown = [b for b in bars if b.ratio is not None and b.ratio > 0]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(shown) + 2.5), 6.0), dpi=110)
    xs = range(len(shown))
    colours = [NO_TARGET if b.met is None else MET if b.met else MISSED for b in shown]
    ax.bar(xs, [b.ratio for b in shown], color=colours, width=0.6, zorder=2)
    for x, bar in zip(xs, shown, strict=True):
        if bar.target is not None:
            ax.hlines(bar.target, x - 0.42, x + 0.42, colors="black", linewidth=2.4, zorder=3)
    ax.axhline(1.0, color="#555555", linewidth=0.8, linestyle=":", zorder=1)
    ax.set_yscale("log")
    values = [b.ratio for b in shown] + [b.target for b in shown if b.target is not None] + [1.0]
    ax.set_ylim(min(values) / 1.6, max(values) * 1.8)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_tick(b) for b in shown], rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_ylabel("ratio (log scale)")
    ax.set_title(
        "builder vs its reference, per scenario — black marker: the target;\ngreen: met, red: missed, grey: no target",
        fontsize=9,
    )
    ax.grid(axis="y", which="both", alpha=0.25, zorder=0)
    if not math.isfinite(max(values)):
        raise ValueError("non-finite ratio")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)

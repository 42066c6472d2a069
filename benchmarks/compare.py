"""Alternating comparisons: run commands A B [C] A B [C] … and compare them pair by pair.

Running the commands in turn, rather than all runs of A and then all runs of
B, spreads slow drifts of the machine (page cache, the engine's state, other
load on the two cores) evenly over them. Each round is one *pair* (or triple):
its ratio to the reference is taken within the round, and the report gives the
median of those per-pair ratios, which is steadier than a ratio of medians.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from benchmarks import harness

# A command takes the run's number (0 = the warm-up) and returns its measurement.
Command = Callable[[int], Awaitable[float]]


@dataclass
class Comparison:
    names: list[str]
    reference: str
    unit: str
    digits: int = 2
    samples: dict[str, list[float]] = field(default_factory=dict)  # measured rounds, in order
    warmups: dict[str, list[float]] = field(default_factory=dict)

    def ratios(self, name: str, reference: str | None = None) -> list[float]:
        """name / reference (the comparison's own by default), round by round."""
        against = self.samples[reference or self.reference]
        return [a / b for a, b in zip(self.samples[name], against, strict=True) if b]

    def median_ratio_to(self, name: str, reference: str) -> float:
        """The median of per-round name / reference, for a second pair within the same rounds."""
        return harness.median(self.ratios(name, reference))

    def median_ratio(self, name: str) -> float | None:
        ratios = self.ratios(name)
        return harness.median(ratios) if ratios else None

    def median(self, name: str) -> float:
        return harness.median(self.samples[name])

    @property
    def rounds(self) -> int:
        return len(self.samples[self.reference])

    def table(self, labels: dict[str, str] | None = None) -> str:
        labels = labels or {}
        d = self.digits
        headers = [
            "command",
            "runs",
            f"median ({self.unit})",
            f"min – max ({self.unit})",
            f"ratio to {labels.get(self.reference, self.reference)}: median of per-pair ratios",
            "per-pair ratio min – max",
        ]
        rows = []
        for name in self.names:
            values = self.samples[name]
            if name == self.reference:
                ratio, spread = "1 (reference)", "—"
            else:
                ratios = self.ratios(name)
                ratio = f"**{harness.median(ratios):.3f}**"
                spread = f"{min(ratios):.3f} – {max(ratios):.3f}"
            rows.append(
                [
                    labels.get(name, name),
                    len(values),
                    f"{harness.median(values):.{d}f}",
                    f"{min(values):.{d}f} – {max(values):.{d}f}",
                    ratio,
                    spread,
                ]
            )
        return harness.markdown_table(headers, rows)

    def runs_note(self, labels: dict[str, str] | None = None) -> str:
        """Every measurement in run order, warm-up first, so drifts and outliers are visible."""
        labels = labels or {}
        d = self.digits
        parts = []
        for name in self.names:
            warm = ", ".join(f"{v:.{d}f}" for v in self.warmups.get(name, []))
            runs = ", ".join(f"{v:.{d}f}" for v in self.samples[name])
            parts.append(f"{labels.get(name, name)}: warm-up {warm or '—'}; runs {runs}")
        return f"All runs in order ({self.unit}): " + "; ".join(parts) + "."


async def alternate(
    commands: Sequence[tuple[str, Command]],
    *,
    pairs: int,
    warmups: int = 1,
    unit: str = "s",
    digits: int = 2,
    label: str = "",
) -> Comparison:
    """`warmups` unmeasured rounds, then `pairs` measured rounds of every command in the given order.

    The first command is the reference.
    """
    names = [name for name, _ in commands]
    comparison = Comparison(
        names=names,
        reference=names[0],
        unit=unit,
        digits=digits,
        samples={n: [] for n in names},
        warmups={n: [] for n in names},
    )
    for round_no in range(warmups + pairs):
        warm = round_no < warmups
        results = []
        for name, command in commands:
            value = await command(round_no)
            (comparison.warmups if warm else comparison.samples)[name].append(value)
            results.append(f"{name} {value:.{digits}f}")
        tag = "warm-up" if warm else f"pair {round_no - warmups + 1}/{pairs}"
        harness.progress(f"{label}: {tag}: {', '.join(results)} {unit}")
    return comparison

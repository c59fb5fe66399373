"""The series the Train module plots and the tables it shows, from protocol events (plain Python).

- `MetricHistory` collects ``metric`` events of ``uharmony adapt`` (``step``, ``loss``, ``dice`` per
  domain and class, ``gate_accuracy`` per domain, ``phase`` "before"/"after") into a loss series, a
  mean-Dice series per domain, and the before/after comparison.
- `RoundHistory` collects ``round`` events of ``uharmony fed join`` (``round``, ``total``, ``sites``,
  ``metrics``: loss, Dice per class, gate accuracy) into table rows and the same kind of series.
- `chart_geometry` turns series into pixel polylines for a plain widget (the Qt drawing itself is
  `TrainWidgetHelpers.draw_chart`): Dice on the left axis (0..1), loss on the right axis (0..max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

Point = tuple[float, float]

#: Line colours (RGB 0..255): the loss first, then one per domain.
LOSS_COLOR = (214, 39, 40)
DICE_COLORS = [(31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207), (140, 86, 75)]


def _number(value: Any) -> float | None:
    """A finite float, or None (null, NaN, text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def mean_dice(per_class: Any) -> float | None:
    """Mean over the classes that have a value (Dice is null for a class absent everywhere)."""
    if not isinstance(per_class, dict):
        return _number(per_class)
    values = [v for v in (_number(x) for x in per_class.values()) if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class ComparisonRow:
    domain: str
    name: str  # a class name, or "gate accuracy"
    before: float | None
    after: float | None

    @property
    def change(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before

    def texts(self) -> tuple[str, str, str, str, str]:
        def fmt(value, signed=False):
            return "-" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")

        return self.domain, self.name, fmt(self.before), fmt(self.after), fmt(self.change, signed=True)


class MetricHistory:
    """Every ``metric`` event of one adaptation, in arrival order."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.before: dict | None = None
        self.after: dict | None = None

    def add(self, event: dict) -> None:
        event = {k: v for k, v in event.items() if k not in ("v", "event")}
        self.events.append(event)
        if event.get("phase") == "before":
            self.before = event
        elif event.get("phase") == "after":
            self.after = event

    def __len__(self) -> int:
        return len(self.events)

    def loss_series(self) -> list[Point]:
        out = []
        for e in self.events:
            step, loss = _number(e.get("step")), _number(e.get("loss"))
            if step is not None and loss is not None:
                out.append((step, loss))
        return out

    def dice_series(self) -> dict[str, list[Point]]:
        """Mean Dice per domain at each evaluation; a flat {class: value} is the series "dice"."""
        series: dict[str, list[Point]] = {}
        for e in self.events:
            step, dice = _number(e.get("step")), e.get("dice")
            if step is None or not isinstance(dice, dict):
                continue
            nested = any(isinstance(v, dict) for v in dice.values())
            for domain, per_class in (dice.items() if nested else [("dice", dice)]):
                value = mean_dice(per_class)
                if value is not None:
                    series.setdefault(str(domain), []).append((step, value))
        return series

    def comparison(self) -> list[ComparisonRow]:
        """Dice per domain and class, and gate accuracy per domain, before and after."""
        before, after = self.before or {}, self.after or {}
        b_dice, a_dice = before.get("dice") or {}, after.get("dice") or {}
        b_gate, a_gate = before.get("gate_accuracy") or {}, after.get("gate_accuracy") or {}
        rows = []
        for domain in list(dict.fromkeys(list(b_dice) + list(a_dice))):
            b, a = b_dice.get(domain) or {}, a_dice.get(domain) or {}
            if not isinstance(b, dict) or not isinstance(a, dict):
                continue
            for name in list(dict.fromkeys(list(b) + list(a))):
                rows.append(ComparisonRow(str(domain), str(name), _number(b.get(name)), _number(a.get(name))))
            if domain in b_gate or domain in a_gate:
                rows.append(ComparisonRow(str(domain), "gate accuracy", _number(b_gate.get(domain)),
                                          _number(a_gate.get(domain))))
        return rows

    def summary(self) -> str:
        """One line: mean Dice per domain before -> after."""
        if self.before is None and self.after is None:
            return ""
        parts = []
        b_dice = (self.before or {}).get("dice") or {}
        a_dice = (self.after or {}).get("dice") or {}
        for domain in list(dict.fromkeys(list(b_dice) + list(a_dice))):
            b, a = mean_dice(b_dice.get(domain)), mean_dice(a_dice.get(domain))
            parts.append(f"{domain}: {'-' if b is None else f'{b:.3f}'} -> {'-' if a is None else f'{a:.3f}'}")
        return "Mean Dice " + "; ".join(parts) if parts else ""


@dataclass
class RoundRow:
    round: int
    total: int | None
    sites: int | None
    loss: float | None
    dice: float | None  # mean over classes
    gate_accuracy: float | None
    dice_per_class: dict[str, float | None] = field(default_factory=dict)

    def texts(self) -> tuple[str, str, str, str, str]:
        def fmt(value):
            return "-" if value is None else f"{value:.3f}"

        progress = f"{self.round}/{self.total}" if self.total else str(self.round)
        return progress, "-" if self.sites is None else str(self.sites), fmt(self.loss), fmt(self.dice), \
            fmt(self.gate_accuracy)


class RoundHistory:
    """The ``round`` events of one federated run (a round seen again replaces the earlier row)."""

    def __init__(self) -> None:
        self.rows: list[RoundRow] = []

    def add(self, event: dict) -> RoundRow | None:
        number = _number(event.get("round"))
        if number is None:
            return None
        metrics = event.get("metrics") if isinstance(event.get("metrics"), dict) else {}
        dice = metrics.get("dice")
        per_class = {str(k): _number(v) for k, v in dice.items()} if isinstance(dice, dict) else {}
        total, sites = _number(event.get("total")), _number(event.get("sites"))
        gate = metrics.get("gate_accuracy")
        row = RoundRow(int(number), None if total is None else int(total), None if sites is None else int(sites),
                       _number(metrics.get("loss")), mean_dice(dice) if dice is not None else None,
                       mean_dice(gate) if isinstance(gate, dict) else _number(gate), per_class)
        self.rows = [r for r in self.rows if r.round != row.round] + [row]
        self.rows.sort(key=lambda r: r.round)
        return row

    @property
    def latest(self) -> RoundRow | None:
        return self.rows[-1] if self.rows else None

    def fraction(self) -> float:
        row = self.latest
        if row is None or not row.total:
            return 0.0
        return max(0.0, min(1.0, row.round / row.total))

    def loss_series(self) -> list[Point]:
        return [(float(r.round), r.loss) for r in self.rows if r.loss is not None]

    def dice_series(self) -> dict[str, list[Point]]:
        points = [(float(r.round), r.dice) for r in self.rows if r.dice is not None]
        return {"dice": points} if points else {}


# -- chart geometry -----------------------------------------------------------------------------


@dataclass
class ChartLine:
    name: str
    color: tuple[int, int, int]
    points: list[Point]  # pixels
    axis: str  # "left" (Dice) or "right" (loss)


@dataclass
class Chart:
    width: int
    height: int
    plot: tuple[int, int, int, int]  # left, top, right, bottom of the plotting area (pixels)
    lines: list[ChartLine]
    x_range: tuple[float, float]
    loss_max: float | None
    x_label: str = "steps"

    @property
    def empty(self) -> bool:
        return not any(line.points for line in self.lines)

    def legend(self) -> list[tuple[str, tuple[int, int, int]]]:
        return [(line.name, line.color) for line in self.lines]


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * 10**exponent >= value:
            return step * 10**exponent
    return 10 ** (exponent + 1)


def chart_geometry(loss: list[Point], dice: dict[str, list[Point]], width: int, height: int,
                   x_max: float | None = None, x_label: str = "steps", margins=(36, 10, 40, 22)) -> Chart:
    """Pixel polylines: Dice on 0..1 (left axis), loss on 0..nice(max) (right axis), x from 0 to
    `x_max` (the budget, so the line grows to the right as training goes) or the last point."""
    left, top = margins[0], margins[1]
    right, bottom = width - margins[2], height - margins[3]
    xs = [p[0] for p in loss] + [p[0] for pts in dice.values() for p in pts]
    x_hi = max([x_max or 0.0] + xs + [1.0])
    loss_max = _nice_max(max(p[1] for p in loss)) if loss else None

    def px(x: float, y: float, y_hi: float) -> Point:
        fx = x / x_hi
        fy = max(0.0, min(1.0, y / y_hi))
        return (left + fx * (right - left), bottom - fy * (bottom - top))

    lines = [ChartLine("loss", LOSS_COLOR, [px(x, y, loss_max) for x, y in loss] if loss else [], "right")]
    for index, (name, points) in enumerate(dice.items()):
        label = "Dice" if name == "dice" else f"Dice {name}"
        lines.append(ChartLine(label, DICE_COLORS[index % len(DICE_COLORS)], [px(x, y, 1.0) for x, y in points], "left"))
    return Chart(width, height, (left, top, right, bottom), lines, (0.0, x_hi), loss_max, x_label)

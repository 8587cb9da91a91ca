"""The record every benchmark prints, and timing helpers."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from src import procedures  # noqa: F401 - registers the procedures' config sections


@dataclass
class Figure:
    """One measured figure, side by side with its baseline (DESIGN §9)."""

    benchmark: str
    figure: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.baseline_value and self.ratio is None:
            self.ratio = self.value / self.baseline_value

    def to_json(self) -> str:
        """One JSON line, with figures rounded to what the measurement supports."""
        record = asdict(self)
        for key in ("value", "baseline_value", "ratio"):
            if isinstance(record[key], float):
                record[key] = round(record[key], 4)
        return json.dumps(record)


def rate(count: int, action: Callable[[], None]) -> float:
    """`count / seconds` that `action` took."""
    started = time.perf_counter()
    action()
    return count / (time.perf_counter() - started)


def median_of_alternating(
    rounds: int, measure_ours: Callable[[], float], measure_baseline: Callable[[], float]
) -> tuple[float, float]:
    """Alternate ours and the baseline `rounds` times so that both see the same
    machine conditions; return the median of each."""
    ours: list[float] = []
    baseline: list[float] = []
    for _ in range(rounds):
        baseline.append(measure_baseline())
        ours.append(measure_ours())
    return statistics.median(ours), statistics.median(baseline)

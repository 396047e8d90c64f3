"""Side-by-side comparison of two bench JSON reports, with the ratio B / A of every number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inferd.bench.report import LATENCY_METRICS, PERCENTILES

_THROUGHPUT_ROWS = (
    ("completed", "Completed requests"),
    ("failed", "Failed requests"),
    ("duration_s", "Duration (s)"),
    ("request_throughput", "Request throughput (req/s)"),
    ("output_throughput", "Output throughput (tok/s)"),
    ("total_token_throughput", "Total throughput (tok/s)"),
    ("goodput", "Goodput (req/s)"),
)


def load_summary(path: str | Path) -> dict[str, Any]:
    """The `summary` of a bench JSON report; a file that is not one is a ValueError naming it."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:  # a folder, a file that cannot be read
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None
    summary = report.get("summary") if isinstance(report, dict) else None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is not an inferd bench report: it has no 'summary' object")
    # Every figure compared must be a number or absent, each latency an object of them.
    numbers = [summary.get(key) for key, _ in _THROUGHPUT_ROWS]
    for metric in LATENCY_METRICS:
        latency = summary.get(metric)
        if latency is not None and not isinstance(latency, dict):
            raise ValueError(f"{path}: summary.{metric} is not an object of statistics")
        numbers += list((latency or {}).values())
    if not all(value is None or _is_number(value) for value in numbers):
        raise ValueError(f"{path}: the summary holds a figure that is not a number")
    return summary


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ratio(a: float | None, b: float | None) -> float | None:
    """B / A, or None where either is missing or A is zero."""
    if a is None or b is None or a == 0:
        return None
    return b / a


def comparison_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(label, A, B) for every number both reports may hold; latencies per statistic."""
    rows = [(label, a.get(key), b.get(key)) for key, label in _THROUGHPUT_ROWS]
    statistics = ("mean", *(f"p{p}" for p in PERCENTILES))
    for metric in LATENCY_METRICS:
        name = metric.removesuffix("_ms").upper()
        for statistic in statistics:
            rows.append(
                (
                    f"{name} {statistic} (ms)",
                    (a.get(metric) or {}).get(statistic),
                    (b.get(metric) or {}).get(statistic),
                )
            )
    return rows


def format_comparison(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    header = f"{'metric':<30}{name_a[:16]:>18}{name_b[:16]:>18}{'B/A':>10}"
    lines = [header, "-" * len(header)]
    for label, value_a, value_b in comparison_rows(a, b):
        if value_a is None and value_b is None:
            continue
        share = ratio(value_a, value_b)
        lines.append(f"{label:<30}{_number(value_a):>18}{_number(value_b):>18}{_number(share, '.3f'):>10}")
    return "\n".join(lines)


def _number(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)
